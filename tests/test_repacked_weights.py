"""Q4_K weights in llama.cpp's repacked CPU layout (8-row groups, on CPUs with AVX2) take the same tiled kernels for a
batch as unrepacked weights do (packaging/llama-cpp-patches/cpu-repacked-q4k-tiled-batches.patch): so the repacked
layout, faster for decode, no longer makes prefill slower.

Each run is a child process: ggml reads its GGML_CPU_TILED_MM switches once per process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from owl_desktop.convert.converter import convert_checkpoint
from owl_desktop.devtools.tiny_checkpoint import make_checkpoint
from owl_desktop.engine.llm import backends
from owl_desktop.engine.llm_backends import CPU_VARIANT_ENV

# the logits after a 40-position prompt, with the weights unrepacked and then repacked, saved as a [2, n_vocab] array
CHILD = """
import sys
from pathlib import Path
import numpy as np
from owl_desktop.engine.llm import LlamaEngine, LlmSettings, Tokens
path, out = Path(sys.argv[1]), sys.argv[2]
rows = []
for repack in (False, True):
    with LlamaEngine(path, LlmSettings(n_threads=2, n_ctx=256, flash_attn="off", repack=repack)) as llm:
        ids = [int(t) for t in np.random.default_rng(3).integers(3, llm.n_vocab, 40)]
        llm.prefill([Tokens(ids)])
        rows.append(llm.last_logits())
np.save(out, np.stack(rows))
"""

pytestmark = pytest.mark.skipif(
    "AVX2" not in backends().cpu_features, reason="llama.cpp repacks Q4_K weights only on CPUs with AVX2"
)


@pytest.fixture(scope="module")
def q4_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repacked")
    ckpt = make_checkpoint(root / "ckpt", "bin", preset="tiny", seed=0)
    bundle = convert_checkpoint(ckpt, root / "q4", quant="Q4_K_M")
    return next(bundle.glob("llm-*.gguf"))


def logits(gguf: Path, tmp_path: Path, **env: str) -> tuple[np.ndarray, np.ndarray]:
    """(unrepacked, repacked) logits from a child process with `env` added."""
    out = tmp_path / f"logits-{len(list(tmp_path.iterdir()))}.npy"
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("GGML_CPU_TILED_MM")} | env
    subprocess.run([sys.executable, "-c", CHILD, str(gguf), str(out)], env=child_env, check=True, timeout=300)
    plain, repacked = np.load(out)
    return plain, repacked


def test_repacked_weights_prefill_through_the_tiled_kernels_bit_for_bit(q4_gguf: Path, tmp_path: Path) -> None:
    # the tiled kernels off: the repack's own kernels run, and they sum in another order (so the weights are repacked)
    plain, repacked = logits(q4_gguf, tmp_path, GGML_CPU_TILED_MM="0")
    assert not np.array_equal(repacked, plain)

    # the tiled kernels read the repacked layout into the same tiles: the logits are those of the unrepacked weights
    # (without the patch they differ by ~0.09 here), in the CPU variant picked here and in the AVX2 one that every
    # x86-64-v3 CPU can run, also with the tiled kernels taking every product (one-row ones included)
    for env in ({}, {CPU_VARIANT_ENV: "haswell"}, {"GGML_CPU_TILED_MM_FORCE": "1"}):
        plain, repacked = logits(q4_gguf, tmp_path, **env)
        np.testing.assert_array_equal(repacked, plain)
