"""Subcommands of `owl-desktop`. Each module has `register(subparsers)` that adds its parser with a `func`."""

from __future__ import annotations

from types import ModuleType

COMMANDS: list[ModuleType] = []
