"""The engine's choices and defaults, declared once: importable without llama.cpp or torch.

The engine (llm.py, pipeline.py), the app's saved settings (app/settings.py), the settings dialog and the CLI's flags
all read their sets of values and their defaults from here, so they cannot disagree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# KV cache element types offered to users, with llama.cpp's ggml type ids (ggml.h `enum ggml_type`)
KV_TYPE_IDS: dict[str, int] = {"f16": 1, "q8_0": 8, "q4_0": 2, "f32": 0}
KV_TYPE_LABELS: dict[str, str] = {
    "f16": "f16 (default)",
    "q8_0": "q8_0 (half the memory, slower in long chats on a CPU)",
    "q4_0": "q4_0 (smallest)",
    "f32": "f32 (exact)",
}
# llama.cpp can only keep a quantized V cache with flash attention on
KV_TYPES_NEEDING_FLASH_ATTN = frozenset({"q8_0", "q4_0"})
# The cache type used where flash attention is off or unavailable (a quantized V cache needs it)
KV_TYPE_WITHOUT_FLASH_ATTN = "f16"

# flash attention modes and llama.cpp's `llama_flash_attn_type` values
FLASH_ATTN_IDS: dict[str, int] = {"auto": -1, "on": 1, "off": 0}
FLASH_ATTN_LABELS: dict[str, str] = {"auto": "Automatic", "on": "On", "off": "Off"}
# GPU backends where "auto" means off. Vulkan: flash attention crashed the driver for some prompt lengths (SIGSEGV
# in lavapipe's queue thread, e.g. a 65-row image batch after 51 or 52 cached positions; llama.cpp has reports of
# such shape-dependent crashes on real GPUs too), and without it the cache is f16 in GPU memory.
FLASH_ATTN_AUTO_OFF_BACKENDS = frozenset({"Vulkan"})

# where and how the vision tower runs (torch)
VISION_DEVICES: dict[str, str] = {
    "auto": "Automatic",
    "cuda": "NVIDIA GPU (CUDA)",
    "mps": "Apple GPU (MPS)",
    "cpu": "CPU only",
}
VISION_DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")

# The LLaMA-7B of mPLUG-Owl was trained with 2,048 positions; smaller contexts save memory.
CONTEXT_SIZES: tuple[int, ...] = (512, 1024, 2048)
TRAINED_CONTEXT = 2048


def kv_type_problem(kv_type: str, flash_attn: str) -> str | None:
    """Why this KV cache type cannot run with this flash-attention mode, or None when it can."""
    if kv_type in KV_TYPES_NEEDING_FLASH_ATTN and flash_attn == "off":
        return f"a {kv_type} context cache needs flash attention (set it to Automatic or On, or use f16)"
    return None


def attention_on(backend: str | None, flash_attn: str, kv_type: str) -> tuple[str, str]:
    """The flash-attention mode and context cache type a model runs with on a GPU `backend` (None: the CPU); "auto"
    is left to llama.cpp, which turns flash attention on where the device has it (the CPU does)."""
    if flash_attn == "auto" and backend in FLASH_ATTN_AUTO_OFF_BACKENDS:
        flash_attn = "off"
        if kv_type in KV_TYPES_NEEDING_FLASH_ATTN:
            kv_type = KV_TYPE_WITHOUT_FLASH_ATTN
    return flash_attn, kv_type


@dataclass(frozen=True)
class LlmSettings:
    n_ctx: int = TRAINED_CONTEXT
    n_batch: int = 512
    n_threads: int | None = None  # None: the number of physical cores (decode is memory-bound)
    n_gpu_layers: int = -1  # -1: every layer when the build has a GPU backend
    flash_attn: str = "auto"  # a key of FLASH_ATTN_IDS ("off" is exact against a float32 reference)
    # f16, llama.cpp's own default, with flash attention. Measured on the 7B shape with 2 threads: deep into a
    # conversation llama.cpp's CPU flash attention is slow on a q8_0 cache (208 positions prefilled after 1,500:
    # 17.8 s in q8_0 against 7.2 s in f16, all ~6 s at the start of a chat; decode there 3.32 against 3.98 tok/s).
    # q8_0 halves the cache (0.57 instead of 1.07 GB at 2,048 positions). Only the positions written take memory
    # (packaging/llama-cpp-patches), except without flash attention: its V cache is transposed, so every position
    # written touches every page of it.
    kv_type: str = "f16"  # a key of KV_TYPE_IDS
    # How the weights are held (measured with `owl-desktop bench memory` on the 7B shape, 2 threads): `repack` copies
    # them into llama.cpp's repacked CPU layout (8-row groups: decode ~1.2x faster; prefill as fast, through
    # packaging/llama-cpp-patches/cpu-repacked-q4k-tiled-batches.patch; a load some seconds longer). A repacked copy
    # beside a mapped GGUF holds the model twice (8.3 GB at 7B), so `use_mmap` None maps the GGUF only when nothing is
    # repacked (read instead: 5.2 GB, as mapped alone). llama.cpp repacks only on CPUs with AVX2, and never for layers
    # on a GPU.
    use_mmap: bool | None = None
    repack: bool = True
    prefix_cache_mb: int = 1024  # host memory for saved KV prefixes of other conversations (0: none)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0  # OpenAI-style: minus this × count of each token seen in the last repeat_last_n
    presence_penalty: float = 0.0  # OpenAI-style: minus this for each token seen in the last repeat_last_n
    no_repeat_ngram: int = 2  # ban a token that would repeat an n-gram already generated (reference demo: 2)
    seed: int | None = None  # None: a fresh random seed
    greedy: bool = False  # pure argmax, every penalty and ban off
    max_new_tokens: int = 512

    def resolved_seed(self) -> int:
        if self.seed is not None:
            return int(self.seed) & 0xFFFFFFFF
        return int.from_bytes(os.urandom(4), "little")
