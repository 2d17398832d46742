"""What a message will cost in the model's context before it is sent, and whether it can fit at all.

The composer shows it while the user writes: each image takes the bundle's rows per view (65 for mPLUG-Owl) times
its views (UReader: a global view plus the crops of the grid its size gets, engine/doc_crops.plan_views), the text
an estimate of its tokens. The engine's prompt builder (engine/prompt.py) stays the judge of what is sent; this is
the same arithmetic done early, so a message that cannot fit is refused in the composer instead of after encoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from owl_desktop.engine.doc_crops import plan_views
from owl_desktop.engine.prompt import MIN_NEW_TOKENS, answer_floor
from owl_desktop.model_family import ImagePlan

BYTES_PER_TOKEN = 3  # a cautious average for SentencePiece on English and code: the estimate errs high
TURN_OVERHEAD = 8  # "Human: " / "AI: " lines around a question


def text_positions(text: str) -> int:
    """An estimate of the positions `text` takes (the real count needs the model's tokenizer)."""
    n = len(text.strip().encode())
    return (n + BYTES_PER_TOKEN - 1) // BYTES_PER_TOKEN + TURN_OVERHEAD if n else 0


def image_positions(size: tuple[int, int] | None, plan: ImagePlan, rows_per_view: int) -> tuple[int, int]:
    """(positions at full detail, the fewest it can take): UReader may read a large image with a smaller grid."""
    if not plan.crops:
        return rows_per_view, rows_per_view
    if size is None:  # the preview has not told the size yet: its global view, at least
        return rows_per_view, rows_per_view
    return plan_views(size[0], size[1], plan).rows(rows_per_view), rows_per_view


@dataclass(frozen=True)
class Budget:
    images: int  # how many images the message has
    image_cost: int  # their positions at full detail
    least_image_cost: int  # the fewest positions they can take (equal to image_cost for mPLUG-Owl)
    text_cost: int  # the question's estimated positions
    used: int  # positions the conversation took at its last answer (0 in a new chat)
    size: int  # the model's context
    answer_room: int = MIN_NEW_TOKENS  # the least room an answer needs
    answer_wanted: int = MIN_NEW_TOKENS  # the longest answer the settings ask for: its room shrinks to a floor (a
    # quarter of it) before old turns give way, as the prompt builder does (engine/prompt.answer_floor)

    @property
    def cost(self) -> int:
        return self.image_cost + self.text_cost

    @property
    def left(self) -> int:
        """What would be left for the answer after this message with the whole conversation kept."""
        return self.size - self.used - self.cost

    @property
    def fits_alone(self) -> bool:
        """Whether the message fits at all (old turns may be left out for it)."""
        return self.least_image_cost + self.text_cost + self.answer_room <= self.size

    @property
    def answer_floor(self) -> int:
        """The least room the answer keeps before old turns leave (or all the room the message alone leaves)."""
        return max(self.answer_room, min(answer_floor(self.answer_wanted, self.answer_room), self.size - self.cost))

    @property
    def keeps_history(self) -> bool:
        """Whether the whole conversation stays in the model's view with it: the prompt builder keeps old turns while
        they leave the answer its floor."""
        return self.left >= self.answer_floor

    @property
    def longest_answer(self) -> int:
        """The longest answer the message gets with the whole conversation kept (less than the settings' when the
        conversation takes the room)."""
        return max(0, min(self.answer_wanted, self.left))

    def images_to_remove(self, costs: Sequence[int]) -> int:
        """How many images (the costliest first) must go for the message to fit alone."""
        room = self.size - self.answer_room - self.text_cost
        total = sum(costs)
        for k, c in enumerate(sorted(costs, reverse=True)):
            if total <= room:
                return k
            total -= c
        return len(costs)


def budget(
    text: str,
    sizes: Sequence[tuple[int, int] | None],
    plan: ImagePlan,
    rows_per_view: int,
    n_ctx: int,
    used: int,
    answer_wanted: int = MIN_NEW_TOKENS,
) -> tuple[Budget, list[int]]:
    """The budget of a message with images of `sizes`, and each image's least cost (for images_to_remove)."""
    full = [image_positions(s, plan, rows_per_view) for s in sizes]
    least = [lo for _, lo in full]
    b = Budget(
        images=len(sizes),
        image_cost=sum(hi for hi, _ in full),
        least_image_cost=sum(least),
        text_cost=text_positions(text),
        used=used,
        size=n_ctx,
        answer_wanted=answer_wanted,
    )
    return b, least


def describe(b: Budget, least: Sequence[int]) -> tuple[str, str]:
    """(kind, line) for the composer: kind is "ok", "warn" (old turns will leave the model's view) or "error"."""
    pics = f"{b.images} image{'s' if b.images != 1 else ''}"
    if not b.fits_alone:
        k = b.images_to_remove(least)
        what = f"{pics} need {b.least_image_cost} positions" if b.images else f"this text needs {b.text_cost} positions"
        fix = (
            f"Remove {k} image{'s' if k != 1 else ''} or ask about them in separate messages."
            if k
            else ("Shorten the question.")
        )
        return "error", f"Too much for one message: {what}, and the model holds {b.size} with room to answer. {fix}"
    each = f" ({pics})" if b.images else ""
    line = f"This message: about {b.cost} positions{each} · {max(0, b.left)} of {b.size} left for the answer"
    if not b.keeps_history:
        return "warn", (
            f"{line}. The conversation no longer fits with it: its oldest questions will leave the model's view. "
            "A new chat (Ctrl+N keeps this draft) gives it the whole context."
        )
    if b.longest_answer < b.answer_wanted:
        return "ok", f"{line} (answers up to {b.longest_answer} tokens, to keep the whole conversation in view)"
    return "ok", line
