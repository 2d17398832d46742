"""`owl-desktop bench convert`: peak memory and time of a conversion, measured from outside the process.

A few-GB random checkpoint (`make_checkpoint(preset="bench")`, cached in the cache dir) is converted by
`owl-desktop convert` in a child process, so the figures hold nothing of this process. Every `_SAMPLE_S` the
child's process tree (the converter and its quantizer) is read from /proc/<pid>/status: VmRSS = RssAnon
(heap, tensors being converted) + RssFile (mapped files: the checkpoint pages, libraries) + RssShmem. The peaks
of the tree's sums are reported with the kernel's own high-water marks, and each as a ratio of the checkpoint's
size: a streaming conversion keeps them far below 1.

High-water marks: VmHWM of the converter (its own peak RSS, sampled until it exits) and ru_maxrss from wait4.
On Linux ru_maxrss also counts the address space the child was forked from, i.e. this process's RSS at spawn
time, and its largest child; this process therefore generates the checkpoint in a child of its own and stays
small.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import astuple, dataclass
from pathlib import Path

import psutil

from owl_desktop import paths

BENCH_PRESET = "bench"
_SAMPLE_S = 0.02
_COMPLETE = ".complete"
KEEP_PAGES_ENV = "OWL_CONVERT_KEEP_PAGES"  # set to 1 to measure without releasing the checkpoint's pages


@dataclass(frozen=True)
class Rss:
    total: int = 0
    anon: int = 0
    file: int = 0
    hwm: int = 0  # VmHWM: the kernel's peak RSS of the process (of the converter only, in a tree sum)

    def __add__(self, other: Rss) -> Rss:
        return Rss(self.total + other.total, self.anon + other.anon, self.file + other.file, self.hwm)

    def peak(self, other: Rss) -> Rss:
        return Rss(*(max(a, b) for a, b in zip(astuple(self), astuple(other), strict=True)))


@dataclass(frozen=True)
class ConvertMeasurement:
    quant: str
    seconds: float
    checkpoint_bytes: int
    peak: Rss  # peaks of the process tree's sums, each taken on its own
    ru_maxrss: int  # bytes: the kernel's high-water RSS of the converter (or of its largest child)
    bundle_bytes: int
    pages_released: bool

    @property
    def rss_ratio(self) -> float:
        return self.peak.total / self.checkpoint_bytes

    @property
    def anon_ratio(self) -> float:
        return self.peak.anon / self.checkpoint_bytes


def bench_checkpoint() -> Path:
    """The benchmark checkpoint in the cache dir, generated on first use (a few GB, a minute or two) in a child
    process, so that this one stays small (see the module docstring)."""
    folder = paths.cache_dir() / "bench" / "mplug-owl-bench"
    if (folder / _COMPLETE).is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    print(f"generating the benchmark checkpoint in {folder} (once)...", file=sys.stderr, flush=True)
    script = (
        "import sys; from pathlib import Path; from owl_desktop.devtools.tiny_checkpoint import make_checkpoint; "
        f"make_checkpoint(Path(sys.argv[1]), 'bin', preset={BENCH_PRESET!r}, seed=0)"
    )
    subprocess.run([sys.executable, "-c", script, str(folder)], check=True)
    (folder / _COMPLETE).write_text("ok\n", encoding="utf-8")
    return folder


def read_rss(pid: int) -> Rss:
    """VmRSS / RssAnon / RssFile of one process (zeros if it is gone or /proc is missing)."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    fields[key] = int(value.split()[0]) * 1024  # kB
    except (OSError, ValueError):
        return Rss()
    return Rss(fields.get("VmRSS", 0), fields.get("RssAnon", 0), fields.get("RssFile", 0), fields.get("VmHWM", 0))


def tree_rss(pid: int) -> Rss:
    """The RSS of `pid` plus all its descendants (the spawned quantizer)."""
    total = read_rss(pid)
    try:
        for child in psutil.Process(pid).children(recursive=True):
            total = total + read_rss(child.pid)
    except psutil.Error:
        pass
    return total


def run_sampled(cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, float, Rss, int]:
    """Run `cmd`, sampling its tree's memory; (exit status, seconds, peaks, ru_maxrss in bytes)."""
    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        peak = Rss()
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            peak = peak.peak(tree_rss(proc.pid))
            time.sleep(_SAMPLE_S)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            tail = log.read().decode("utf-8", "replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{' '.join(cmd[:4])} … failed ({proc.returncode}): {' | '.join(tail)}")
    return proc.returncode, seconds, peak, usage.ru_maxrss * 1024


def measure_conversion(src: Path, quant: str, workdir: Path, *, release_pages: bool = True) -> ConvertMeasurement:
    out = workdir / f"bundle-{quant}"
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ)
    env.pop(KEEP_PAGES_ENV, None)
    if not release_pages:
        env[KEEP_PAGES_ENV] = "1"
    cmd = [sys.executable, "-m", "owl_desktop", "convert", str(src), "--out", str(out), "--quant", quant]
    _, seconds, peak, maxrss = run_sampled(cmd, env)
    bundle_bytes = sum(p.stat().st_size for p in out.iterdir())
    shutil.rmtree(out, ignore_errors=True)
    return ConvertMeasurement(quant, seconds, checkpoint_bytes(src), peak, maxrss, bundle_bytes, release_pages)


def import_baseline() -> int:
    """ru_maxrss (bytes) of a process that only imports the converter: Python + torch + gguf, no work."""
    _, _, _, maxrss = run_sampled([sys.executable, "-c", "import owl_desktop.convert.converter"])
    return maxrss


def checkpoint_bytes(src: Path) -> int:
    return sum(p.stat().st_size for p in src.iterdir() if p.name.endswith((".bin", ".safetensors")))


def _gb(n: float) -> str:
    return f"{n / 1e9:6.2f} GB"


def format_report(src: Path, results: list[ConvertMeasurement], baseline: int) -> str:
    size = checkpoint_bytes(src)
    lines = [
        f"checkpoint: {src} ({size / 1e9:.2f} GB of weights)",
        f"import-only baseline (python + torch + gguf): ru_maxrss {baseline / 1e6:.0f} MB",
        "",
        f"{'quant':<7} {'pages':<8} {'time':>7} {'peak RSS':>10} {'peak anon':>10} {'peak file':>10} "
        f"{'RSS/ckpt':>8} {'anon/ckpt':>9} {'VmHWM':>10} {'ru_maxrss':>10} {'bundle':>10}",
    ]
    for r in results:
        lines.append(
            f"{r.quant:<7} {'released' if r.pages_released else 'kept':<8} {r.seconds:>6.1f}s {_gb(r.peak.total):>10} "
            f"{_gb(r.peak.anon):>10} {_gb(r.peak.file):>10} {r.rss_ratio:>8.3f} {r.anon_ratio:>9.3f} "
            f"{_gb(r.peak.hwm):>10} {_gb(r.ru_maxrss):>10} {_gb(r.bundle_bytes):>10}"
        )
    return "\n".join(lines)


def run_bench(quants: list[str], *, compare_pages: bool = False, workdir: Path | None = None) -> str:
    """Generate (or reuse) the benchmark checkpoint, convert it to each quant in a child, and report."""
    src = bench_checkpoint()
    root = workdir or paths.cache_dir() / "bench"
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for quant in quants:
        modes = (True, False) if compare_pages else (True,)
        for release in modes:
            results.append(measure_conversion(src, quant, root, release_pages=release))
            print(format_report(src, results[-1:], 0).splitlines()[-1], file=sys.stderr, flush=True)
    return format_report(src, results, import_baseline())
