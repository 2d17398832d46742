"""`owl-desktop bench memory`: what one bundle costs in memory and speed, per way of holding the LLM's weights.

Each configuration runs in a fresh process (peak RSS is per process): load the bundle (vision + LLM, the full
context), encode one image, prefill one image + a question, generate N tokens greedily. Reported per configuration:
load time; RSS after load and at the end split into anonymous and file-backed pages (/proc/self/smaps_rollup); peak
RSS (VmHWM); encode; prefill positions/s; decode tokens/s. Then each figure against the best configuration of the
same run, and decode against the memory-bandwidth limit measured in the same run: bytes of weights read per token
× tokens/s, against a plain read of a buffer the size of the weights with the same number of threads.

The configurations: llama.cpp's repacked CPU weights ("extra buffers") on or off, the GGUF memory-mapped or read.
With repacking and mmap both on, the repacked copy lives in anonymous memory while the mapped file's pages stay
resident beside it: the weights are in memory twice.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from owl_desktop.engine.bench_child import ChildFailed, run_measurement

CONFIGS: dict[str, dict[str, bool]] = {
    "mmap, no repack": {"use_mmap": True, "repack": False},
    "mmap + repack": {"use_mmap": True, "repack": True},
    "read, repack": {"use_mmap": False, "repack": True},
    "read, no repack": {"use_mmap": False, "repack": False},
}


@dataclass
class MemoryRun:
    config: str
    load_s: float
    rss_load_gb: float
    anon_load_gb: float
    file_load_gb: float
    rss_end_gb: float
    anon_end_gb: float
    file_end_gb: float
    peak_gb: float
    encode_ms: float
    prefill_positions: int
    prefill_per_s: float
    decode_tokens: int
    decode_per_s: float
    backend: str


def _smaps() -> tuple[float, float, float]:
    """(RSS, anonymous, file-backed) in GB from /proc/self/smaps_rollup."""
    fields: dict[str, int] = {}
    with open("/proc/self/smaps_rollup", encoding="ascii") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                fields[parts[0][:-1]] = int(parts[1]) * 1024
    rss, anon = fields.get("Rss", 0), fields.get("Anonymous", 0)
    return rss / 1e9, anon / 1e9, (rss - anon - fields.get("Shmem", 0)) / 1e9


def _peak() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    return 0.0


def measure_one(bundle: str, config: str, tokens: int, llm: dict[str, Any], image: str) -> MemoryRun:
    """Child-process body: one configuration from load to the last token, with these LlmSettings fields."""
    from owl_desktop.engine.options import LlmSettings, Sampling
    from owl_desktop.engine.pipeline import ChatPipeline, EngineSettings

    settings = EngineSettings(llm=LlmSettings(**{**llm, **CONFIGS[config]}), disk_cache=False)
    t0 = time.perf_counter()
    pipe = ChatPipeline.open(bundle, settings)
    load_s = time.perf_counter() - t0
    rss_l, anon_l, file_l = _smaps()
    t1 = time.perf_counter()
    pipe.image_rows(image)
    encode_ms = (time.perf_counter() - t1) * 1000
    # the encode is cached now: the ask below measures the LLM alone
    answer = pipe.ask(
        [image], "Describe this picture in detail.", sampling=Sampling(greedy=True, max_new_tokens=tokens)
    )
    answer.read()
    rec = answer.record
    rss_e, anon_e, file_e = _smaps()
    positions = rec.context_used - len(rec.token_ids)
    return MemoryRun(
        config=config,
        load_s=round(load_s, 2),
        rss_load_gb=round(rss_l, 2),
        anon_load_gb=round(anon_l, 2),
        file_load_gb=round(file_l, 2),
        rss_end_gb=round(rss_e, 2),
        anon_end_gb=round(anon_e, 2),
        file_end_gb=round(file_e, 2),
        peak_gb=round(_peak(), 2),
        encode_ms=round(encode_ms, 1),
        prefill_positions=positions,
        prefill_per_s=round(positions / (rec.prefill_ms / 1000), 2) if rec.prefill_ms else 0.0,
        decode_tokens=len(rec.token_ids),
        decode_per_s=round(rec.decode_tokens_per_s, 2),
        backend=_backend_description(pipe),
    )


def _backend_description(pipe: Any) -> str:
    from owl_desktop.engine import llm

    describe = getattr(llm, "backends", None)
    try:
        return describe().summary() if describe is not None else ("GPU" if pipe.llm.gpu_offload else "CPU")
    except Exception:  # noqa: BLE001 - a label only
        return "CPU"


def read_bandwidth_gbs(nbytes: int, threads: int) -> float:
    """GB/s of a plain read of `nbytes` (best of 3), split over `threads` threads as decode is."""
    import numpy as np

    buf = np.ones(nbytes // 8, dtype=np.float64)
    chunks = np.array_split(buf, threads)

    def read(chunk: Any) -> None:
        float(chunk.sum())  # numpy releases the GIL: the threads read in parallel

    best = 0.0
    for _ in range(3):
        workers = [threading.Thread(target=read, args=(c,)) for c in chunks]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, buf.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def run(bundle: str, configs: list[str], tokens: int, llm: Any, image: Path) -> str:
    """`llm`: the LlmSettings every configuration starts from (threads, context, KV type, flash attention)."""
    from owl_desktop import bundle as bundle_mod
    from owl_desktop.engine.llm import physical_cores

    b = bundle_mod.load(bundle, verify=False)
    weights = b.files[bundle_mod.llm_filename(b.quant)].size
    n_threads = llm.n_threads or physical_cores()
    runs: list[MemoryRun] = []
    vision = b.files[bundle_mod.VISION_FILE].size
    lines = [f"bundle {b.id}: LLM {weights / 1e9:.2f} GB ({b.quant}), vision {vision / 1e9:.2f} GB"]
    for config in configs:
        kwargs = {"bundle": bundle, "config": config, "tokens": tokens, "llm": asdict(llm), "image": str(image)}
        try:
            runs.append(MemoryRun(**run_measurement(f"{__name__}:measure_one", kwargs)))
        except ChildFailed as exc:
            lines.append(f"{config}: failed ({exc})")
    bandwidth = read_bandwidth_gbs(weights, n_threads)
    lines.append(f"plain read of {weights / 1e9:.2f} GB with {n_threads} threads: {bandwidth:.1f} GB/s")
    if not runs:
        return "\n".join(lines)
    best_prefill = max(r.prefill_per_s for r in runs)
    best_decode = max(r.decode_per_s for r in runs)
    lowest_peak = min(r.peak_gb for r in runs)
    lines.append(
        f"{'configuration':<18} {'load s':>6} {'after load: RSS = anon + file GB':>33} {'peak GB':>8} "
        f"{'encode ms':>9} {'prefill pos/s':>14} {'decode tok/s':>13} {'of bw limit':>11}"
    )
    for r in runs:
        limit = bandwidth * 1e9 / weights  # tokens/s if every weight byte is read once per token at that speed
        lines.append(
            f"{r.config:<18} {r.load_s:>6.1f} {r.rss_load_gb:>11.2f} = {r.anon_load_gb:5.2f} + {r.file_load_gb:5.2f}"
            f"{'':>7} {r.peak_gb:>8.2f} {r.encode_ms:>9.0f} "
            f"{r.prefill_per_s:>7.1f} ({r.prefill_per_s / best_prefill:4.2f}x) "
            f"{r.decode_per_s:>6.2f} ({r.decode_per_s / best_decode:4.2f}x) {r.decode_per_s / limit:>10.2f}"
        )
    lines.append(
        f"ratios: prefill and decode against the best configuration of this run; peak against the lowest "
        f"({lowest_peak:.2f} GB); {runs[0].prefill_positions} prompt positions, {runs[0].decode_tokens} tokens; "
        f"context {llm.n_ctx}, KV {llm.kv_type}, flash attention {llm.flash_attn}; backend: {runs[0].backend}"
    )
    lines.append(_preflight_line(b, llm, runs))
    lines.append(json.dumps([asdict(r) for r in runs]))
    return "\n".join(lines)


def _preflight_line(b: Any, llm: Any, runs: list[MemoryRun]) -> str:
    """What "Fits this computer" and `models preflight` would have said for this bundle, against the peak measured."""
    from owl_desktop.hub.estimates import QUANT_ORDER, WINDOW_RUNTIME, ModelFacts, footprint

    if b.quant not in QUANT_ORDER:
        return f"preflight: no estimate for {b.quant}"
    fp = footprint(ModelFacts.from_config(b.config), b.quant, llm.n_ctx, llm.n_batch, llm.kv_type)
    engine = (fp.ram - WINDOW_RUNTIME) / 1e9  # the bench runs the engine without the window
    peak = min(r.peak_gb for r in runs)
    return (
        f"preflight estimate for this bundle without the window: {engine:.2f} GB "
        f"({engine / peak:.2f}x the lowest peak measured; with the window {fp.ram / 1e9:.2f} GB)"
    )
