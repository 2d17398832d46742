"""A fixed, English-like corpus generated in code, to train the tiny SentencePiece tokenizer on.

It mixes image-description sentences, chat turns in the mPLUG-Owl prompt style, numbers, punctuation and
some accented words. CJK and emoji are left out on purpose: the tokenizer must reach them through byte
fallback, as LLaMA's does for most of them. The same seed always yields the same lines.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

_SUBJECTS = (
    "the cat|a dog|the man|a woman|two children|the old car|a red bicycle|the train|a small boat|"
    "the teacher|my friend|the picture|this photo|the receipt|a bird|the kitchen|a tall building|"
    "the street|our garden|the chart|a screenshot|the menu|the document|a horse|the city|the mountain|"
    "a cup of coffee|the table|a laptop"
).split("|")
_VERBS = (
    "is sitting on|is standing near|looks at|is holding|is walking along|is next to|shows|contains|"
    "is parked in front of|is lying under|is painted on|covers|describes|points to|is reading|is eating|"
    "is playing with|is waiting for|is crossing|runs past"
).split("|")
_OBJECTS = (
    "the window|a wooden chair|the river|a green field|the white wall|a busy road|the blue sky|"
    "a stack of books|the beach|an empty room|the table|a large sign|the bridge|a basket of apples|"
    "the park|a snowy hill|the station|a bright lamp|the front door|a pile of papers|the screen|"
    "an orange umbrella|the fence|the harbour"
).split("|")
_ADJECTIVES = (
    "beautiful|quiet|crowded|colourful|dark|sunny|blurry|funny|strange|simple|detailed|old|modern|bright|"
    "small|large|happy|sad|warm|cold|clean"
).split("|")
_ACCENTED = (
    "café|naïve|résumé|façade|déjà vu|crème brûlée|jalapeño|señor|piñata|über|Zürich|São Paulo|Málaga|"
    "Kraków|Ærøskøbing|Müller|Göteborg|Ångström|coöperate|Bogotá|Curaçao|Île-de-France|garçon|fiancée|"
    "Über|Ça va|naïveté|smörgåsbord"
).split("|")
_QUESTIONS = (
    "What is in the image?|Describe this picture in detail.|How many people are there?|"
    "What colour is the car?|Can you read the text on the sign?|What is the man doing?|"
    "Is it day or night?|Where was this photo taken?|What is funny about this image?|"
    "Summarise the document.|What does the chart show?|Which one is larger?|"
    "What time does the clock show?|Is there anything unusual here?|Translate the menu, please."
).split("|")
_PUNCT_TAILS = (".", "!", "?", "...", ";", ":", ",", " -", " (see above).", " [1]", '"', "'", " :)")
_UNITS = ("km", "kg", "%", "cm", "EUR", "USD", "px", "ms", "GB", "°C")


def _sentence(rng: random.Random) -> str:
    subject = rng.choice(_SUBJECTS)
    text = f"{subject} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    if rng.random() < 0.4:
        text += f" in a {rng.choice(_ADJECTIVES)} {rng.choice(('place', 'room', 'town', 'scene', 'light'))}"
    if rng.random() < 0.3:
        text += f", near the {rng.choice(_ACCENTED)}"
    text = text[0].upper() + text[1:]
    return text + rng.choice(_PUNCT_TAILS[:3]) if rng.random() < 0.8 else text + rng.choice(_PUNCT_TAILS)


def _numbers_line(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return f"The total is {rng.randint(1, 9999)}.{rng.randint(0, 99):02d} {rng.choice(_UNITS)}."
    if kind == 1:
        return f"On {rng.randint(1, 28)}/{rng.randint(1, 12)}/{rng.randint(1950, 2030)} at {rng.randint(0, 23)}:"
    if kind == 2:
        phone = f"+{rng.randint(1, 99)} {rng.randint(100, 999)} {rng.randint(1000, 9999)}"
        return f"Call {phone} (ext. {rng.randint(1, 99)})"
    if kind == 3:
        return f"Item #{rng.randint(1, 500)}: {rng.randint(1, 12)} x {rng.choice(_ADJECTIVES)} {rng.choice(_OBJECTS)}"
    return f"{rng.randint(1, 100)}% of {rng.randint(2, 1000)} = {rng.random() * 100:.2f}"


def _chat_lines(rng: random.Random) -> list[str]:
    return [
        "The following is a conversation between a curious human and AI assistant.",
        "Human: <image>",
        f"Human: {rng.choice(_QUESTIONS)}",
        f"AI: {_sentence(rng)} {_sentence(rng)}",
    ]


def corpus_lines(seed: int = 1234, n_blocks: int = 700) -> Iterator[str]:
    """Yield the corpus one line (one SentencePiece "sentence") at a time; deterministic for a seed."""
    rng = random.Random(seed)
    for _ in range(n_blocks):
        yield from _chat_lines(rng)
        yield _sentence(rng)
        yield _numbers_line(rng)
        yield f"{rng.choice(_ACCENTED)} is {rng.choice(_ADJECTIVES)}, {rng.choice(_ACCENTED).lower()} too."
        # Indentation and runs of spaces, so that whitespace-only pieces can be learned.
        if rng.random() < 0.2:
            yield "    " + _sentence(rng) + "  " + rng.choice(_ADJECTIVES)
