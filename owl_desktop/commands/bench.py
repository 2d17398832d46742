"""`owl-desktop bench BENCHMARK`: speed and accuracy measurements, one sub-subcommand per benchmark.

To add one, write `register_<name>(benchmarks)` that adds a parser with a `func`, and list it in BENCHMARKS.
Heavy imports (torch, llama_cpp) happen inside the benchmark functions, so `owl-desktop --version` stays fast.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench",
        help="measure speed and accuracy of parts of the model",
        description="Benchmarks. Each reports its figures on stdout; none needs real weights unless it says so.",
    )
    benchmarks = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for register_benchmark in BENCHMARKS:
        register_benchmark(benchmarks)
    parser.set_defaults(func=lambda args: _print_help(parser))


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0


# -----------------------------------------------------------------------------------------------------------------
# bench vision


def register_vision(benchmarks: argparse._SubParsersAction) -> None:
    p = benchmarks.add_parser(
        "vision",
        help="full-size ViT-L/14 + abstractor (random weights): ms per image in each dtype, accuracy vs fp32",
        description=(
            "Builds the full-size mPLUG-Owl v1 vision tower (ViT-L/14, 24 layers; abstractor, 6 layers; 4096-wide "
            "output) with random weights of the real shapes and times VisionEncoder.encode in each dtype the device "
            "offers, at each batch size. Reports the largest output difference of each dtype against fp32 and the "
            "dtype the default settings choose. Leaves torch's thread count alone unless --threads is given. "
            "With --family ureader: the encode time of a full 20-crop document (one batch of 21 views) against the "
            "same 20 crops as separate images and against one mPLUG-Owl image, in one dtype (the first of --dtypes, "
            "else the default)."
        ),
    )
    p.add_argument("--family", choices=("mplug-owl", "ureader"), default="mplug-owl", help="default: mplug-owl")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtypes", nargs="+", choices=("fp32", "fp16", "bf16"), help="dtypes to time (default: offered)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4], metavar="B", help="default: 1 4")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case after one warm-up run (default 3)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the CPU (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_vision)


def offered_dtypes(device: Any) -> list[str]:
    """fp32 everywhere; bf16 on the CPU; fp16 on GPUs (and bf16 on CUDA GPUs that support it)."""
    import torch

    if device.type == "cuda":
        return ["fp32", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    if device.type == "mps":
        return ["fp32", "fp16"]
    return ["fp32", "bf16"]


def run_vision(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from owl_desktop.engine import vision
    from owl_desktop.model_config import OwlConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.family == "ureader":
        from owl_desktop.engine import crop_bench

        dtype = args.dtypes[0] if args.dtypes else "auto"
        print(crop_bench.run(args.device, dtype, repeats=args.repeats, seed=args.seed).report())
        return 0
    device = vision.select_device(args.device)
    default_dtype = vision.dtype_name(vision.select_dtype(device, "auto"))
    dtypes = args.dtypes or offered_dtypes(device)
    if "fp32" not in dtypes:
        dtypes = ["fp32", *dtypes]  # the baseline for speed ratios and output differences
    batch_sizes = sorted({b for b in args.batch_sizes if b > 0}) or [1]

    cfg = OwlConfig()
    v, a = cfg.vision, cfg.abstractor
    print(
        f"vision tower: ViT {v.hidden_size}/{v.intermediate_size}, {v.num_hidden_layers} layers, "
        f"{v.num_attention_heads} heads, {v.num_positions} tokens; abstractor {a.hidden_size}/{a.intermediate_size}, "
        f"{a.num_hidden_layers} layers; output [B, {cfg.image_rows}, {cfg.text.hidden_size}]; random weights"
    )
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    if device.type == "cpu":
        where += (
            f" ({torch.backends.cpu.get_cpu_capability()}, native bf16: "
            f"{'yes' if vision.cpu_has_native_bf16() else 'no'}, {torch.get_num_threads()} threads)"
        )
    print(f"device: {where}; the default settings choose {default_dtype}")

    t0 = time.perf_counter()
    with torch.device("meta"):
        model = vision.OwlVision(cfg)
    model.to_empty(device="cpu")
    vision.init_random_(model, seed=args.seed)
    state = model.state_dict()
    del model
    n_params = sum(t.numel() for t in state.values())
    print(f"built {n_params / 1e6:.1f} M random parameters in {time.perf_counter() - t0:.1f} s")
    g = torch.Generator().manual_seed(args.seed + 1)
    pixels = torch.randn(max(batch_sizes), 3, v.image_size, v.image_size, generator=g)  # CLIP-normalised scale

    encoders = {name: vision.VisionEncoder.from_state_dict(state, cfg, str(device), name) for name in dtypes}
    cases = [(name, b) for name in dtypes for b in batch_sizes]
    outputs = {name: enc.encode(pixels) for name, enc in encoders.items()}  # also the warm-up run of each dtype
    for name, b in cases:
        encoders[name].encode(pixels[:b], batch_size=b)  # warm-up of each shape
    # Round-robin over the cases, so that a burst of load from other processes hits every case alike.
    times: dict[tuple[str, int], list[float]] = {case: [] for case in cases}
    for _ in range(max(1, args.repeats)):
        for name, b in cases:
            t = time.perf_counter()
            encoders[name].encode(pixels[:b], batch_size=b)
            times[name, b].append((time.perf_counter() - t) * 1000 / b)
    del encoders
    ms = {case: statistics.median(ts) for case, ts in times.items()}

    print(f"\n{'dtype':<6} {'batch':>5} {'ms/image':>10} {'(min)':>8} {'vs fp32':>8}   (median of {args.repeats} runs)")
    for name, b in cases:
        ratio = ms["fp32", b] / ms[name, b]
        print(f"{name:<6} {b:>5} {ms[name, b]:>10.1f} {min(times[name, b]):>8.1f} {ratio:>7.2f}x")

    ref = outputs["fp32"]
    print(f"\naccuracy on {len(pixels)} images vs fp32 (max |fp32 output| = {np.abs(ref).max():.3f}):")
    print(f"{'dtype':<6} {'max |Δ|':>10} {'rel RMS Δ':>10} {'min cos':>10}")
    for name, out in outputs.items():
        diff = out - ref
        cos = (out * ref).sum(-1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1))
        rel = np.linalg.norm(diff) / np.linalg.norm(ref)
        print(f"{name:<6} {np.abs(diff).max():>10.4f} {rel:>10.5f} {cos.min():>10.6f}")

    if default_dtype in dtypes:
        print(f"\ndefault settings ({device.type}, {default_dtype}):")
        for b in batch_sizes:
            speedup = ms["fp32", b] / ms[default_dtype, b]
            fp32 = ms["fp32", b]
            print(f"  batch {b}: {ms[default_dtype, b]:.1f} ms/image, {speedup:.2f}x fp32 ({fp32:.1f} ms/image)")
    return 0


# -----------------------------------------------------------------------------------------------------------------
# bench convert (the measurement lives in owl_desktop/convert/bench.py)


def register_convert(benchmarks: argparse._SubParsersAction) -> None:
    p = benchmarks.add_parser(
        "convert",
        help="peak memory and time of converting a few-GB random checkpoint (per quantization)",
        description=(
            "Converts a random mPLUG-Owl checkpoint of a few GB (generated once into the cache dir) in a child "
            "process per quantization while sampling its memory; reports peak RSS, anonymous and file-backed RSS, "
            "their ratios to the checkpoint's size, ru_maxrss and the time."
        ),
    )
    p.add_argument("--quants", nargs="+", default=["Q4_K_M", "F16"], type=str.upper, metavar="Q")
    p.add_argument("--compare-pages", action="store_true", help="also convert without releasing checkpoint pages")
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from owl_desktop.convert.bench import run_bench

    print(run_bench(args.quants, compare_pages=args.compare_pages))
    return 0


# -----------------------------------------------------------------------------------------------------------------
# bench engine (the measurement lives in owl_desktop/engine/bench.py)


def register_engine(benchmarks: argparse._SubParsersAction) -> None:

    p = benchmarks.add_parser(
        "engine",
        help="encode, prefill, time to first token, decode vs llama_cpp.Llama, follow-up turns (one bundle)",
        description=(
            "Runs one bundle through the engine: image encode cold and cached, prefill rate and time to first "
            "token for one image + a question, decode tokens/s against llama-cpp-python's own Llama class on the "
            "same GGUF and threads, and a short follow-up turn (KV reused) against a from-scratch prefill."
        ),
    )
    _add_bundle_run_flags(p)
    p.set_defaults(func=run_engine)


def _add_bundle_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags of the benchmarks that ask one bundle one image question (engine, serve)."""
    from owl_desktop.commands.engine_args import add_engine_flags

    p.add_argument("--model", metavar="BUNDLE", help="bundle folder or id (default: the demo's tiny random bundle)")
    p.add_argument("--image", type=Path, metavar="PATH", help="image to ask about (default: the demo picture)")
    p.add_argument("--decode-tokens", type=int, default=64, metavar="N")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print the figures as JSON too")
    add_engine_flags(p)


