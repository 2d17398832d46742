"""Will a model fit this machine? Disk for download + conversion + bundle, memory for each quantization.

Computed before anything is fetched, from the model's parameter counts (estimates.py), the bytes still to download
and two probes that tests replace: free disk space of a folder, and RAM (+ the memory of the GPU llama.cpp uses).
The answer recommends a quantization and says plainly when the model will not fit.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from owl_desktop.hub.estimates import QUANT_ORDER, Footprint, ModelFacts, footprint, gib

FreeSpaceProbe = Callable[[Path], int]
RAM_RESERVE = 1 << 30  # left to the operating system and other programs
RECOMMENDABLE = ("Q8_0", "Q5_K_M", "Q4_K_M")  # best quality first; F16/F32 are for checks, not for chatting


@dataclass(frozen=True)
class MemoryInfo:
    ram_total: int
    ram_available: int
    gpu_name: str | None = None
    vram_total: int | None = None
    vram_free: int | None = None
    gpu_backend: str | None = None  # llama.cpp's backend for that GPU, e.g. "Vulkan"


MemoryProbe = Callable[[], MemoryInfo]


def system_memory() -> MemoryInfo:
    """RAM from psutil; the memory of the GPU llama.cpp offloads to, as its backend reports it (a CPU-only build runs
    the model from RAM, whatever GPU the machine has). Not torch's view: importing torch for it held the GIL ~200 ms
    on the calling thread, a stall of the window behind the models page, and it saw only CUDA devices."""
    import psutil

    vm = psutil.virtual_memory()
    info = MemoryInfo(ram_total=int(vm.total), ram_available=int(vm.available))
    try:
        from owl_desktop.engine.llm import offload_gpu_memory

        gpu = offload_gpu_memory()
    except Exception:  # noqa: BLE001 - no usable llama.cpp build or a broken GPU driver: plan for the CPU
        return info
    if gpu is None:
        return info
    return MemoryInfo(info.ram_total, info.ram_available, gpu.name, gpu.total, gpu.free, gpu.backend)


def disk_free(path: Path) -> int:
    return shutil.disk_usage(existing_ancestor(path)).free


def existing_ancestor(path: Path) -> Path:
    p = Path(path).absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    return p


@dataclass(frozen=True)
class QuantFit:
    quant: str
    footprint: Footprint
    fits_ram: bool
    fits_vram: bool | None  # None: no GPU

    @property
    def fits(self) -> bool:
        return self.fits_ram or bool(self.fits_vram)


@dataclass(frozen=True)
class DiskNeed:
    path: Path  # a folder on the file system
    needed: int
    free: int

    @property
    def ok(self) -> bool:
        return self.free >= self.needed


@dataclass(frozen=True)
class Preflight:
    repo_id: str
    quant: str
    n_ctx: int
    options: tuple[QuantFit, ...]  # every quantization, smallest first
    download_needed: int  # bytes still to fetch
    disks: tuple[DiskNeed, ...]  # one per file system involved
    recommended: str | None  # None: no quantization fits in memory
    lines: tuple[str, ...]  # the explanation, for people

    @property
    def disk_ok(self) -> bool:
        return all(d.ok for d in self.disks)

    @property
    def memory_ok(self) -> bool:
        return self.option(self.quant).fits

    @property
    def fits(self) -> bool:
        return self.disk_ok and self.memory_ok

    def option(self, quant: str) -> QuantFit:
        return next(o for o in self.options if o.quant == quant)

    def summary(self) -> str:
        return "\n".join(self.lines)


def check(
    *,
    repo_id: str,
    quant: str,
    n_ctx: int,
    facts: ModelFacts,
    download_needed: int,
    downloads_dir: Path,
    models_dir: Path,
    free_space: FreeSpaceProbe,
    memory: MemoryInfo,
) -> Preflight:
    options = tuple(_fit(footprint(facts, q, n_ctx, gpu_backend=memory.gpu_backend), memory) for q in QUANT_ORDER)
    chosen = next(o for o in options if o.quant == quant)
    disks = _disks(downloads_dir, models_dir, download_needed, chosen.footprint.conversion_peak, free_space)
    recommended = _recommend(options, memory)
    lines = [f"{repo_id} as {quant} with a {n_ctx}-token context:"]
    lines += _disk_lines(disks, download_needed, chosen.footprint)
    lines += _memory_lines(chosen, memory)
    lines.append(_verdict(chosen, recommended, options, memory, all(d.ok for d in disks)))
    return Preflight(repo_id, quant, n_ctx, options, download_needed, disks, recommended, tuple(lines))


def _fit(fp: Footprint, memory: MemoryInfo) -> QuantFit:
    fits_vram = None if memory.vram_total is None else fp.vram <= memory.vram_total
    return QuantFit(fp.quant, fp, fp.ram <= memory.ram_total - RAM_RESERVE, fits_vram)


def _recommend(options: tuple[QuantFit, ...], memory: MemoryInfo) -> str | None:
    by_quant = {o.quant: o for o in options}
    if memory.vram_total is not None:
        for q in RECOMMENDABLE:
            if by_quant[q].fits_vram:
                return q  # the best quality that runs entirely on the GPU
    # On the CPU decoding speed follows the model's size: the smallest good quantization is the best trade.
    return "Q4_K_M" if by_quant["Q4_K_M"].fits_ram else None


def _same_filesystem(a: Path, b: Path) -> bool:
    try:
        return os.stat(existing_ancestor(a)).st_dev == os.stat(existing_ancestor(b)).st_dev
    except OSError:
        return False


def _disks(
    downloads_dir: Path, models_dir: Path, download: int, conversion: int, free_space: FreeSpaceProbe
) -> tuple[DiskNeed, ...]:
    # The checkpoint stays on disk while the converter writes the bundle (and its intermediate GGUF) next to the
    # target, so on one file system the two add up.
    if _same_filesystem(downloads_dir, models_dir):
        where = existing_ancestor(models_dir)
        return (DiskNeed(where, download + conversion, free_space(where)),)
    d, m = existing_ancestor(downloads_dir), existing_ancestor(models_dir)
    return DiskNeed(d, download, free_space(d)), DiskNeed(m, conversion, free_space(m))


def _disk_lines(disks: tuple[DiskNeed, ...], download: int, fp: Footprint) -> list[str]:
    lines = [
        f"  download: {gib(download)} still to fetch; converting needs up to {gib(fp.conversion_peak)} more while it "
        f"runs, and the finished bundle takes {gib(fp.bundle)}"
    ]
    for d in disks:
        state = "enough" if d.ok else f"NOT ENOUGH: free {gib(d.needed - d.free)} more, or set OWL_DATA_DIR elsewhere"
        lines.append(f"  disk at {d.path}: needs {gib(d.needed)}, {gib(d.free)} free: {state}")
    return lines


def _memory_lines(chosen: QuantFit, memory: MemoryInfo) -> list[str]:
    fp = chosen.footprint
    usable = memory.ram_total - RAM_RESERVE
    state = "fits" if chosen.fits_ram else "does NOT fit"
    lines = [
        f"  memory on the CPU: about {gib(fp.ram)} (language model {gib(fp.llm_file)}, context {gib(fp.kv_cache)}, "
        f"vision encoder and runtime); this machine has {gib(memory.ram_total)}, {gib(usable)} usable: {state}"
    ]
    if chosen.fits_ram and fp.ram > memory.ram_available:
        lines.append(f"  only {gib(memory.ram_available)} is free right now: close other programs before loading it")
    if memory.vram_total is not None:
        state = "runs entirely on the GPU" if chosen.fits_vram else "does NOT fit on the GPU (it runs on the CPU)"
        lines.append(f"  GPU {memory.gpu_name or ''}: needs {gib(fp.vram)} of its {gib(memory.vram_total)}: {state}")
    return lines


def _verdict(
    chosen: QuantFit, recommended: str | None, options: tuple[QuantFit, ...], memory: MemoryInfo, disk_ok: bool
) -> str:
    if recommended is None:
        smallest = options[0].footprint
        return (
            f"  verdict: will NOT fit: even {smallest.quant} needs about {gib(smallest.ram)} of memory and this "
            f"machine has {gib(memory.ram_total)}"
        )
    if not chosen.fits:
        return f"  verdict: {chosen.quant} will NOT fit in memory; {recommended} would (recommended)"
    if not disk_ok:
        return f"  verdict: it would run ({recommended} recommended) but there is NOT enough disk space to install it"
    note = "" if recommended == chosen.quant else f"; {recommended} is recommended for this machine"
    return f"  verdict: fits{note}"
