"""Stream the LLaMA language model of a checkpoint into a GGUF file (F32, F16 or BF16), one tensor at a time.

gguf-py's streaming path: declare every tensor (`add_tensor_info`), write header, metadata and tensor infos,
then `write_tensor_data` each tensor in declaration order; nothing is kept after it is written.

Per tensor: read (memory-mapped) → merge the LoRA update if any → permute Q/K rows for llama.cpp's rotary
layout → cast (1-D tensors and norms F32, matrices the output type) → write → release the source pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from owl_desktop.convert.checkpoint import Checkpoint
from owl_desktop.convert.layout import LLM_PREFIX, Shape
from owl_desktop.convert.lora import LoraAdapter
from owl_desktop.convert.numerics import check_fits_float16
from owl_desktop.convert.vocab import Vocab
from owl_desktop.model_config import TextConfig
from owl_desktop.tasks import Task

ARCH = "llama"


@dataclass(frozen=True)
class OutType:
    name: str
    torch_dtype: torch.dtype
    numpy_dtype: type  # what the bytes are handed to gguf-py as (bf16 travels as raw uint16 bits)
    ggml_type: gguf.GGMLQuantizationType
    file_type: gguf.LlamaFileType


OUT_TYPES = {
    "F32": OutType("F32", torch.float32, np.float32, gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "F16": OutType("F16", torch.float16, np.float16, gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "BF16": OutType("BF16", torch.bfloat16, np.uint16, gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
_F32 = OUT_TYPES["F32"]

# HF LlamaForCausalLM name (per layer: after `model.layers.N.`) → GGUF tensor
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": gguf.MODEL_TENSOR.TOKEN_EMBD,
    "model.norm.weight": gguf.MODEL_TENSOR.OUTPUT_NORM,
    "lm_head.weight": gguf.MODEL_TENSOR.OUTPUT,
}
_LAYER_NAMES = {
    "input_layernorm.weight": gguf.MODEL_TENSOR.ATTN_NORM,
    "self_attn.q_proj.weight": gguf.MODEL_TENSOR.ATTN_Q,
    "self_attn.k_proj.weight": gguf.MODEL_TENSOR.ATTN_K,
    "self_attn.v_proj.weight": gguf.MODEL_TENSOR.ATTN_V,
    "self_attn.o_proj.weight": gguf.MODEL_TENSOR.ATTN_OUT,
    "post_attention_layernorm.weight": gguf.MODEL_TENSOR.FFN_NORM,
    "mlp.gate_proj.weight": gguf.MODEL_TENSOR.FFN_GATE,
    "mlp.up_proj.weight": gguf.MODEL_TENSOR.FFN_UP,
    "mlp.down_proj.weight": gguf.MODEL_TENSOR.FFN_DOWN,
}


@dataclass(frozen=True)
class PlannedTensor:
    hf_name: str  # relative to LlamaForCausalLM, e.g. "model.layers.3.self_attn.q_proj.weight"
    gguf_name: str  # e.g. "blk.3.attn_q.weight"
    shape: Shape  # torch order [out, in]
    out: OutType
    rope_heads: int | None  # heads to un-permute for llama.cpp's rotary layout (Q and K only)

    @property
    def nbytes(self) -> int:
        n = self.out.torch_dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL_NAMES:
        return gguf.TENSOR_NAMES[_GLOBAL_NAMES[hf_name]] + ".weight"
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.<N>.<rest>
    return gguf.TENSOR_NAMES[_LAYER_NAMES[rest]].format(bid=int(layer)) + ".weight"


def plan_tensors(text: TextConfig, llm_shapes: dict[str, Shape], outtype: str) -> list[PlannedTensor]:
    """The GGUF's tensors in file order, with their output types."""
    out = OUT_TYPES[outtype]
    plan = []
    for hf_name, shape in llm_shapes.items():
        rope_heads = None
        if hf_name.endswith("self_attn.q_proj.weight"):
            rope_heads = text.num_attention_heads
        elif hf_name.endswith("self_attn.k_proj.weight"):
            rope_heads = text.num_key_value_heads
        tensor_out = _F32 if len(shape) == 1 or hf_name.endswith("norm.weight") else out
        plan.append(PlannedTensor(hf_name, gguf_name(hf_name), shape, tensor_out, rope_heads))
    return plan


def permute_for_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF stores each head's Q/K rows as [first halves | second halves] (rotate_half); llama.cpp's NORM rope
    pairs adjacent rows. Interleave the halves so both compute the same rotation (llama-cpp-engine.md §3.2)."""
    rows, cols = w.shape  # [n_head * head_dim, in]
    return w.reshape(n_head, 2, rows // n_head // 2, cols).transpose(1, 2).reshape(rows, cols)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)  # raw bf16 bits; the GGUF type says BF16
    return t.numpy()


def write_metadata(w: gguf.GGUFWriter, text: TextConfig, vocab: Vocab, *, name: str, file_type: int) -> None:
    w.add_name(name)
    w.add_context_length(text.max_position_embeddings)
    w.add_embedding_length(text.hidden_size)
    w.add_block_count(text.num_hidden_layers)
    w.add_feed_forward_length(text.intermediate_size)
    w.add_head_count(text.num_attention_heads)
    w.add_head_count_kv(text.num_key_value_heads)
    w.add_layer_norm_rms_eps(text.rms_norm_eps)
    w.add_rope_freq_base(text.rope_theta)
    w.add_rope_dimension_count(text.head_dim)
    w.add_vocab_size(len(vocab))
    w.add_file_type(file_type)
    w.add_tokenizer_model("llama")  # SentencePiece (SPM) vocabulary
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_unk_token_id(vocab.unk_id)
    if vocab.pad_id is not None:
        w.add_pad_token_id(vocab.pad_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(vocab.add_space_prefix)


def write_llm_gguf(
    ckpt: Checkpoint,
    out: Path,
    *,
    outtype: str,
    vocab: Vocab,
    name: str,
    lora: LoraAdapter | None,
    task: Task,
    stage: str = "writing language model",
) -> int:
    """Write the checkpoint's language model (LoRA merged) to `out` as a GGUF of `outtype`; returns its bytes."""
    text = ckpt.config.text
    plan = plan_tensors(text, ckpt.layout.llm, outtype)
    writer = gguf.GGUFWriter(out, ARCH)
    try:
        write_metadata(writer, text, vocab, name=name, file_type=int(OUT_TYPES[outtype].file_type))
        for t in plan:
            writer.add_tensor_info(
                t.gguf_name, t.shape, np.dtype(t.out.numpy_dtype), t.nbytes, raw_dtype=t.out.ggml_type
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total, done = sum(t.nbytes for t in plan), 0
        for t in plan:
            task.check()
            full_name = LLM_PREFIX + t.hf_name
            source = ckpt.load(full_name)  # [out, in] or [n], source dtype, memory-mapped
            writer.write_tensor_data(_to_numpy(_prepare(full_name, source, t, lora)))
            ckpt.release(full_name, source)
            done += t.nbytes
            task.report(stage, done, total, "B")
        writer.flush()
    finally:
        writer.close()
    return out.stat().st_size


def _prepare(full_name: str, source: torch.Tensor, t: PlannedTensor, lora: LoraAdapter | None) -> torch.Tensor:
    """The tensor as it goes into the GGUF: LoRA merged, Q/K permuted, cast."""
    w = lora.merge(t.hf_name, source) if lora is not None else source
    if t.rope_heads is not None:
        w = permute_for_rope(w, t.rope_heads)
    w = w.to(t.out.torch_dtype)
    check_fits_float16(full_name, source, w)
    return w.contiguous()