def _run_bundle_bench(args: argparse.Namespace, bench: Any) -> int:
    """Run `bench.run(model, settings, image, ...)` and print its report (and JSON with --json)."""

    from owl_desktop.commands.engine_args import engine_settings
    from owl_desktop.devtools.demo import demo_image, ensure_demo_bundle

    model = args.model or ensure_demo_bundle()
    result = bench.run(
        model, engine_settings(args), args.image or demo_image(), decode_tokens=args.decode_tokens, repeats=args.repeats
    )
    return _print_result(model, result, bench.as_dict, args.json)


def _print_result(model: Any, result: Any, as_dict: Callable[[Any], Any], as_json: bool) -> int:
    """A bundle benchmark's output: the model, its report, then (`--json`) its figures as one JSON line."""
    import json

    print(f"model: {model}")
    print(result.report())
    if as_json:
        print(json.dumps(as_dict(result)))
    return 0


def run_engine(args: argparse.Namespace) -> int:
    from owl_desktop.engine import bench

    return _run_bundle_bench(args, bench)


# -----------------------------------------------------------------------------------------------------------------
# bench memory (the measurement lives in owl_desktop/engine/bench_memory.py)


def register_memory(benchmarks: argparse._SubParsersAction) -> None:
    from owl_desktop.commands.engine_args import add_engine_flags

    p = benchmarks.add_parser(
        "memory",
        help="peak RSS (anonymous / file-backed), load, encode, prefill, decode per way of holding the weights",
        description=(
            "Runs one bundle from load through a greedy answer once per configuration, each in a fresh process: "
            "the GGUF memory-mapped or read, llama.cpp's repacked CPU weights on or off. Prints RSS after load and "
            "at the end split into anonymous and file-backed memory, peak RSS, load time, encode, prefill and "
            "decode, each against the best configuration of the same run, and decode against the memory-bandwidth "
            "limit measured in the same run. Meant for the 7B-shaped bundle (dev make-checkpoint --preset 7b)."
        ),
    )
    p.add_argument("--model", metavar="BUNDLE", help="bundle folder or id (default: the demo's tiny random bundle)")
    p.add_argument("--image", type=Path, metavar="PATH", help="image to ask about (default: the demo picture)")
    p.add_argument("--tokens", type=int, default=256, metavar="N", help="tokens to generate (default: 256)")
    p.add_argument("--configs", nargs="+", metavar="NAME", help="configurations to run (default: all four)")
    add_engine_flags(p)
    p.set_defaults(func=run_memory)


