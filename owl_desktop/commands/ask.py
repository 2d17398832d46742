"""`owl-desktop ask` (one question, streamed) and `owl-desktop chat` (an interactive terminal chat)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from owl_desktop.commands.engine_args import (
    add_engine_flags,
    add_sampling_flags,
    engine_settings,
    load_conversation,
    sampling,
)
from owl_desktop.errors import OwlError


def register(sub: Any) -> None:
    ask = sub.add_parser("ask", help="ask one question about images; the answer streams to stdout")
    ask.add_argument("question", metavar="QUESTION")
    ask.add_argument("--model", required=True, metavar="BUNDLE", help="a bundle folder or an installed bundle id")
    ask.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="repeat for more images; PATH#x,y,w,h takes a region (pixels of the original); a PDF gives its pages "
        "(FILE.pdf#page=2 or #pages=1-3 chooses them)",
    )
    ask.add_argument(
        "--conversation",
        type=Path,
        metavar="PATH",
        help="earlier turns: an export of the app (folder, .owlchat.zip or conversation JSON); its system prompt "
        "is used unless --system is given",
    )
    ask.add_argument("--system", metavar="TEXT", help="a custom system prompt")
    ask.add_argument("--json", action="store_true", help="print one JSON object: answer, token ids, timings")
    add_sampling_flags(ask)
    add_engine_flags(ask)
    ask.set_defaults(func=run_ask)

    chat = sub.add_parser("chat", help="an interactive chat in the terminal (/image PATH, /clear, /regen, /quit)")
    chat.add_argument("--model", required=True, metavar="BUNDLE", help="a bundle folder or an installed bundle id")
    chat.add_argument("--system", metavar="TEXT", help="a custom system prompt")
    add_sampling_flags(chat)
    add_engine_flags(chat)
    chat.set_defaults(func=run_chat)


def print_notes(record: Any, stream: Any = None) -> None:
    stream = stream or sys.stderr
    if record.dropped_turns:
        print(f"[{record.dropped_turns} earlier turn(s) left out to fit the context]", file=stream)
    for notice in getattr(record, "notices", ()):
        print(f"[{notice}]", file=stream)
    if record.stop_reason == "length":
        print("[answer cut at the token limit]", file=stream)


def record_json(record: Any) -> dict[str, Any]:
    return {
        "answer": record.text,
        "token_ids": record.token_ids,
        "dropped_turns": record.dropped_turns,
        "notices": list(record.notices),
        "stop_reason": record.stop_reason,
        "seed": record.seed,
        "timings": {
            "images": [
                {
                    "name": t.name,
                    "sha256": t.sha256,
                    "encode_ms": round(t.encode_ms, 2),
                    "cached": t.cached,
                    "views": t.views,
                    "grid": t.grid,
                }
                for t in record.images
            ],
            "prefill_ms": round(record.prefill_ms, 2),
            "time_to_first_token_ms": round(record.time_to_first_token_ms, 2),
            "decode_tokens_per_s": round(record.decode_tokens_per_s, 2),
            "context_used": record.context_used,
            "context_size": record.context_size,
            "reused_positions": record.reused_positions,
        },
    }


def stream_answer(answer: Any, out: Any = None) -> None:
    """Print an answer as it streams; Ctrl+C stops it and keeps what was written."""
    out = out or sys.stdout  # looked up per call, so redirected output (and pytest's capture) is honoured
    try:
        for piece in answer:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        answer.cancel()
        out.write("\n")
        print("[stopped]", file=sys.stderr)
        return
    out.write("\n")
    out.flush()


def run_ask(args: argparse.Namespace) -> int:
    from owl_desktop import image_spec, pdf_intake
    from owl_desktop.engine.pipeline import ChatPipeline

    specs = [image_spec.parse(text) for text in args.image]  # a malformed one fails before the model loads
    earlier = load_conversation(args.conversation) if args.conversation else None
    history = earlier.turns if earlier else []
    system = args.system if args.system is not None else (earlier.system_prompt if earlier else None)
    with ChatPipeline.open(args.model, engine_settings(args)) as pipe:
        side = pdf_intake.render_side(pipe.bundle.image_plan)
        images = [img for spec in specs for img in image_spec.resolve(spec, side)]
        answer = pipe.ask(images, args.question, history, sampling=sampling(args), system=system)
        if args.json:
            answer.read()
            out = record_json(answer.record)
            out["llm_device"] = pipe.llm.device  # e.g. "CPU zen4" or "Vulkan: llvmpipe (...)"
            print(json.dumps(out, ensure_ascii=False))
        else:
            stream_answer(answer)
            print_notes(answer.record)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from owl_desktop import image_spec, pdf_intake
    from owl_desktop.engine.pipeline import ChatPipeline, HistoryTurn, ImageSource

    with ChatPipeline.open(args.model, engine_settings(args)) as pipe:
        print(f"owl-desktop chat with {pipe.bundle.id}. /image PATH attaches an image, /clear, /regen, /quit.")
        history: list[HistoryTurn] = []
        pending: list[ImageSource] = []
        last: tuple[list[ImageSource], str] | None = None
        base = sampling(args)
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print()
                return 0
            if not line:
                continue
            if line in ("/quit", "/exit"):
                return 0
            if line == "/clear":
                history, pending, last = [], [], None
                print("[conversation cleared]")
                continue
            if line.startswith("/image"):
                text = str(Path(line[len("/image") :].strip()).expanduser())
                try:
                    spec = image_spec.parse(text)
                    if not spec.path.is_file():
                        print(f"[no such file: {spec.path}]")
                        continue
                    added = image_spec.resolve(spec, pdf_intake.render_side(pipe.bundle.image_plan))
                except OwlError as exc:
                    print(f"[error: {exc}]")
                    continue
                pending.extend(added)
                print(f"[{spec.path.name} attached; {len(pending)} image(s) for the next question]")
                continue
            samp = base
            if line == "/regen":
                if last is None or not history:
                    print("[nothing to regenerate yet]")
                    continue
                history.pop()
                images, question = last
                samp = replace(base, seed=None)  # a fresh seed gives a different answer
            elif line.startswith("/"):
                print("[commands: /image PATH, /clear, /regen, /quit]")
                continue
            else:
                images, question = list(pending), line
            try:
                answer = pipe.ask(images, question, history, sampling=samp, system=args.system)
                print("owl> ", end="", flush=True)
                stream_answer(answer)
            except OwlError as exc:
                print(f"[error: {exc}]")
                continue
            print_notes(answer.record)
            pending = []  # kept until a question using them got its answer
            history.append(HistoryTurn(images, question, answer.record.text, answer.record.token_ids))
            last = (images, question)
