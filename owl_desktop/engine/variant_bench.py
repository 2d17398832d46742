"""`owl-desktop bench variants`: llama.cpp's CPU variants and repacked weights compared on one bundle's GGUF.

llama.cpp picks its CPU code once per process (llm_backends.py: the best variant this computer runs, or the one
OWL_LLAMA_CPU_VARIANT forces), so each configuration (variant × repacked weights on or off) runs in a fresh child
through our LlamaEngine on the CPU: load the GGUF, then, best of N, prefill the same random token ids of the model's
vocabulary (fixed seed) and decode greedily. Every figure is set against the configuration a user gets by default,
the automatically picked variant without repacking, measured in the same run; the report ends with the fastest
configuration for prefill and for decode (issue 15: the choice may differ per phase, and per variant).

By default: the automatic variant (with and without repacking) and, without repacking, a lower set among the
runnable ones: the best AVX-512 variant without AMX, haswell (AVX2), x64 (no SIMD beyond SSE2). A forced variant
that is not in the build or that this computer cannot run is reported as skipped, with the reason.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from owl_desktop.engine.bench_child import ChildFailed, run_measurement
from owl_desktop.engine.llm_backends import CPU_VARIANT_ENV, LlamaBackends

REPACK_CHOICES = ("both", "on", "off")
# ggml's x86 CPU variants with AVX-512 and without AMX (ggml/src/CMakeLists.txt), for the default lower set
_AVX512_VARIANTS = frozenset({"skylakex", "cannonlake", "cascadelake", "icelake", "cooperlake", "zen4"})
_LOWER_VARIANTS = ("haswell", "x64")  # AVX2; none
_CHILD_TIMEOUT_S = 3600.0  # a 7B load with repacking on a slow machine takes minutes; a hung child must not block


@dataclass
class VariantRun:
    variant: str
    repack: bool
    automatic: bool = False  # the variant picked without OWL_LLAMA_CPU_VARIANT
    features: list[str] = field(default_factory=list)  # the instruction sets its code uses (LlamaBackends.cpu_isa)
    load_s: float = 0.0
    prefill_per_s: float = 0.0
    decode_per_s: float = 0.0
    decode_tokens: int = 0  # fewer than asked where greedy decoding reached end-of-text
    prefill_ratio: float | None = None  # against the baseline of the same run
    decode_ratio: float | None = None
    skipped: str = ""  # why it was not measured

    @property
    def label(self) -> str:
        return f"{self.variant}{' (auto)' if self.automatic else ''}, repack {'on' if self.repack else 'off'}"


@dataclass
class VariantBench:
    bundle: str
    quant: str
    gguf_gb: float
    positions: int
    tokens: int
    repeats: int
    threads: int
    seed: int
    settings: str  # context, KV cache type, flash attention
    runs: list[VariantRun]  # the baseline first

    @property
    def measured(self) -> list[VariantRun]:
        return [r for r in self.runs if not r.skipped]

    def fastest(self, phase: str) -> VariantRun | None:
        """The configuration with the highest "prefill" or "decode" rate, or None if nothing was measured."""
        return max(self.measured, key=lambda r: getattr(r, f"{phase}_per_s"), default=None)

    def report(self) -> str:
        lines = [
            f"bundle {self.bundle}: GGUF {self.gguf_gb:.2f} GB ({self.quant}); {self.positions} random prompt "
            f"positions (seed {self.seed}), {self.tokens} greedy tokens, best of {self.repeats}, {self.threads} "
            f"threads, {self.settings}",
            f"{'variant':<22} {'repack':>6} {'load s':>7} {'prefill pos/s':>17} {'decode tok/s':>17}  instruction sets",
        ]
        for r in self.runs:
            name = r.variant + (" (auto)" if r.automatic else "")
            repack = "on" if r.repack else "off"
            if r.skipped:
                lines.append(f"{name:<22} {repack:>6}  skipped: {r.skipped}")
                continue
            lines.append(
                f"{name:<22} {repack:>6} {r.load_s:>7.2f} {r.prefill_per_s:>9.1f} ({_ratio(r.prefill_ratio)}) "
                f"{r.decode_per_s:>9.2f} ({_ratio(r.decode_ratio)})  {' '.join(r.features) or '-'}"
            )
        base = self.runs[0]
        lines.append(f"ratios against {base.label}, measured in this run")
        prefill, decode = self.fastest("prefill"), self.fastest("decode")
        if prefill is not None and decode is not None:
            lines.append(
                f"fastest: prefill {prefill.label} ({_ratio(prefill.prefill_ratio).strip()}); "
                f"decode {decode.label} ({_ratio(decode.decode_ratio).strip()})"
            )
        short = [r for r in self.measured if r.decode_tokens < self.tokens]
        if short:
            lines.append(
                "greedy decoding reached end-of-text early in: "
                + ", ".join(f"{r.label} ({r.decode_tokens} tokens)" for r in short)
                + "; their decode rate covers the tokens decoded"
            )
        return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return f"{value:5.2f}x" if value is not None else "  n/a"


def as_dict(b: VariantBench) -> dict[str, Any]:
    fastest = {phase: (r.label if (r := b.fastest(phase)) else None) for phase in ("prefill", "decode")}
    return {**asdict(b), "fastest": fastest}


def default_variants(info: LlamaBackends) -> list[str]:
    """The automatic variant and a representative lower set of the runnable ones, best first."""
    auto = info.automatic_variant
    runnable = info.runnable_variants
    chosen = [auto]
    best_avx512 = next((v for v in runnable if v in _AVX512_VARIANTS), None)  # runnable is best first
    for v in (best_avx512, *_LOWER_VARIANTS):
        if v is not None and v in runnable and v not in chosen:
            chosen.append(v)
    if len(chosen) == 1 and len(runnable) > 1:  # a build with other names (e.g. ARM): the lowest one
        chosen.append(runnable[-1])
    return chosen


def configurations(info: LlamaBackends, variants: list[str], repack: str | None) -> list[tuple[str, bool]]:
    """(variant, repack) pairs in order, the baseline (automatic variant, no repacking) first.

    `repack`: "both", "on" or "off" for every variant; None: both for the automatic variant, off for the others.
    """
    auto = info.automatic_variant
    pairs = [(auto, False)]
    for v in variants:
        choice = repack or ("both" if v == auto else "off")
        for on in {"both": (False, True), "on": (True,), "off": (False,)}[choice]:
            if (v, on) not in pairs:
                pairs.append((v, on))
    return pairs


def skip_reason(info: LlamaBackends, variant: str) -> str:
    """Why a forced variant cannot be measured here, or "" when it can."""
    if variant == info.automatic_variant:
        return ""
    if not info.cpu_variants or info.cpu_variant == "built-in":
        return "this llama.cpp build has no run-time CPU variants (its CPU code is built in)"
    if variant not in info.cpu_variants:
        return f"not in this llama.cpp build (it has {', '.join(info.cpu_variants)})"
    if variant not in info.runnable_variants:
        return f"this computer cannot run it (it runs {', '.join(info.runnable_variants)})"
    return ""


def measure(
    gguf: str, repack: bool, positions: int, tokens: int, repeats: int, llm: dict[str, Any], seed: int
) -> VariantRun:
    """Child-process body: load `gguf` with these LlmSettings fields, then prefill and decode, best of `repeats`."""
    import time

    import numpy as np

    from owl_desktop.engine.llm import GenerationStats, LlamaEngine, Tokens, backends
    from owl_desktop.engine.options import LlmSettings, Sampling

    info = backends()  # before the clock: the load time is the model's alone
    t0 = time.perf_counter()
    engine = LlamaEngine(Path(gguf), LlmSettings(**{**llm, "repack": repack}))
    load_s = time.perf_counter() - t0
    ids = np.random.default_rng(seed).integers(0, engine.n_vocab, positions).tolist()  # [positions]
    prefill, decode, decoded = 0.0, 0.0, tokens
    try:
        for _ in range(repeats):
            engine.reset()  # the whole prompt is prefilled each time
            stats = GenerationStats()
            for _piece in engine.generate([Tokens(ids)], Sampling(greedy=True, max_new_tokens=tokens), stats):
                pass
            prefill = max(prefill, positions / (stats.prefill_ms / 1000))
            decode = max(decode, stats.decode_tokens_per_s)
            decoded = min(decoded, stats.decode_tokens)
    finally:
        engine.close()
    return VariantRun(
        variant=info.cpu_variant,
        repack=repack,
        automatic=info.cpu_variant == info.automatic_variant,
        features=list(info.cpu_isa),
        load_s=round(load_s, 3),
        prefill_per_s=round(prefill, 2),
        decode_per_s=round(decode, 2),
        decode_tokens=decoded,
    )


def run(
    bundle: str,
    variants: list[str] | None = None,
    repack: str | None = None,
    *,
    positions: int = 128,
    tokens: int = 32,
    repeats: int = 2,
    threads: int | None = None,
    seed: int = 0,
) -> VariantBench:
    """Measure each configuration of `variants` (default: default_variants) in its own process; see the module
    docstring. Raises ValueError for counts below 1 or repack not in REPACK_CHOICES."""
    from owl_desktop import bundle as bundle_mod
    from owl_desktop.engine.llm import backends, physical_cores
    from owl_desktop.engine.options import LlmSettings

    if min(positions, tokens, repeats) < 1 or (threads is not None and threads < 1):
        raise ValueError("positions, tokens, repeats and threads must be at least 1")
    if repack is not None and repack not in REPACK_CHOICES:
        raise ValueError(f"repack must be one of {', '.join(REPACK_CHOICES)}, not {repack!r}")
    b = bundle_mod.load(bundle, verify=False)
    info = backends()
    defaults = LlmSettings()
    n_threads = threads or physical_cores()
    # CPU only (the variants are what is compared), in a context the app's size or larger if the run needs it
    llm = replace(defaults, n_ctx=max(defaults.n_ctx, positions + tokens + 1), n_threads=n_threads, n_gpu_layers=0)
    kwargs = {"gguf": str(b.llm_path), "positions": positions, "tokens": tokens, "repeats": repeats, "seed": seed}
    runs: list[VariantRun] = []
    for variant, on in configurations(info, variants or default_variants(info), repack):
        reason = skip_reason(info, variant)
        if not reason:
            env = {k: v for k, v in os.environ.items() if k != CPU_VARIANT_ENV}
            if variant != info.automatic_variant:
                env[CPU_VARIANT_ENV] = variant
            try:
                target = f"{__name__}:measure"
                fields = run_measurement(target, {**kwargs, "repack": on, "llm": asdict(llm)}, env, _CHILD_TIMEOUT_S)
                runs.append(VariantRun(**fields))
                continue
            except ChildFailed as exc:
                reason = f"failed ({exc})"
        runs.append(VariantRun(variant=variant, repack=on, automatic=variant == info.automatic_variant, skipped=reason))
    base = runs[0]
    if not base.skipped:
        runs = [
            replace(
                r,
                prefill_ratio=round(r.prefill_per_s / base.prefill_per_s, 3) if base.prefill_per_s else None,
                decode_ratio=round(r.decode_per_s / base.decode_per_s, 3) if base.decode_per_s else None,
            )
            if not r.skipped
            else r
            for r in runs
        ]
    return VariantBench(
        bundle=b.id,
        quant=b.quant,
        gguf_gb=round(b.files[bundle_mod.llm_filename(b.quant)].size / 1e9, 3),
        positions=positions,
        tokens=tokens,
        repeats=repeats,
        threads=n_threads,
        seed=seed,
        settings=f"context {llm.n_ctx}, KV {llm.kv_type}, flash attention {llm.flash_attn}",
        runs=runs,
    )