def run_memory(args: argparse.Namespace) -> int:
    from owl_desktop.commands.engine_args import engine_settings
    from owl_desktop.devtools.demo import demo_image, ensure_demo_bundle
    from owl_desktop.engine import bench_memory

    configs = args.configs or list(bench_memory.CONFIGS)
    unknown = [c for c in configs if c not in bench_memory.CONFIGS]
    if unknown:
        print(f"unknown configuration {unknown[0]!r}; choose from: {', '.join(bench_memory.CONFIGS)}")
        return 2
    model = str(args.model or ensure_demo_bundle())
    llm = engine_settings(args).llm
    print(bench_memory.run(model, configs, args.tokens, llm, args.image or demo_image()))
    return 0


# -----------------------------------------------------------------------------------------------------------------
# bench variants (the measurement lives in owl_desktop/engine/variant_bench.py)


def register_variants(benchmarks: argparse._SubParsersAction) -> None:
    from owl_desktop.engine.variant_bench import REPACK_CHOICES

    p = benchmarks.add_parser(
        "variants",
        help="llama.cpp's CPU variants (AVX-512, AVX2, ...) and repacked weights: load, prefill, decode",
        description=(
            "Runs one bundle's GGUF through the engine on the CPU once per configuration, each in a fresh process "
            "(llama.cpp's CPU variant is chosen once per process): load, then, best of N, a prefill of random token "
            "ids (fixed seed) and a greedy decode. Each figure is set against the automatically picked variant "
            "without repacked weights, measured in the same run, and the fastest configuration for prefill and for "
            "decode is named. By default: the automatic variant with and without repacking, and without repacking "
            "the best AVX-512 variant, haswell (AVX2) and x64 where this computer runs them. Variants that cannot "
            "run here are reported as skipped."
        ),
    )
    p.add_argument("--model", metavar="BUNDLE", help="bundle folder or id (default: the demo's tiny random bundle)")
    p.add_argument("--variants", nargs="+", metavar="NAME", help="CPU variants to compare (default: see above)")
    p.add_argument(
        "--repack",
        choices=REPACK_CHOICES,
        help="repacked weights for every variant (default: both for the automatic variant, off for the others)",
    )
    p.add_argument("--positions", type=int, default=128, metavar="N", help="prefill positions (default: 128)")
    p.add_argument("--tokens", type=int, default=32, metavar="N", help="greedy decode tokens (default: 32)")
    p.add_argument("--repeats", type=int, default=2, help="best of N prefills and decodes per process (default: 2)")
    p.add_argument("--threads", type=int, metavar="N", help="LLM threads (default: physical cores)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON too")
    p.set_defaults(func=run_variants)


