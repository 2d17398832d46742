"""llama.cpp's backends: the CPU variant picked for this machine, forced lower variants, and Vulkan via lavapipe.

Each forced variant and the Vulkan run happen in a child process (`owl-desktop ask --json`): a process loads its
backends once. The answers are compared with this process's own, token for token (greedy).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from owl_desktop.cli import main as cli_main
from owl_desktop.convert.converter import convert_checkpoint
from owl_desktop.devtools.tiny_checkpoint import make_checkpoint
from owl_desktop.engine.llm import backends
from owl_desktop.engine.llm_backends import CPU_VARIANT_ENV, GPU_DEVICE_NODES, NO_GPU_NODE, lib_dir

# ggml's x86 CPU variants (ggml/src/CMakeLists.txt) and the /proc/cpuinfo flags each one's code needs.
_HASWELL = {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2"}
_AVX512 = _HASWELL | {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}
X86_VARIANTS = {
    "x64": set(),
    "sse42": {"sse4_2"},
    "sandybridge": {"sse4_2", "avx"},
    "ivybridge": {"sse4_2", "avx", "f16c"},
    "piledriver": {"sse4_2", "avx", "f16c", "fma"},
    "haswell": _HASWELL,
    "skylakex": _AVX512,
    "cannonlake": _AVX512 | {"avx512vbmi"},
    "cascadelake": _AVX512 | {"avx512_vnni"},
    "icelake": _AVX512 | {"avx512vbmi", "avx512_vnni"},
    "cooperlake": _AVX512 | {"avx512_vnni", "avx512_bf16"},
    "zen4": _AVX512 | {"avx512vbmi", "avx512_vnni", "avx512_bf16"},
    "alderlake": _HASWELL | {"avx_vnni"},
    "sapphirerapids": _AVX512 | {"avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"},
}
LAVAPIPE_ICDS = list(Path("/usr/share/vulkan/icd.d").glob("lvp_icd*.json"))
dispatching = pytest.mark.skipif(
    backends().cpu_variant == "built-in", reason="llama.cpp was built without run-time CPU dispatch"
)
EXACT_FLAGS = ["--greedy", "--max-new-tokens", "12", "--flash-attn", "off", "--kv-type", "f32", "--threads", "2"]


def kernel_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    raise AssertionError("no flags line in /proc/cpuinfo")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("backends")
    ckpt = make_checkpoint(root / "ckpt", "bin", preset="tiny", seed=0)
    image = root / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 320, 3), dtype=np.uint8)).save(image)
    return {
        "f32": convert_checkpoint(ckpt, root / "bundle-f32", quant="F32"),
        "f16": convert_checkpoint(ckpt, root / "bundle-f16", quant="F16"),
        "image": image,
    }


def ask_args(bundle: Path, image: Path, *extra: str) -> list[str]:
    return ["ask", "--model", str(bundle), "--image", str(image), *EXACT_FLAGS, *extra, "--json", "What is this?"]


def ask_here(capsys: pytest.CaptureFixture[str], args: list[str]) -> dict[str, object]:
    assert cli_main(args) == 0
    return json.loads(capsys.readouterr().out)


def ask_in_child(args: list[str], **env: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-m", "owl_desktop", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@dispatching
def test_the_build_carries_every_cpu_variant_and_vulkan() -> None:
    names = {p.name for p in lib_dir().iterdir()}
    if sys.platform.startswith("linux") and os.uname().machine == "x86_64":
        assert {f"libggml-cpu-{v}.so" for v in X86_VARIANTS} <= names
        assert set(backends().cpu_variants) == set(X86_VARIANTS)
        if shutil.which("glslc") is None:  # install-llama-cpp builds CPU-only without the Vulkan build tools
            pytest.skip("no Vulkan build tools here (libvulkan-dev, glslc, spirv-headers): a CPU-only build")
        assert "libggml-vulkan.so" in names
        info = backends()
        if any(glob.glob(pattern) for pattern in GPU_DEVICE_NODES):
            assert "Vulkan" in info.gpu_backends  # loaded, with or without a device
        else:  # no GPU here: the module is left unloaded (no Vulkan loader, drivers, LLVM mapped), and says why
            assert ("vulkan", NO_GPU_NODE) in info.unavailable and "vulkan: no GPU on this computer" in info.summary()


@dispatching
@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the kernel's CPU flags")
def test_the_best_variant_this_kernel_runs_is_chosen() -> None:
    info = backends()
    flags = kernel_flags()
    runnable = {v for v, needs in X86_VARIANTS.items() if needs <= flags}
    print(f"\nCPU variant: {info.cpu_variant}; runnable here: {', '.join(info.runnable_variants)}")
    print(f"llama.cpp: {info.summary()}")
    assert set(info.runnable_variants) == runnable
    assert info.cpu_variant == info.runnable_variants[0]
    # nothing runnable does strictly more than the chosen one
    chosen = X86_VARIANTS[info.cpu_variant]
    assert not [v for v in runnable if X86_VARIANTS[v] > chosen]
    # the AMX variant only where the kernel enables AMX (a CPU may report AMX that the hypervisor keeps off)
    if not {"amx_tile", "amx_int8"} <= flags:
        assert "sapphirerapids" not in info.runnable_variants
    if {"avx512_bf16", "avx512vbmi", "avx512_vnni"} <= flags and "amx_int8" not in flags:
        assert info.cpu_variant == "zen4"  # this project's machines (AMD EPYC, Zen 4)


@dispatching
@pytest.mark.parametrize("variant", ["haswell", "x64"])
def test_a_forced_lower_variant_answers_identically(
    variant: str, tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    info = backends()
    if variant not in info.runnable_variants or variant == info.cpu_variant:
        pytest.skip(f"{variant} is not a lower variant this machine runs (best: {info.cpu_variant})")
    args = ask_args(tiny["f32"], tiny["image"])
    here = ask_here(capsys, args)
    there = ask_in_child(args, **{CPU_VARIANT_ENV: variant})
    assert here["llm_device"] == f"CPU {info.cpu_variant}"
    assert there["llm_device"] == f"CPU {variant}"
    assert len(here["token_ids"]) == 12
    assert there["token_ids"] == here["token_ids"]


@dispatching
@pytest.mark.parametrize(
    ("variant", "message"),
    [("no-such-cpu", "this llama.cpp build has"), ("sapphirerapids", "cannot run on this computer; it can run")],
)
def test_a_variant_this_computer_cannot_use_is_a_clear_error(variant: str, message: str) -> None:
    if variant in backends().runnable_variants:
        pytest.skip(f"this computer runs {variant}")
    proc = subprocess.run(
        [sys.executable, "-m", "owl_desktop", "--version"],
        env={**os.environ, CPU_VARIANT_ENV: variant},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("owl-desktop ")
    assert lines[1].startswith(f"llama.cpp: unavailable ({CPU_VARIANT_ENV}={variant}")
    assert message in lines[1]


def test_version_names_the_cpu_variant_and_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("owl-desktop ")
    assert out[1] == f"llama.cpp: {backends().summary()}"
    assert out[1].startswith(f"llama.cpp: CPU {backends().cpu_variant}") and "GPU" in out[1]


@dispatching
@pytest.mark.skipif(not LAVAPIPE_ICDS, reason="Mesa's software Vulkan driver (mesa-vulkan-drivers) is not installed")
def test_vulkan_through_lavapipe_gives_the_cpu_greedy_tokens(
    tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """ggml's Vulkan backend skips CPU-type devices unless GGML_VK_VISIBLE_DEVICES names them: in this process
    (no variable) the model runs on the CPU; in the child, on lavapipe."""
    args = ask_args(tiny["f16"], tiny["image"])
    here = ask_here(capsys, args)
    there = ask_in_child(args, GGML_VK_VISIBLE_DEVICES="0", VK_ICD_FILENAMES=str(LAVAPIPE_ICDS[0]))
    assert here["llm_device"].startswith("CPU ")
    assert str(there["llm_device"]).startswith("Vulkan: llvmpipe")
    assert len(here["token_ids"]) == 12
    assert there["token_ids"] == here["token_ids"]


@dispatching
def test_bench_variants_sets_each_configuration_against_the_automatic_one(
    tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Structure, not speed: the baseline first, its ratios 1.00, a variant not in the build skipped with the reason."""
    info = backends()
    auto, lower = info.automatic_variant, info.runnable_variants[-1]
    if lower == auto:
        pytest.skip("this computer runs a single CPU variant")
    args = ["bench", "variants", "--model", str(tiny["f16"]), "--variants", auto, lower, "no-such-cpu"]
    assert cli_main([*args, "--positions", "8", "--tokens", "4", "--repeats", "1", "--threads", "2", "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    report = json.loads(out[-1])
    runs = report["runs"]
    assert [(r["variant"], r["repack"]) for r in runs] == [
        (auto, False),
        (auto, True),
        (lower, False),
        ("no-such-cpu", False),
    ]
    base, repacked, low, missing = runs
    assert base["automatic"] and repacked["automatic"] and not low["automatic"]
    assert (base["prefill_ratio"], base["decode_ratio"]) == (1.0, 1.0)
    assert base["features"] == list(info.cpu_isa) and set(low["features"]) < set(base["features"])
    for r in (base, repacked, low):
        assert not r["skipped"]
        assert r["load_s"] > 0 and r["prefill_per_s"] > 0 and r["decode_per_s"] > 0
        assert r["prefill_ratio"] == round(r["prefill_per_s"] / base["prefill_per_s"], 3)
        assert r["decode_ratio"] == round(r["decode_per_s"] / base["decode_per_s"], 3)
    assert missing["skipped"].startswith("not in this llama.cpp build")
    fastest = max((base, repacked, low), key=lambda r: r["prefill_per_s"])
    mark, repack = " (auto)" if fastest["automatic"] else "", "on" if fastest["repack"] else "off"
    assert report["fastest"]["prefill"] == f"{fastest['variant']}{mark}, repack {repack}"
    assert (report["positions"], report["tokens"], report["threads"]) == (8, 4, 2)
    text = "\n".join(out[:-1])
    assert f"{auto} (auto)" in text and "( 1.00x)" in text and "skipped: not in this llama.cpp build" in text
    assert "ratios against" in text and "fastest: prefill" in text


_MEMORY_SCRIPT = """
import json, sys
from owl_desktop.hub.preflight import system_memory
m = system_memory()
print(json.dumps({"gpu": m.gpu_name, "total": m.vram_total, "free": m.vram_free, "torch": "torch" in sys.modules}))
"""


def _memory_in_child(**env: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_the_preflight_sees_the_gpu_llama_cpp_offloads_to_without_importing_torch() -> None:
    """The models page's memory probe asks llama.cpp's backend, not torch (whose import held the GIL ~200 ms)."""
    here = _memory_in_child()
    gpu = backends().gpu
    assert here["torch"] is False
    assert here["gpu"] == (gpu.description if gpu is not None else None)
    if LAVAPIPE_ICDS and backends().cpu_variant != "built-in":  # a Vulkan device llama.cpp would offload to
        there = _memory_in_child(GGML_VK_VISIBLE_DEVICES="0", VK_ICD_FILENAMES=str(LAVAPIPE_ICDS[0]))
        assert there["torch"] is False
        assert str(there["gpu"]).startswith("llvmpipe")
        assert isinstance(there["total"], int) and there["total"] > 0
        assert isinstance(there["free"], int) and 0 < there["free"] <= there["total"]


WORK_AHEAD_CHILD = """
import json, sys, threading
from owl_desktop.engine.options import LlmSettings, Sampling
from owl_desktop.engine.pipeline import ChatPipeline, EngineSettings
from owl_desktop.tasks import CancelToken
bundle, image = sys.argv[1], sys.argv[2]
llm = LlmSettings(flash_attn="off", kv_type="f32", n_threads=2, n_batch=16)
pipe = ChatPipeline.open(bundle, EngineSettings(llm=llm, vision_dtype="float32", disk_cache=False))
full = pipe.prepare([image])
for delay in (0.002, 0.01, 0.03):  # the work ahead cancelled at different points of its prefill
    pipe.llm.reset()
    token = CancelToken()
    threading.Timer(delay, token.cancel).start()
    pipe.prepare([image], cancel=token)
last = pipe.prepare([image])
answer = pipe.ask([image], "What is this?", sampling=Sampling(greedy=True, max_new_tokens=12))
answer.read()
print(json.dumps({"device": pipe.llm.device, "ahead": last.positions, "full": full.positions,
                  "reused": answer.record.reused_positions, "tokens": answer.record.token_ids}))
"""


@dispatching
@pytest.mark.skipif(not LAVAPIPE_ICDS, reason="Mesa's software Vulkan driver (mesa-vulkan-drivers) is not installed")
def test_work_ahead_on_vulkan_stops_between_batches_and_gives_the_cpu_tokens(
    tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """On a GPU backend the work ahead prefills too; a cancel stops it between batches (never inside a graph, which
    crashed Vulkan), and the answer that reuses it equals the CPU's greedy tokens."""
    here = ask_here(capsys, ask_args(tiny["f16"], tiny["image"]))
    proc = subprocess.run(
        [sys.executable, "-c", WORK_AHEAD_CHILD, str(tiny["f16"]), str(tiny["image"])],
        env={**os.environ, "GGML_VK_VISIBLE_DEVICES": "0", "VK_ICD_FILENAMES": str(LAVAPIPE_ICDS[0])},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    there = json.loads(proc.stdout.strip().splitlines()[-1])
    assert str(there["device"]).startswith("Vulkan: llvmpipe")
    assert there["ahead"] == there["full"] > 65 and there["reused"] >= there["ahead"]
    assert there["tokens"] == here["token_ids"]


SHAPE_CHILD = """
import json, sys
import numpy as np
from owl_desktop.engine.llm import Embeddings, GenerationStats, LlamaEngine, Tokens
from owl_desktop.engine.options import LlmSettings, Sampling
gguf, flash_attn, kv_type = sys.argv[1], sys.argv[2], sys.argv[3]
llm = LlamaEngine(gguf, LlmSettings(n_threads=2, flash_attn=flash_attn, kv_type=kv_type))
rows = (np.random.default_rng(0).standard_normal((65, llm.n_embd)) * 0.02).astype(np.float32)  # [65, n_embd]
# batches of 50 and 1 tokens, then an image's 65 rows: with flash attention on Vulkan this crashed lavapipe (SIGSEGV)
segments = [Tokens(list(range(10, 60))), Tokens([5]), Embeddings(rows, "img"), Tokens(list(range(100, 110)))]
st = GenerationStats()
"".join(llm.generate(segments, Sampling(greedy=True, max_new_tokens=12), stats=st))
print(json.dumps({"device": llm.device, "tokens": st.token_ids}))
"""


def run_shape(gguf: Path, flash_attn: str, kv_type: str, **env: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", SHAPE_CHILD, str(gguf), flash_attn, kv_type],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dispatching
@pytest.mark.skipif(not LAVAPIPE_ICDS, reason="Mesa's software Vulkan driver (mesa-vulkan-drivers) is not installed")
def test_vulkan_runs_without_flash_attention_by_default_and_gives_the_cpu_tokens(tiny: dict[str, Path]) -> None:
    """Default settings on Vulkan leave flash attention off (it crashed the driver for some prompt lengths) and keep
    an f16 cache: the prompt shape that crashed now answers, with the CPU's greedy tokens for the same cache."""
    gguf = tiny["f16"] / "llm-F16.gguf"
    vulkan = run_shape(gguf, "auto", "q8_0", GGML_VK_VISIBLE_DEVICES="0", VK_ICD_FILENAMES=str(LAVAPIPE_ICDS[0]))
    assert str(vulkan["device"]).startswith("Vulkan: llvmpipe")
    cpu = run_shape(gguf, "off", "f16", GGML_VK_VISIBLE_DEVICES="", VK_ICD_FILENAMES="/nonexistent.json")
    assert not str(cpu["device"]).startswith("Vulkan")
    assert vulkan["tokens"] == cpu["tokens"] and len(vulkan["tokens"]) == 12


CACHE_PAGES_CHILD = """
import json, sys
from pathlib import Path
from owl_desktop.engine.llm import LlamaEngine, Tokens
from owl_desktop.engine.options import LlmSettings, Sampling
def anonymous() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no Anonymous line")
gguf, n_ctx = sys.argv[1], int(sys.argv[2])
before = anonymous()
llm = LlamaEngine(gguf, LlmSettings(n_ctx=n_ctx, n_threads=2, flash_attn="off", kv_type="f32"))
after_load = anonymous()
tokens = "".join(llm.generate([Tokens(list(range(10, 110)))], Sampling(greedy=True, max_new_tokens=12)))
print(json.dumps({"load": after_load - before, "end": anonymous() - before, "answer": tokens}))
"""


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="reads Linux's memory accounting")
def test_the_context_cache_takes_memory_only_where_written(tiny: dict[str, Path]) -> None:
    """llama.cpp zeroes its KV cache at creation; our patch does it by returning the pages, so a large context costs
    memory only for the positions used, and the answer is the one a small context gives."""
    gguf = tiny["f32"] / "llm-F32.gguf"

    def run(n_ctx: int) -> dict[str, object]:
        proc = subprocess.run(
            [sys.executable, "-c", CACHE_PAGES_CHILD, str(gguf), str(n_ctx)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    big, small = run(65536), run(512)
    cache = 2 * 2 * 256 * 4 * 65536  # K and V, 2 layers, 256 wide, f32: 256 MiB
    mib = {k: int(v) >> 20 for k, v in big.items() if k != "answer"}  # type: ignore[call-overload]
    print(f"\nanonymous memory: load {mib['load']} MiB, end {mib['end']} MiB; the cache {cache >> 20} MiB")
    assert int(big["end"]) < cache / 4  # memset would have made all of it resident
    assert big["answer"] == small["answer"]
