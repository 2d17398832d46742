"""Disk and memory a model needs, from its parameter counts and the bits per weight of each quantization.

All figures are estimates in bytes. Parameter counts come from an mPLUG-Owl config (exact for any checkpoint whose
config.json we can read); the catalog uses the released 7B model's config (LLaMA 6.74 B, vision side 0.385 B).

Disk: the bundle is the GGUF (params x bits / 8 + vocabulary metadata) plus vision.safetensors in fp16; converting
to a k-quant first writes a 16-bit GGUF next to it (removed afterwards), so the peak is larger than the bundle.
Memory (CPU run), calibrated with `owl-desktop bench memory` on the 7B-shaped bundle (README "Measured here"): the
GGUF weights (memory-mapped, counted once) + the KV cache in the engine's default type at the context size +
llama.cpp's compute buffers + the vision weights in 16 bits (held so on every CPU) and one image's activations + the
runtime (Python, torch, the llama.cpp and torch libraries' resident pages, Qt). GPU run: the same on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from owl_desktop.engine.options import LlmSettings, attention_on
from owl_desktop.model_config import OwlConfig

# Average bits per weight of a LLaMA-7B GGUF in each type (file size / parameters, llama.cpp's published sizes:
# Q4_K_M 4.08 GB, Q5_K_M 4.78 GB, Q8_0 7.16 GB for 6.74 B weights). The converter's own free-space check rounds
# these up further for small models; it stays the final word before it writes anything.
BITS_PER_WEIGHT: dict[str, float] = {"F32": 32.0, "F16": 16.0, "Q8_0": 8.5, "Q5_K_M": 5.7, "Q4_K_M": 4.9}
QUANT_ORDER: tuple[str, ...] = ("Q4_K_M", "Q5_K_M", "Q8_0", "F16", "F32")  # smallest first

# bytes per K or V cache entry of each cache type (q8_0: 32 values in 34 bytes; q4_0: 32 in 18)
KV_ENTRY_BYTES: dict[str, float] = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
VOCAB_METADATA_BYTES = 64  # per token: its string, score and type in the GGUF metadata
CONVERSION_MARGIN = 1.05
CONVERSION_SLACK = 32 << 20
# Measured (bench memory, 7B shape): Python + torch after import 0.23 GB, the libraries' pages touched while a model
# loads, encodes and answers 0.14 GB more; the window (Qt) adds ~0.1 GB.
ENGINE_RUNTIME = 352 << 20
WINDOW_RUNTIME = 96 << 20
RUNTIME_OVERHEAD = ENGINE_RUNTIME + WINDOW_RUNTIME
GPU_CONTEXT_OVERHEAD = 384 << 20  # CUDA context and allocator slack
VISION_ACTIVATIONS = 64 << 20  # a batch of 224x224 views through ViT-L/14 + abstractor (one image: ~30 MB)


@dataclass(frozen=True)
class ModelFacts:
    """What sizing needs to know about a model."""

    llm_params: int
    vision_params: int  # ViT + abstractor + visual_fc + query tokens + vit_eos
    n_layers: int
    n_embd: int
    n_embd_kv: int  # key/value heads x head dim
    n_head: int
    n_vocab: int

    @property
    def total_params(self) -> int:
        return self.llm_params + self.vision_params

    @property
    def checkpoint_bytes(self) -> int:
        """The bf16 checkpoint on the hub (weights only)."""
        return self.total_params * 2

    @classmethod
    def from_config(cls, cfg: OwlConfig) -> ModelFacts:
        t = cfg.text
        return cls(
            llm_params=llm_params(cfg),
            vision_params=vision_params(cfg),
            n_layers=t.num_hidden_layers,
            n_embd=t.hidden_size,
            n_embd_kv=t.num_key_value_heads * t.head_dim,
            n_head=t.num_attention_heads,
            n_vocab=t.vocab_size,
        )


def llm_params(cfg: OwlConfig) -> int:
    """LLaMA: embeddings, per layer q/k/v/o + SwiGLU MLP + two RMS norms, the final norm and the LM head."""
    t = cfg.text
    h, inter, kv = t.hidden_size, t.intermediate_size, t.num_key_value_heads * t.head_dim
    per_layer = 2 * h * h + 2 * kv * h + 3 * h * inter + 2 * h
    return 2 * t.vocab_size * h + t.num_hidden_layers * per_layer + h


def vision_params(cfg: OwlConfig) -> int:
    """ViT-L/14, the visual abstractor and its projection into the LLM's embedding space."""
    v, a, n_embd = cfg.vision, cfg.abstractor, cfg.text.hidden_size
    d, i = v.hidden_size, v.intermediate_size
    embeddings = d + v.num_positions * d + d * v.num_channels * v.patch_size**2 + 2 * d
    vit_layer = (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (i * d + i) + (d * i + d) + 2 * d
    vit = embeddings + v.num_hidden_layers * vit_layer + 2 * d
    q, e, ai = a.hidden_size, a.encoder_hidden_size, a.intermediate_size
    abstractor_layer = (
        (q * q + q) + 2 * (q * e + q) + (q * q + q) + 2 * q  # query, key, value, out_proj, norm2
        + 3 * ai * q + 2 * ai + q  # w1, w2, w3 (+ biases)
        + 2 * ai + 4 * q  # ffn_ln, norm1, normk
    )  # fmt: skip
    abstractor = cfg.num_query_tokens * q + n_embd + a.num_hidden_layers * abstractor_layer + (n_embd * q + n_embd)
    return vit + abstractor


@dataclass(frozen=True)
class Footprint:
    """One quantization of one model at one context size."""

    quant: str
    llm_file: int  # llm-<QUANT>.gguf
    vision_file: int  # vision.safetensors
    conversion_peak: int  # disk while converting: bundle + the intermediate 16-bit GGUF, with margins
    kv_cache: int
    compute: int  # llama.cpp compute buffers for one batch
    ram: int  # to run on the CPU
    vram: int  # to run fully on a GPU

    @property
    def bundle(self) -> int:
        return self.llm_file + self.vision_file


def footprint(
    facts: ModelFacts,
    quant: str,
    n_ctx: int = 2048,
    n_batch: int = 512,
    kv_type: str = LlmSettings.kv_type,
    gpu_backend: str | None = None,
) -> Footprint:
    """`gpu_backend`: the backend that would run the model on a GPU (its cache may differ, see attention_on)."""
    if quant not in BITS_PER_WEIGHT:
        raise ValueError(f"unknown quantization {quant}")
    vocab = facts.n_vocab * VOCAB_METADATA_BYTES
    llm_file = int(facts.llm_params * BITS_PER_WEIGHT[quant] / 8) + vocab
    vision_file = facts.vision_params * (4 if quant == "F32" else 2)
    intermediate = 0 if quant in ("F32", "F16") else facts.llm_params * 2 + vocab
    peak = int((llm_file + vision_file + intermediate) * CONVERSION_MARGIN) + CONVERSION_SLACK
    kv, compute = _context_buffers(facts, n_ctx, n_batch, *attention_on(None, "auto", kv_type))
    gpu_kv, gpu_compute = _context_buffers(facts, n_ctx, n_batch, *attention_on(gpu_backend, "auto", kv_type))
    ram = llm_file + kv + compute + facts.vision_params * 2 + VISION_ACTIVATIONS + RUNTIME_OVERHEAD
    vram = llm_file + gpu_kv + gpu_compute + facts.vision_params * 2 + VISION_ACTIVATIONS + GPU_CONTEXT_OVERHEAD
    return Footprint(quant, llm_file, vision_file, peak, kv, compute, ram, vram)


def _context_buffers(facts: ModelFacts, n_ctx: int, n_batch: int, flash_attn: str, kv_type: str) -> tuple[int, int]:
    """(KV cache, compute buffers) in bytes, for a full context."""
    kv = int(2 * facts.n_layers * n_ctx * facts.n_embd_kv * KV_ENTRY_BYTES[kv_type])
    # hidden states of one batch and the last position's logits; without flash attention also the attention scores
    # of one batch against the whole context
    compute = n_batch * 8 * facts.n_embd * 4 + facts.n_vocab * 4
    if flash_attn == "off":
        compute += n_ctx * n_batch * facts.n_head * 4
    return kv, compute


def gib(n: float) -> str:
    """A byte count for people: GiB above 0.25 GiB, else MiB."""
    return f"{n / (1 << 30):.1f} GiB" if abs(n) >= 1 << 28 else f"{n / (1 << 20):.1f} MiB"
