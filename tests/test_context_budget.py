"""The composer's arithmetic: what a message costs in the context before it is sent (app/context_budget.py)."""

from __future__ import annotations

from owl_desktop.app.context_budget import Budget, budget, describe, text_positions
from owl_desktop.engine.doc_crops import plan_views
from owl_desktop.engine.prompt import Turn, build_prompt
from owl_desktop.model_family import single_view_plan, ureader_plan


def test_mplug_owl_images_cost_65_positions_each_and_what_is_left_is_said() -> None:
    b, least = budget("What differs?", [(800, 600)] * 3, single_view_plan(), 65, 2048, used=700, answer_wanted=512)
    assert b.image_cost == 195 == b.least_image_cost and least == [65, 65, 65]
    assert b.text_cost == text_positions("What differs?") and b.left == 2048 - 700 - b.cost
    kind, line = describe(b, least)
    assert (
        kind == "ok"
        and line == f"This message: about {b.cost} positions (3 images) · {b.left} of 2048 left for the answer"
    )


def test_ureader_costs_follow_the_grid_its_image_gets() -> None:
    plan = ureader_plan()
    b, least = budget("read it", [(1700, 2200)], plan, 65, 2048, used=0)
    assert b.image_cost == plan_views(1700, 2200, plan).rows(65) > 65 and least == [65]


def test_what_cannot_fit_is_refused_with_how_many_images_to_remove() -> None:
    b, least = budget("Compare all", [(640, 480)] * 40, single_view_plan(), 65, 2048, used=0)
    kind, line = describe(b, least)
    assert kind == "error" and not b.fits_alone
    assert line.startswith("Too much for one message: 40 images need 2600 positions, and the model holds 2048")
    keep = (2048 - 16 - b.text_cost) // 65
    assert f"Remove {40 - keep} images" in line


def test_the_answer_room_shrinks_to_its_floor_before_old_turns_leave_the_view() -> None:
    args = ("and this?", [(640, 480)] * 2, single_view_plan(), 65, 2048)
    roomy, _ = budget(*args, used=1000, answer_wanted=512)
    assert roomy.keeps_history and roomy.longest_answer == 512 and describe(roomy, [])[0] == "ok"
    # less than the longest answer left: the conversation stays whole and the answer's room shrinks, and says so
    shrunk, least = budget(*args, used=1600, answer_wanted=512)
    assert shrunk.keeps_history and shrunk.longest_answer == shrunk.left < 512 and shrunk.left >= 128
    kind, line = describe(shrunk, least)
    assert kind == "ok" and line.endswith(
        f"(answers up to {shrunk.left} tokens, to keep the whole conversation in view)"
    )
    # below the floor (a quarter of the longest answer), the oldest turns leave
    tight, least = budget(*args, used=1800, answer_wanted=512)
    assert tight.left < 128 and not tight.keeps_history and tight.fits_alone
    kind, line = describe(tight, least)
    assert kind == "warn" and "oldest questions will leave the model's view" in line


def test_the_composer_and_the_prompt_builder_agree_on_what_stays_in_view() -> None:
    """Positions counted exactly (one token per character): the budget's verdict and answer room are the prompt's."""
    tokenize = lambda text: [7] * len(text)  # noqa: E731
    history = [Turn([f"img{i}"], f"question {i}", "answer " * 20) for i in range(6)]
    asked = Turn([], "and now?")
    current = build_prompt([asked], tokenize, system="").n_positions - 1  # the message alone, without BOS
    whole = build_prompt([*history, asked], tokenize, system="").n_positions
    for n_ctx in range(whole + 1, whole + 600, 7):
        prompt = build_prompt([*history, asked], tokenize, system="", n_ctx=n_ctx, max_new_tokens=512)
        b = Budget(0, 0, 0, text_cost=current, used=whole - current, size=n_ctx, answer_wanted=512)
        assert b.keeps_history == (prompt.dropped_turns == 0), n_ctx
        if b.keeps_history:
            assert b.longest_answer == prompt.max_new_tokens, n_ctx
