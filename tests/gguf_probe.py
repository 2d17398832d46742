"""A minimal llama.cpp runner for tests: load a GGUF, tokenize, detokenize, last-position logits.

Exactness settings: flash attention off and an F32 KV cache (an F16 cache alone rounds K/V by ~1e-3), CPU only.
`use_extra_bufts` is off: the arithmetic is the same without the repacked weight buffers, and a -march=native build
on a machine whose CPU reports AMX that the kernel does not grant dies with SIGILL in its AMX buffers.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import llama_cpp as L
import numpy as np

from owl_desktop.engine.llm_backends import load_backends

_SILENT = L.llama_log_callback(lambda level, text, user: None)  # module-level: must outlive every call
_ready = False


def _init() -> None:
    global _ready
    if not _ready:
        L.llama_log_set(_SILENT, ctypes.c_void_p(0))
        load_backends()  # our build's backends are modules that llama_backend_init would not find
        L.llama_backend_init()
        _ready = True


class GgufProbe:
    def __init__(self, path: Path, *, vocab_only: bool = False, n_ctx: int = 256) -> None:
        _init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = False
        mp.vocab_only = vocab_only
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.ctx: Any = None
        if not vocab_only:
            cp = L.llama_context_default_params()
            cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
            cp.n_threads = cp.n_threads_batch = 2
            cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
            cp.type_k = cp.type_v = L.GGML_TYPE_F32
            self.ctx = L.llama_init_from_model(self.model, cp)
            if not self.ctx:
                raise RuntimeError(f"llama.cpp could not create a context for {path}")

    @property
    def n_vocab(self) -> int:
        return int(L.llama_vocab_n_tokens(self.vocab))

    @property
    def n_embd(self) -> int:
        return int(L.llama_model_n_embd(self.model))

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise RuntimeError(f"tokenize needs {-n} tokens")
        return list(buf[:n])

    def detokenize(self, ids: list[int]) -> str:
        arr = (L.llama_token * len(ids))(*ids)
        cap = 16 * len(ids) + 16
        out = ctypes.create_string_buffer(cap)
        n = L.llama_detokenize(self.vocab, arr, len(ids), out, cap, False, False)
        if n < 0:
            raise RuntimeError("detokenize buffer too small")
        return out.raw[:n].decode("utf-8")

    def last_logits(self, ids: list[int]) -> np.ndarray:
        """Logits after the last of `ids`, decoded from an empty cache; float32 [n_vocab]."""
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        arr = (L.llama_token * len(ids))(*ids)
        rc = L.llama_decode(self.ctx, L.llama_batch_get_one(arr, len(ids)))
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        ptr = L.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def close(self) -> None:
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            L.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> GgufProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
