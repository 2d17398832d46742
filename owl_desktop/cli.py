"""`owl-desktop` entry point: the desktop app by default, subcommands for everything else."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from owl_desktop import __version__, logs
from owl_desktop.commands import COMMANDS
from owl_desktop.errors import OwlError


def version_text() -> str:
    """Our version, and what llama.cpp runs on here (CPU variant, GPU backend)."""
    try:
        from owl_desktop.engine.llm import backends

        llama = backends().summary()
    except (OwlError, OSError, ImportError) as exc:
        llama = f"unavailable ({exc})"
    return f"owl-desktop {__version__}\nllama.cpp: {llama}"


class _VersionAction(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_args: object) -> None:
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="owl-desktop",
        description="Private, local chat about images with mPLUG-Owl. Without a command, opens the app.",
    )
    parser.add_argument("--version", action=_VersionAction, help="show the version and llama.cpp's CPU variant and GPU")
    parser.add_argument(
        "--self-test",
        action="store_true",
        help="start the app headless with the demo model, drop an image, ask, wait for the answer; exit 0 if it worked",
    )
    parser.add_argument("--screenshot", type=Path, metavar="PATH", help="with --self-test: save the window as a PNG")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def split_open_files(argv: Sequence[str], commands: set[str]) -> tuple[list[str], list[Path]]:
    """`owl-desktop IMAGE...` (the desktop file's "Open with"): the files to attach, apart from the options."""
    words = list(argv)
    if not words or words[0].startswith("-") or words[0] in commands:
        return words, []
    files = [Path(w) for w in words if not w.startswith("-")]
    return [w for w in words if w.startswith("-")], files


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    commands = {name for a in parser._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices}
    argv, open_files = split_open_files(sys.argv[1:] if argv is None else argv, commands)
    args = parser.parse_args(argv)
    logs.setup()
    if args.self_test:
        from owl_desktop.gui import run_self_test  # Qt is loaded only when the app itself is wanted

        return run_self_test(args.screenshot)
    if args.screenshot is not None:
        parser.error("--screenshot goes with --self-test")
    if getattr(args, "func", None) is None:
        from owl_desktop.gui import run_app

        return run_app(sys.argv[:1], open_files)
    try:
        return int(args.func(args) or 0)
    except OwlError as exc:
        logging.getLogger("owl_desktop.cli").warning("%s: %s", args.command, exc)
        print(f"owl-desktop: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # a bug: the traceback goes to the log, the user gets one line naming it
        logging.getLogger("owl_desktop.cli").exception("%s failed", args.command)
        print(f"owl-desktop: error: {type(exc).__name__}: {exc} ({logs.see_the_log()})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("owl-desktop: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
