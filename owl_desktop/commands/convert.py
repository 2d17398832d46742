"""`owl-desktop convert SRC [--out DIR] [--quant Q] [--lora ADAPTER]`: HF checkpoint → model bundle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from owl_desktop import paths
from owl_desktop.bundle import DEFAULT_QUANT, QUANTS
from owl_desktop.commands.progress import ProgressLine
from owl_desktop.tasks import Task


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "convert",
        help="convert a Hugging Face mPLUG-Owl checkpoint into a model bundle",
        description=(
            "Convert an mPLUG-Owl v1 checkpoint folder (config.json, pytorch_model.bin or safetensors, "
            "tokenizer.model) into a model bundle: vision.safetensors + a quantized llama.cpp GGUF + bundle.json."
        ),
    )
    p.add_argument("src", type=Path, metavar="SRC", help="the checkpoint folder")
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="the bundle folder to create (default: <data dir>/models/<bundle id>)",
    )
    p.add_argument("--quant", choices=QUANTS, default=DEFAULT_QUANT, type=str.upper, help="default: %(default)s")
    p.add_argument("--lora", type=Path, metavar="ADAPTER_DIR", help="a peft LoRA adapter to merge into the LLM")
    p.add_argument("--id", dest="bundle_id", metavar="ID", help="bundle id (default: source folder name + quant)")
    p.add_argument("--threads", type=int, metavar="N", help="quantization threads (default: all cores)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from owl_desktop.convert.converter import (
        convert_checkpoint,
        default_bundle_id,
        describe_source,
        sanitize_bundle_id,
    )

    out = args.out
    if out is None:
        bundle_id = sanitize_bundle_id(args.bundle_id or default_bundle_id(describe_source(args.src), args.quant))
        out = paths.models_dir() / bundle_id
    progress = ProgressLine()
    try:
        result = convert_checkpoint(
            args.src,
            out,
            quant=args.quant,
            lora=args.lora,
            task=Task(progress),
            bundle_id=args.bundle_id,
            threads=args.threads,
        )
    finally:
        progress.close()
    print(f"bundle written to {result}", file=sys.stdout)
    return 0
