"""Subcommands of `owl-desktop`. Each module has `register(subparsers)` that adds its parser with a `func`."""

from __future__ import annotations

from types import ModuleType

from owl_desktop.commands import ask, bench, convert, demo, dev, models, serve

COMMANDS: list[ModuleType] = [
    dev,
    convert,
    models,
    ask,
    demo,
    bench,
    serve,
]
