"""One benchmark measurement in a fresh Python process, its dataclass result handed back as a dict.

Benchmarks run a configuration in a child when the process itself is what is measured (peak RSS) or when a choice is
made once per process (llama.cpp's CPU variant). The child calls `module:function(**kwargs)`, and prints the
returned dataclass as one JSON line that the parent picks out of whatever else the libraries wrote to stdout.

    python -m owl_desktop.engine.bench_child owl_desktop.engine.bench_memory:measure_one '{"bundle": ...}'
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

_RESULT = "RESULT "


class ChildFailed(RuntimeError):
    """The child exited with an error or without a result; the message is the last line it wrote to stderr."""


def run_measurement(
    target: str, kwargs: Mapping[str, Any], env: Mapping[str, str] | None = None, timeout: float | None = None
) -> dict[str, Any]:
    """Run `target` ("package.module:function") in a child with these JSON-able keyword arguments and return the
    fields of the dataclass it returns. `env`: the child's whole environment (default: this process's, so the
    figures are those of what users run). Raises ChildFailed."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", __name__, target, json.dumps(dict(kwargs))],
            capture_output=True,
            text=True,
            env=dict(env) if env is not None else None,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise ChildFailed(f"no result within {exc.timeout:.0f} s") from exc
    results = [line for line in done.stdout.splitlines() if line.startswith(_RESULT)]
    if done.returncode != 0 or not results:
        lines = done.stderr.strip().splitlines()
        raise ChildFailed(lines[-1] if lines else f"exit status {done.returncode}, no result")
    return json.loads(results[-1][len(_RESULT) :])


def _main(target: str, kwargs_json: str) -> None:
    module, _, function = target.partition(":")
    result = getattr(importlib.import_module(module), function)(**json.loads(kwargs_json))
    # on a line of its own even if a library left a partial line in stdout
    print("\n" + _RESULT + json.dumps(asdict(result)), flush=True)


if __name__ == "__main__":
    _main(*sys.argv[1:3])
