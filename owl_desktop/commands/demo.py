"""`owl-desktop demo`: the whole path on a tiny random model, for a newcomer with no model and no network."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from owl_desktop.commands.ask import print_notes, stream_answer
from owl_desktop.commands.engine_args import add_engine_flags, add_sampling_flags, engine_settings, sampling

DEMO_QUESTION = "What do you see in this picture?"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="answer a question about a generated image with a tiny RANDOM model (no download needed)",
        description="Builds once, in the data dir, a tiny model bundle with random weights, draws a picture and "
        "asks about it through the whole engine. The answer is meaningless: the weights are random.",
    )
    p.add_argument("question", nargs="?", default=DEMO_QUESTION, metavar="QUESTION")
    p.add_argument("--image", action="append", default=[], type=Path, metavar="PATH", help="use your own image(s)")
    add_sampling_flags(p)
    add_engine_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from owl_desktop.commands.progress import ProgressLine
    from owl_desktop.devtools.demo import demo_image, ensure_demo_bundle
    from owl_desktop.engine.pipeline import ChatPipeline
    from owl_desktop.tasks import Task

    progress = ProgressLine()
    try:
        bundle_dir = ensure_demo_bundle(Task(progress))
    finally:
        progress.close()
    images = args.image or [demo_image()]
    print("owl-desktop demo: a tiny model with RANDOM weights; its answer is meaningless by design.", file=sys.stderr)
    print(f"model: {bundle_dir}\nimages: {', '.join(str(i) for i in images)}\nquestion: {args.question}\n")
    with ChatPipeline.open(bundle_dir, engine_settings(args)) as pipe:
        answer = pipe.ask(images, args.question, sampling=sampling(args))
        print("answer (random weights): ", end="", flush=True)
        stream_answer(answer)
        print_notes(answer.record)
        r = answer.record
        encode = sum(t.encode_ms for t in r.images)
        print(
            f"[encode {encode:.0f} ms, prefill {r.prefill_ms:.0f} ms, first token {r.time_to_first_token_ms:.0f} ms, "
            f"{r.decode_tokens_per_s:.1f} tokens/s, {r.context_used}/{r.context_size} positions]",
            file=sys.stderr,
        )
    return 0