def run_variants(args: argparse.Namespace) -> int:

    from owl_desktop.devtools.demo import ensure_demo_bundle
    from owl_desktop.engine import variant_bench

    model = str(args.model or ensure_demo_bundle())
    try:
        result = variant_bench.run(
            model,
            args.variants,
            args.repack,
            positions=args.positions,
            tokens=args.tokens,
            repeats=args.repeats,
            threads=args.threads,
        )
    except ValueError as exc:
        print(exc)
        return 2
    return _print_result(model, result, variant_bench.as_dict, args.json)


# -----------------------------------------------------------------------------------------------------------------
# bench serve (the measurement lives in owl_desktop/server/bench.py)


def register_serve(benchmarks: argparse._SubParsersAction) -> None:

    p = benchmarks.add_parser(
        "serve",
        help="the local API against the engine directly: first token, decode, follow-ups, disconnects",
        description=(
            "Runs the API server in this process on a free loopback port and sends it streamed greedy requests "
            "over a real socket: time to first token and decode tokens/s against the same question through the "
            "engine directly, a follow-up request (KV prefix reused) against the same request from scratch, and "
            "how soon the engine is free after a client leaves mid-answer."
        ),
    )
    _add_bundle_run_flags(p)
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from owl_desktop.server import bench

    return _run_bundle_bench(args, bench)


# -----------------------------------------------------------------------------------------------------------------
# bench latency (the measurement lives in owl_desktop/engine/latency_bench.py)


def register_latency(benchmarks: argparse._SubParsersAction) -> None:
    from owl_desktop.commands.engine_args import add_engine_flags

    p = benchmarks.add_parser(
        "latency",
        help="first token after Enter: work ahead, cached system prompt, warm start, overflowed conversations",
        description=(
            "Time from Enter to the first token with the image attached 0, 2 and 5 s earlier (the engine works "
            "ahead meanwhile) against the same question sent cold; a new chat with the system prompt cached at load "
            "against without; the first encode after a load against a steady one; turn T of a conversation that "
            "overflowed the context against turn 2. Ratios are against baselines measured in the same run."
        ),
    )
    p.add_argument("--model", metavar="BUNDLE", help="bundle folder or id (default: the demo's tiny random bundle)")
    p.add_argument("--image", type=Path, metavar="PATH", help="image to ask about (default: the demo picture)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--turns", type=int, default=30, help="turns of the long conversation (default 30)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON too")
    add_engine_flags(p)
    p.set_defaults(func=run_latency)


def run_latency(args: argparse.Namespace) -> int:

    from owl_desktop.commands.engine_args import engine_settings
    from owl_desktop.devtools.demo import demo_image, ensure_demo_bundle
    from owl_desktop.engine import latency_bench

    model = args.model or ensure_demo_bundle()
    result = latency_bench.run(
        model, engine_settings(args), args.image or demo_image(), repeats=args.repeats, turns=args.turns
    )
    return _print_result(model, result, latency_bench.as_dict, args.json)


# -----------------------------------------------------------------------------------------------------------------
# bench gui-stall (the measurement lives in owl_desktop/gui/stall_bench.py)


def register_gui_stall(benchmarks: argparse._SubParsersAction) -> None:
    p = benchmarks.add_parser(
        "gui-stall",
        help="the window's longest event-loop stall: background prefill, streaming, a long conversation, a download",
        description=(
            "Opens the window on a throw-away data folder and measures, with a 5 ms timer probe, the longest the "
            "event loop stalls while the engine works ahead on attached images, while a 500-token answer streams "
            "(against the same stream re-rendered whole at every flush), while a 50-turn conversation with 20 "
            "images is opened and scrolled, and while a model download runs (from a hub the bench starts on "
            "127.0.0.1; nothing leaves this computer)."
        ),
    )
    p.add_argument("--model", metavar="BUNDLE", help="bundle folder (default: the demo's tiny random bundle)")
    p.add_argument("--tokens-per-s", type=float, default=25.0, help="pace of the streamed answer (default 25)")
    p.add_argument(
        "--download-mb", type=int, default=300, help="size of the download served on 127.0.0.1 (default 300)"
    )
    p.set_defaults(func=run_gui_stall)


def run_gui_stall(args: argparse.Namespace) -> int:
    from owl_desktop import bundle as bundle_mod
    from owl_desktop.devtools.demo import ensure_demo_bundle
    from owl_desktop.gui import stall_bench

    model = bundle_mod.resolve(args.model) if args.model else ensure_demo_bundle()
    print(f"model: {model}")
    print(stall_bench.run(Path(model), args.tokens_per_s, args.download_mb).report())
    return 0


BENCHMARKS: list[Callable[[argparse._SubParsersAction], None]] = [
    register_vision,
    register_convert,
    register_engine,
    register_memory,
    register_variants,
    register_serve,
    register_latency,
    register_gui_stall,
]
