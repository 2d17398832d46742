"""`owl-desktop dev ...`: developer tools (random checkpoints for tests, the offline demo and benchmarks)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

# Kept in sync with owl_desktop.devtools.tiny_checkpoint (not imported here: torch loads only when a command runs).
_VARIANTS = ("bin", "sharded", "safetensors", "sharded-safetensors", "lora", "ureader")
_PRESETS = ("tiny", "slow", "bench", "7b")  # devtools.tiny_checkpoint.PRESETS, without importing torch for --help


def register(sub: Any) -> None:
    parser = sub.add_parser("dev", help="developer tools", description="Developer tools.")
    parser.set_defaults(func=lambda _args: parser.print_help())
    dev_sub = parser.add_subparsers(dest="dev_command", metavar="DEV_COMMAND")
    make = dev_sub.add_parser(
        "make-checkpoint",
        help="write a random mPLUG-Owl or UReader checkpoint in the release's layout",
        description="Write a random mPLUG-Owl checkpoint (config.json, bf16 weights, tokenizer.model, ...) "
        "laid out like MAGAer13/mplug-owl-llama-7b. The lora variant also writes a peft adapter to OUT-lora. "
        "The ureader variant is laid out like Mizukiluke/ureader-v1: three float32 shards with an index, and the "
        "abstractor's crop position tables.",
    )
    make.add_argument("out", type=Path, metavar="OUT", help="directory to write (created if missing)")
    make.add_argument("--variant", choices=_VARIANTS, default="bin", help="file layout (default: bin)")
    make.add_argument(
        "--preset",
        choices=_PRESETS,
        default="tiny",
        help="model size: tiny (tests), slow (tests of Stop, ~110 MB), bench (~3 GB) or 7b (mPLUG-Owl-7B's shapes, "
        "~13.7 GB)",
    )
    make.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    make.set_defaults(func=_make_checkpoint)


def _make_checkpoint(args: argparse.Namespace) -> int:
    from owl_desktop.commands.progress import ProgressLine, human_size
    from owl_desktop.devtools.tiny_checkpoint import directory_size, lora_adapter_dir, make_checkpoint
    from owl_desktop.tasks import Task

    progress = ProgressLine()
    start = time.monotonic()
    try:
        out = make_checkpoint(args.out, args.variant, preset=args.preset, seed=args.seed, task=Task(progress))
    finally:
        progress.close()
    elapsed = time.monotonic() - start
    size = human_size(directory_size(out))
    print(f"wrote {args.preset} checkpoint ({args.variant}) to {out}: {size} in {elapsed:.1f} s")
    if args.variant == "lora":
        adapter = lora_adapter_dir(out)
        print(f"wrote LoRA adapter to {adapter}: {human_size(directory_size(adapter))}")
    return 0
