"""Every tensor of an mPLUG-Owl v1 checkpoint, with the shape its config implies (mplug-owl-reference.md §2.3).

`expected_tensors(config)` is the contract a source checkpoint must meet before anything is written: the same
names, the same shapes, nothing missing and nothing unknown (only the rotary `inv_freq` buffers may appear and
are dropped). A UReader checkpoint (family "ureader") holds two more: the abstractor's crop position tables
`abstractor.cut_patch_embedding_h/w.weight`, [15, D] each (mplug-owl-family.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from owl_desktop.model_config import AbstractorConfig, OwlConfig, TextConfig, VisionConfig
from owl_desktop.model_family import CUT_EMBEDDING_H, CUT_EMBEDDING_ROWS, CUT_EMBEDDING_W, MPLUG_OWL, UREADER

Shape = tuple[int, ...]

VISION_PREFIXES = ("vision_model.", "abstractor.")
QUERY_TOKENS = "query_tokens"
LLM_PREFIX = "language_model."
INV_FREQ_SUFFIX = "rotary_emb.inv_freq"
CROP_TABLES = (CUT_EMBEDDING_H, CUT_EMBEDDING_W)


@dataclass(frozen=True)
class Layout:
    """The tensors a checkpoint must hold, split by where they go in the bundle."""

    vision: dict[str, Shape]  # → vision.safetensors, HF names kept
    llm: dict[str, Shape]  # → the GGUF; names relative to the LlamaForCausalLM (prefix `language_model.` removed)

    def full_names(self) -> dict[str, Shape]:
        return {**self.vision, **{LLM_PREFIX + k: v for k, v in self.llm.items()}}


def is_vision_tensor(name: str) -> bool:
    return name == QUERY_TOKENS or name.startswith(VISION_PREFIXES)


def is_dropped_tensor(name: str) -> bool:
    """Buffers a checkpoint may carry that the bundle does not need (the LLaMA rotary frequencies)."""
    return name.endswith(INV_FREQ_SUFFIX)


def family_of(names: Iterable[str]) -> str:
    """The model family a checkpoint's tensor names reveal: UReader has crop position tables, mPLUG-Owl none."""
    return UREADER if any(n in (CUT_EMBEDDING_H, CUT_EMBEDDING_W) for n in names) else MPLUG_OWL


def expected_tensors(config: OwlConfig, *, tied_embeddings: bool = False, family: str = MPLUG_OWL) -> Layout:
    vision: dict[str, Shape] = {QUERY_TOKENS: (1, config.num_query_tokens, config.abstractor.hidden_size)}
    vision.update(_vision_model(config.vision))
    vision.update(_abstractor(config.abstractor, config.text.hidden_size))
    if family == UREADER:
        vision.update({name: (CUT_EMBEDDING_ROWS, config.abstractor.hidden_size) for name in CROP_TABLES})
    return Layout(vision=vision, llm=_language_model(config.text, tied_embeddings))


def _vision_model(c: VisionConfig) -> dict[str, Shape]:
    d, i = c.hidden_size, c.intermediate_size
    out: dict[str, Shape] = {
        "vision_model.embeddings.cls_token": (1, 1, d),
        "vision_model.embeddings.patch_embed.weight": (d, c.num_channels, c.patch_size, c.patch_size),
        "vision_model.embeddings.position_embedding": (1, c.num_positions, d),
        "vision_model.embeddings.pre_layernorm.weight": (d,),
        "vision_model.embeddings.pre_layernorm.bias": (d,),
        "vision_model.post_layernorm.weight": (d,),
        "vision_model.post_layernorm.bias": (d,),
    }
    for n in range(c.num_hidden_layers):
        p = f"vision_model.encoder.layers.{n}."
        out.update(
            {
                p + "input_layernorm.weight": (d,),
                p + "input_layernorm.bias": (d,),
                p + "self_attn.query_key_value.weight": (3 * d, d),
                p + "self_attn.query_key_value.bias": (3 * d,),
                p + "self_attn.dense.weight": (d, d),
                p + "self_attn.dense.bias": (d,),
                p + "post_attention_layernorm.weight": (d,),
                p + "post_attention_layernorm.bias": (d,),
                p + "mlp.fc1.weight": (i, d),
                p + "mlp.fc1.bias": (i,),
                p + "mlp.fc2.weight": (d, i),
                p + "mlp.fc2.bias": (d,),
            }
        )
    return out


def _abstractor(c: AbstractorConfig, text_hidden: int) -> dict[str, Shape]:
    d, i, enc = c.hidden_size, c.intermediate_size, c.encoder_hidden_size
    out: dict[str, Shape] = {
        "abstractor.visual_fc.weight": (text_hidden, d),
        "abstractor.visual_fc.bias": (text_hidden,),
        "abstractor.vit_eos": (1, 1, text_hidden),
    }
    for n in range(c.num_hidden_layers):
        p = f"abstractor.encoder.layers.{n}.crossattention."
        out.update(
            {
                p + "norm1.weight": (d,),
                p + "norm1.bias": (d,),
                p + "normk.weight": (d,),
                p + "normk.bias": (d,),
                p + "attention.query.weight": (d, d),
                p + "attention.query.bias": (d,),
                p + "attention.key.weight": (d, enc),
                p + "attention.key.bias": (d,),
                p + "attention.value.weight": (d, enc),
                p + "attention.value.bias": (d,),
                p + "output.out_proj.weight": (d, d),
                p + "output.out_proj.bias": (d,),
                p + "output.norm2.weight": (d,),
                p + "output.norm2.bias": (d,),
                p + "output.mlp.w1.weight": (i, d),
                p + "output.mlp.w1.bias": (i,),
                p + "output.mlp.w3.weight": (i, d),
                p + "output.mlp.w3.bias": (i,),
                p + "output.mlp.w2.weight": (d, i),
                p + "output.mlp.w2.bias": (d,),
                p + "output.mlp.ffn_ln.weight": (i,),
                p + "output.mlp.ffn_ln.bias": (i,),
            }
        )
    return out


def _language_model(c: TextConfig, tied_embeddings: bool) -> dict[str, Shape]:
    d, i, v = c.hidden_size, c.intermediate_size, c.vocab_size
    q_rows = c.num_attention_heads * c.head_dim
    kv_rows = c.num_key_value_heads * c.head_dim
    out: dict[str, Shape] = {"model.embed_tokens.weight": (v, d)}
    for n in range(c.num_hidden_layers):
        p = f"model.layers.{n}."
        out.update(
            {
                p + "input_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (q_rows, d),
                p + "self_attn.k_proj.weight": (kv_rows, d),
                p + "self_attn.v_proj.weight": (kv_rows, d),
                p + "self_attn.o_proj.weight": (d, q_rows),
                p + "post_attention_layernorm.weight": (d,),
                p + "mlp.gate_proj.weight": (i, d),
                p + "mlp.up_proj.weight": (i, d),
                p + "mlp.down_proj.weight": (d, i),
            }
        )
    out["model.norm.weight"] = (d,)
    if not tied_embeddings:
        out["lm_head.weight"] = (v, d)
    return out
