"""Small random mPLUG-Owl (and UReader) checkpoints in the exact layout of the released ones.

Used by the tests, the offline demo and the benchmarks: no real weights can be downloaded where they run.

What a checkpoint directory holds (as on the hub):
  config.json                 nested vision / visual_abstractor / text (llama) configs, LLaMA fields also at the top
  pytorch_model.bin           torch.save'd state dict, bfloat16 (the rotary `inv_freq` buffers stay float32)
  tokenizer.model             a SentencePiece BPE model with byte fallback, trained on the fly (see train_tokenizer)
  tokenizer_config.json, special_tokens_map.json, preprocessor_config.json, generation_config.json

Variants (`make_checkpoint(variant=...)`):
  "bin"                  one pytorch_model.bin, like mplug-owl-llama-7b and -pt
  "sharded"              pytorch_model-0000{1,2}-of-00002.bin + pytorch_model.bin.index.json, like -ft
  "safetensors"          one model.safetensors (metadata {"format": "pt"}), no .bin
  "sharded-safetensors"  model-0000{1,2}-of-00002.safetensors + model.safetensors.index.json
  "lora"                 the "bin" checkpoint, plus a peft LoRA adapter for its language model written to the
                         sibling directory `lora_adapter_dir(out_dir)` (see make_lora_adapter)
  "ureader"              a UReader checkpoint laid out like Mizukiluke/ureader-v1: float32 weights in three shards
                         pytorch_model-0000{1,2,3}-of-00003.bin + pytorch_model.bin.index.json, the abstractor's two
                         crop position tables (`abstractor.cut_patch_embedding_h/w.weight`, [15, D], random), and
                         only config.json, generation_config.json, tokenizer.model and tokenizer_config.json beside

The state dict is built directly from the key list of the reference implementation (reference §2.3), with shapes
derived from an OwlConfig; no model code of ours is instantiated, so tests can check our modules against it.
Every tensor is drawn from its own generator, seeded by (seed, key name): a build is deterministic, independent of
order and variant, and needs no more memory than the tensors themselves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from owl_desktop.convert.layout import CROP_TABLES
from owl_desktop.devtools.tokenizer_corpus import corpus_lines
from owl_desktop.errors import CheckpointError
from owl_desktop.model_config import AbstractorConfig, OwlConfig, TextConfig, VisionConfig
from owl_desktop.model_family import CUT_EMBEDDING_ROWS, MPLUG_OWL, UREADER
from owl_desktop.tasks import Task

VARIANTS: tuple[str, ...] = ("bin", "sharded", "safetensors", "sharded-safetensors", "lora", "ureader")
UREADER_SHARDS = 3
UREADER_SIDE_FILES = ("generation_config.json", "tokenizer_config.json")  # besides config.json, tokenizer.model

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TOKENIZER_VOCAB_SIZE = 1000
UNK, BOS, EOS = "<unk>", "<s>", "</s>"

# Reference training recipe (pipeline/train.py): LoRA on the language model's q_proj and v_proj.
LORA_TARGET_MODULES: tuple[str, ...] = ("q_proj", "v_proj")
LORA_TARGET_REGEX_MPLUG = r".*language_model.*\.(q_proj|v_proj)"
LORA_DROPOUT = 0.05

# Init scales. Linear weights are N(0, (gain / sqrt(fan_in))^2): activations stay O(1) through the stack, and the
# logits (lm_head gain 2) spread with std ~2, so the top-1 token is clear. Norms are N(1, 0.1) / N(0, 0.1).
LINEAR_GAIN = 1.0
LM_HEAD_GAIN = 2.0
LINEAR_BIAS_STD = 0.05
NORM_WEIGHT_STD = 0.1
NORM_BIAS_STD = 0.1
TOKEN_EMBED_STD = 1.0  # embed_tokens and vit_eos (rows of the LLM's input)
VISION_EMBED_STD = 0.5  # cls_token, position_embedding, query_tokens
LORA_B_STD = 0.05

DTYPE = torch.bfloat16


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


@lru_cache(maxsize=4)
def tokenizer_model_bytes(vocab_size: int = TOKENIZER_VOCAB_SIZE) -> bytes:
    """The serialized SentencePiece model train_tokenizer writes (trained once per process and vocab size)."""
    import sentencepiece as spm

    spm.set_random_generator_seed(1234)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=corpus_lines(),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=0.99995,
        max_sentencepiece_length=16,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece=UNK,
        bos_piece=BOS,
        eos_piece=EOS,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    return buffer.getvalue()


def train_tokenizer(out_path: Path, vocab_size: int = TOKENIZER_VOCAB_SIZE) -> Path:
    """Train a LLaMA-like SentencePiece BPE model (byte fallback, split digits, identity normalisation) and write it.

    unk/bos/eos are ids 0/1/2 (`<unk>`, `<s>`, `</s>`), no pad; ids 3..258 are the byte pieces `<0x00>`..`<0xFF>`.
    Deterministic: the same vocab size always gives the same bytes. Takes well under a second.
    """
    out_path = Path(out_path)
    _write_bytes(out_path, tokenizer_model_bytes(vocab_size))
    return out_path


# ----------------------------------------------------------------------------------------------------------------
# Presets


@dataclass(frozen=True)
class Preset:
    """Model sizes of a random checkpoint; the text vocab always equals the tokenizer's size."""

    name: str
    vision: VisionConfig
    abstractor: AbstractorConfig
    text: TextConfig
    num_query_tokens: int = 64

    def owl_config(self) -> OwlConfig:
        return OwlConfig(self.vision, self.abstractor, self.text, self.num_query_tokens)


def _preset(
    name: str,
    *,
    vision: tuple[int, int, int, int],
    abstractor: tuple[int, int, int],
    text: tuple[int, int, int, int],
) -> Preset:
    """vision (hidden, intermediate, layers, heads); abstractor (layers, heads, intermediate); text likewise."""
    v_hidden, v_inter, v_layers, v_heads = vision
    a_layers, a_heads, a_inter = abstractor
    t_hidden, t_inter, t_layers, t_heads = text
    return Preset(
        name=name,
        vision=VisionConfig(
            hidden_size=v_hidden, intermediate_size=v_inter, num_hidden_layers=v_layers, num_attention_heads=v_heads
        ),
        # The abstractor's hidden size must equal the vision width (normk and key/value read the ViT output).
        abstractor=AbstractorConfig(
            hidden_size=v_hidden,
            num_hidden_layers=a_layers,
            num_attention_heads=a_heads,
            intermediate_size=a_inter,
            encoder_hidden_size=v_hidden,
        ),
        text=TextConfig(
            vocab_size=TOKENIZER_VOCAB_SIZE,
            hidden_size=t_hidden,
            intermediate_size=t_inter,
            num_hidden_layers=t_layers,
            num_attention_heads=t_heads,
            num_key_value_heads=t_heads,
        ),
    )


PRESETS: dict[str, Preset] = {
    # For tests: ~2.0 M parameters, ~4 MB, builds in well under a second.
    "tiny": _preset("tiny", vision=(64, 128, 2, 4), abstractor=(2, 4, 96), text=(256, 512, 2, 4)),
    # For tests of Stop: ~54 M parameters (~110 MB), so that encoding two dozen images or prefilling 1,800 tokens
    # takes seconds on a CPU (long enough to be stopped in the middle), while the checkpoint still builds in seconds.
    "slow": _preset("slow", vision=(256, 1024, 16, 4), abstractor=(2, 4, 768), text=(512, 1408, 12, 8)),
    # For the conversion memory benchmark: ~1.5 B parameters, ~3 GB in bf16. Real ViT-L/14 and abstractor sizes.
    "bench": _preset("bench", vision=(1024, 4096, 24, 16), abstractor=(6, 16, 2816), text=(2048, 5504, 22, 16)),
    # For the real-size benchmarks: mPLUG-Owl-llama-7b's shapes (ViT-L/14, the abstractor, LLaMA-7B: 4096 wide,
    # 32 layers), ~13.7 GB in bf16. Only the vocabulary is the small test tokenizer's (LLaMA's has 32,000 tokens:
    # its embedding and output matrices would add ~0.5 GB in bf16, ~0.2 GB at Q4_K_M).
    "7b": _preset("7b", vision=(1024, 4096, 24, 16), abstractor=(6, 16, 2816), text=(4096, 11008, 32, 32)),
}


# ----------------------------------------------------------------------------------------------------------------
# Tensor specs: the reference state-dict keys, shapes and how each tensor is drawn


@dataclass(frozen=True)
class TensorSpec:
    """One state-dict entry: kind "normal" is drawn N(mean, std^2) and stored in `weight_dtype` (bf16 unless the
    variant says otherwise), "inv_freq" is the fp32 rotary buffer."""

    name: str
    shape: tuple[int, ...]
    kind: str = "normal"
    mean: float = 0.0
    std: float = 0.0
    theta: float = 10000.0
    weight_dtype: torch.dtype = DTYPE

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.kind == "inv_freq" else self.weight_dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _normal(name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> TensorSpec:
    return TensorSpec(name, shape, "normal", mean, std)


def _linear(
    prefix: str, out_features: int, in_features: int, bias: bool = True, gain: float = LINEAR_GAIN
) -> list[TensorSpec]:
    specs = [_normal(f"{prefix}.weight", (out_features, in_features), gain / math.sqrt(in_features))]
    if bias:
        specs.append(_normal(f"{prefix}.bias", (out_features,), LINEAR_BIAS_STD))
    return specs


def _layer_norm(prefix: str, dim: int) -> list[TensorSpec]:
    return [
        _normal(f"{prefix}.weight", (dim,), NORM_WEIGHT_STD, mean=1.0),
        _normal(f"{prefix}.bias", (dim,), NORM_BIAS_STD),
    ]


def _rms_norm(prefix: str, dim: int) -> list[TensorSpec]:
    return [_normal(f"{prefix}.weight", (dim,), NORM_WEIGHT_STD, mean=1.0)]


def vision_specs(cfg: VisionConfig) -> list[TensorSpec]:
    d, p = cfg.hidden_size, cfg.patch_size
    fan_in_patch = cfg.num_channels * p * p
    pre = "vision_model"
    specs = [
        _normal(f"{pre}.embeddings.cls_token", (1, 1, d), VISION_EMBED_STD),  # [1, 1, D]
        _normal(f"{pre}.embeddings.position_embedding", (1, cfg.num_positions, d), VISION_EMBED_STD),  # [1, 257, D]
        # Conv2d(3, D, k=14, s=14, bias=False): [D, 3, 14, 14]
        _normal(f"{pre}.embeddings.patch_embed.weight", (d, cfg.num_channels, p, p), 1 / math.sqrt(fan_in_patch)),
        *_layer_norm(f"{pre}.embeddings.pre_layernorm", d),
    ]
    for i in range(cfg.num_hidden_layers):
        layer = f"{pre}.encoder.layers.{i}"
        specs += _linear(f"{layer}.self_attn.query_key_value", 3 * d, d)  # [3D, D], per-head [q|k|v] interleave
        specs += _linear(f"{layer}.self_attn.dense", d, d)
        specs += _layer_norm(f"{layer}.input_layernorm", d)
        specs += _linear(f"{layer}.mlp.fc1", cfg.intermediate_size, d)  # [I, D]
        specs += _linear(f"{layer}.mlp.fc2", d, cfg.intermediate_size)  # [D, I]
        specs += _layer_norm(f"{layer}.post_attention_layernorm", d)
    specs += _layer_norm(f"{pre}.post_layernorm", d)
    return specs


def abstractor_specs(cfg: AbstractorConfig, text_hidden: int) -> list[TensorSpec]:
    d, e, inter = cfg.hidden_size, cfg.encoder_hidden_size, cfg.intermediate_size
    specs = [_normal("abstractor.vit_eos", (1, 1, text_hidden), TOKEN_EMBED_STD)]  # [1, 1, n_embd], LLM space
    for i in range(cfg.num_hidden_layers):
        block = f"abstractor.encoder.layers.{i}.crossattention"
        specs += _linear(f"{block}.attention.query", d, d)  # [D, D]
        specs += _linear(f"{block}.attention.key", d, e)  # [D, E] over concat(queries, image tokens)
        specs += _linear(f"{block}.attention.value", d, e)
        specs += _linear(f"{block}.output.out_proj", d, d)
        specs += _layer_norm(f"{block}.output.norm2", d)
        specs += _linear(f"{block}.output.mlp.w1", inter, d)  # [I, D]
        specs += _linear(f"{block}.output.mlp.w2", d, inter)  # [D, I]
        specs += _linear(f"{block}.output.mlp.w3", inter, d)  # [I, D]
        specs += _layer_norm(f"{block}.output.mlp.ffn_ln", inter)  # [I]
        specs += _layer_norm(f"{block}.norm1", d)
        specs += _layer_norm(f"{block}.normk", d)
    specs += _linear("abstractor.visual_fc", text_hidden, d)  # [n_embd, D]
    return specs


def language_model_specs(cfg: TextConfig) -> list[TensorSpec]:
    h, inter, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    kv = cfg.num_key_value_heads * hd
    pre = "language_model.model"
    specs = [_normal(f"{pre}.embed_tokens.weight", (cfg.vocab_size, h), TOKEN_EMBED_STD)]  # [V, H]
    for i in range(cfg.num_hidden_layers):
        layer = f"{pre}.layers.{i}"
        specs += _linear(f"{layer}.self_attn.q_proj", h, h, bias=False)
        specs += _linear(f"{layer}.self_attn.k_proj", kv, h, bias=False)
        specs += _linear(f"{layer}.self_attn.v_proj", kv, h, bias=False)
        specs += _linear(f"{layer}.self_attn.o_proj", h, h, bias=False)
        # Persistent buffer in transformers 4.28, so it is in the released file: [head_dim / 2] float32.
        specs.append(TensorSpec(f"{layer}.self_attn.rotary_emb.inv_freq", (hd // 2,), "inv_freq", theta=cfg.rope_theta))
        specs += _linear(f"{layer}.mlp.gate_proj", inter, h, bias=False)  # [I, H]
        specs += _linear(f"{layer}.mlp.down_proj", h, inter, bias=False)  # [H, I]
        specs += _linear(f"{layer}.mlp.up_proj", inter, h, bias=False)  # [I, H]
        specs += _rms_norm(f"{layer}.input_layernorm", h)
        specs += _rms_norm(f"{layer}.post_attention_layernorm", h)
    specs += _rms_norm(f"{pre}.norm", h)
    specs += _linear("language_model.lm_head", cfg.vocab_size, h, bias=False, gain=LM_HEAD_GAIN)  # [V, H]
    return specs


def crop_position_specs(cfg: AbstractorConfig) -> list[TensorSpec]:
    """UReader's crop position tables: two Embedding(15, D) weights, after visual_fc as the model registers them."""
    return [_normal(name, (CUT_EMBEDDING_ROWS, cfg.hidden_size), VISION_EMBED_STD) for name in CROP_TABLES]


def checkpoint_specs(config: OwlConfig, family: str = MPLUG_OWL) -> list[TensorSpec]:
    """Every state-dict entry of an mPLUG-Owl (or UReader) checkpoint with this config, in the release's order."""
    if config.abstractor.encoder_hidden_size != config.vision.hidden_size:
        raise ValueError("the abstractor's encoder_hidden_size must equal the vision hidden size")
    crop_tables = crop_position_specs(config.abstractor) if family == UREADER else []
    return [
        _normal("query_tokens", (1, config.num_query_tokens, config.abstractor.hidden_size), VISION_EMBED_STD),
        *vision_specs(config.vision),
        *abstractor_specs(config.abstractor, config.text.hidden_size),
        *crop_tables,
        *language_model_specs(config.text),
    ]


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def make_tensor(spec: TensorSpec, seed: int) -> torch.Tensor:
    """Draw one tensor; depends only on (seed, spec), never on what was drawn before."""
    if spec.kind == "inv_freq":
        head_dim = spec.shape[0] * 2
        return 1.0 / spec.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # [hd / 2]
    values = torch.randn(spec.shape, generator=_generator(seed, spec.name), dtype=torch.float32)
    return (values * spec.std + spec.mean).to(spec.dtype)


def iter_tensors(specs: Iterable[TensorSpec], seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    for spec in specs:
        yield spec.name, make_tensor(spec, seed)


def random_state_dict(config: OwlConfig, seed: int = 0, family: str = MPLUG_OWL) -> dict[str, torch.Tensor]:
    """The whole random state dict in memory (fine for small configs)."""
    return dict(iter_tensors(checkpoint_specs(config, family), seed))


# ----------------------------------------------------------------------------------------------------------------
# JSON side files


_CONFIG_COMMON: dict[str, Any] = {
    # The generic PretrainedConfig fields transformers 4.28 serialises in every nested config.
    "return_dict": True,
    "output_hidden_states": False,
    "output_attentions": False,
    "torchscript": False,
    "torch_dtype": None,
    "use_bfloat16": False,
    "tf_legacy_loss": False,
    "pruned_heads": {},
    "is_encoder_decoder": False,
    "is_decoder": False,
    "cross_attention_hidden_size": None,
    "add_cross_attention": False,
    "tie_encoder_decoder": False,
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "early_stopping": False,
    "num_beams": 1,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "chunk_size_feed_forward": 0,
    "architectures": None,
    "finetuning_task": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "tokenizer_class": None,
    "prefix": None,
    "bos_token_id": None,
    "pad_token_id": None,
    "eos_token_id": None,
    "sep_token_id": None,
    "decoder_start_token_id": None,
    "task_specific_params": None,
    "problem_type": None,
    "_name_or_path": "",
}


def _text_config_dict(cfg: TextConfig) -> dict[str, Any]:
    """LLaMA fields as transformers 4.28 wrote them (no rope_theta, no num_key_value_heads)."""
    return {
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rms_norm_eps": cfg.rms_norm_eps,
        "use_cache": True,
        "tie_word_embeddings": False,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }


def hf_config_dict(config: OwlConfig, torch_dtype: str = "bfloat16") -> dict[str, Any]:
    """config.json of a checkpoint with this config, shaped like the release's."""
    v, a = config.vision, config.abstractor
    vision = {
        **_CONFIG_COMMON,
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "projection_dim": 768,
        "num_hidden_layers": v.num_hidden_layers,
        "num_attention_heads": v.num_attention_heads,
        "num_channels": v.num_channels,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": v.layer_norm_eps,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "use_flash_attn": False,
        "model_type": "mplug_owl_vision_model",
    }
    abstractor = {
        **_CONFIG_COMMON,
        "hidden_size": a.hidden_size,
        "num_hidden_layers": a.num_hidden_layers,
        "num_attention_heads": a.num_attention_heads,
        "intermediate_size": a.intermediate_size,
        "attention_probs_dropout_prob": 0.1,
        "initializer_range": 0.02,
        "layer_norm_eps": a.layer_norm_eps,
        "encoder_hidden_size": a.encoder_hidden_size,
        "model_type": "mplug_owl_visual_abstract",
    }
    text = {**_CONFIG_COMMON, **_text_config_dict(config.text), "model_type": "llama"}
    text["architectures"] = ["LlamaForCausalLM"]
    return {
        "_commit_hash": None,
        "architectures": ["MplugOwlForConditionalGeneration"],
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "model_type": "mplug-owl",
        "num_query_tokens": config.num_query_tokens,
        "text_config": text,
        "torch_dtype": torch_dtype,
        "transformers_version": "4.28.1",
        "use_decoder_only_language_model": True,
        "vision_config": vision,
        "visual_abstractor_config": abstractor,
        # Copied from text_config by the 4.28 config's `for attr in dir(text_config)` loop.
        **{k: val for k, val in _text_config_dict(config.text).items() if k not in ("bos_token_id", "eos_token_id")},
        "bos_token_id": config.text.bos_token_id,
        "eos_token_id": config.text.eos_token_id,
    }


def _added_token(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def tokenizer_side_files(config: OwlConfig) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json, special_tokens_map.json, preprocessor_config.json and generation_config.json."""
    tokenizer_config = {
        "add_bos_token": False,  # MplugOwlTokenizer's choice; the processor prepends BOS itself
        "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", **_added_token(BOS)},
        "clean_up_tokenization_spaces": False,
        "eos_token": {"__type": "AddedToken", **_added_token(EOS)},
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": {"__type": "AddedToken", **_added_token(UNK)},
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": {"__type": "AddedToken", **_added_token(UNK)},
    }
    special_tokens_map = {
        "bos_token": _added_token(BOS),
        "eos_token": _added_token(EOS),
        "pad_token": _added_token(UNK),
        "unk_token": _added_token(UNK),
    }
    preprocessor = {"resolution": config.vision.image_size, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}
    generation = {
        "_from_model_config": True,
        "bos_token_id": config.text.bos_token_id,
        "eos_token_id": config.text.eos_token_id,
        "pad_token_id": config.text.pad_token_id,
        "transformers_version": "4.28.1",
    }
    return {
        "tokenizer_config.json": tokenizer_config,
        "special_tokens_map.json": special_tokens_map,
        "preprocessor_config.json": preprocessor,
        "generation_config.json": generation,
    }


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def _split(specs: list[TensorSpec], n: int) -> list[list[TensorSpec]]:
    """n shards of about equal bytes, keys in order (like transformers' shard_checkpoint)."""
    total = sum(s.nbytes for s in specs)
    shards: list[list[TensorSpec]] = [[] for _ in range(n)]
    done = 0
    for spec in specs:
        # a shard closes once the bytes before it reach its share; the last one takes the rest
        shards[min(n - 1, int(done * n // total))].append(spec)
        done += spec.nbytes
    return [shard for shard in shards if shard]


class _TensorWriter:
    """Draws the tensors of one file, reporting progress in bytes, and saves them in the variant's format."""

    def __init__(self, seed: int, task: Task, total_bytes: int) -> None:
        self.seed = seed
        self.task = task
        self.total = total_bytes
        self.done = 0

    def tensors(self, specs: list[TensorSpec]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for spec in specs:
            self.task.check()
            out[spec.name] = make_tensor(spec, self.seed)
            self.done += spec.nbytes
            self.task.report("drawing random weights", self.done, self.total, "B")
        return out

    def save(self, specs: list[TensorSpec], path: Path, safetensors: bool) -> None:
        state = self.tensors(specs)
        tmp = path.with_name(path.name + ".tmp")
        if safetensors:
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(state, tmp)
        os.replace(tmp, path)


def _write_weights(out_dir: Path, specs: list[TensorSpec], variant: str, seed: int, task: Task) -> None:
    writer = _TensorWriter(seed, task, sum(s.nbytes for s in specs))
    safetensors = variant in ("safetensors", "sharded-safetensors")
    if variant in ("bin", "lora", "safetensors"):
        writer.save(specs, out_dir / ("model.safetensors" if safetensors else "pytorch_model.bin"), safetensors)
        return
    stem, ext = ("model", "safetensors") if safetensors else ("pytorch_model", "bin")
    shards = _split(specs, UREADER_SHARDS if variant == "ureader" else 2)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
        writer.save(shard, out_dir / name, safetensors)
        weight_map.update({spec.name: name for spec in shard})
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    _write_json(out_dir / f"{stem}.{ext}.index.json", index)


_WEIGHT_FILE_PATTERNS = (
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "model*.safetensors",
    "model.safetensors.index.json",
)


def _remove_stale_weights(out_dir: Path) -> None:
    """Rebuilding into a directory must not leave another variant's weight files behind."""
    for pattern in _WEIGHT_FILE_PATTERNS:
        for path in out_dir.glob(pattern):
            path.unlink()


def preset_config(preset: str) -> OwlConfig:
    """The OwlConfig a preset builds (text vocab = the tokenizer's size)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[preset].owl_config()


def lora_adapter_dir(checkpoint_dir: Path) -> Path:
    """Where the "lora" variant writes its adapter: a sibling `<name>-lora` of the checkpoint directory."""
    checkpoint_dir = Path(checkpoint_dir)
    return checkpoint_dir.with_name(checkpoint_dir.name + "-lora")


def make_checkpoint(
    out_dir: Path, variant: str = "bin", *, preset: str = "tiny", seed: int = 0, task: Task | None = None
) -> Path:
    """Write a random mPLUG-Owl (or UReader) checkpoint in the release's layout into out_dir and return out_dir.

    variant: see the module docstring. preset: "tiny" (tests) or "bench" (~3 GB). Same seed, same tensors (a UReader
    checkpoint holds the same tensors in float32, plus its crop position tables).
    For "lora", the adapter goes to `lora_adapter_dir(out_dir)` (made with make_lora_adapter, seed + 1).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    config = preset_config(preset)
    task = task or Task()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ureader = variant == "ureader"
    train_tokenizer(out_dir / "tokenizer.model", config.text.vocab_size)
    _write_json(out_dir / "config.json", hf_config_dict(config, "float32" if ureader else "bfloat16"))
    for name, obj in tokenizer_side_files(config).items():
        if ureader and name not in UREADER_SIDE_FILES:
            (out_dir / name).unlink(missing_ok=True)  # the UReader release has no such file
        else:
            _write_json(out_dir / name, obj)
    _remove_stale_weights(out_dir)
    specs = checkpoint_specs(config, UREADER if ureader else MPLUG_OWL)
    if ureader:
        specs = [dataclasses.replace(spec, weight_dtype=torch.float32) for spec in specs]
    _write_weights(out_dir, specs, variant, seed, task)
    if variant == "lora":
        make_lora_adapter(out_dir, lora_adapter_dir(out_dir), seed=seed + 1)
    return out_dir


def directory_size(path: Path) -> int:
    """Total bytes of the regular files under path."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------------------------
# LoRA adapter (peft format)


def read_checkpoint_config(checkpoint_dir: Path) -> OwlConfig:
    path = Path(checkpoint_dir) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    return OwlConfig.from_dict(raw)


def llama_config_for(text: TextConfig) -> Any:
    """A transformers LlamaConfig for the checkpoint's language model (eager attention, for exact comparisons)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        rms_norm_eps=text.rms_norm_eps,
        max_position_embeddings=text.max_position_embeddings,
        rope_theta=text.rope_theta,
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id,
    )
    cfg._attn_implementation = "eager"
    return cfg


def make_lora_adapter(
    checkpoint_dir: Path,
    out_dir: Path,
    seed: int = 1,
    r: int = 8,
    alpha: int = 32,
    *,
    text_hidden_override: int | None = None,
    key_layout: str = "llama",
) -> Path:
    """Write a peft LoRA adapter (adapter_config.json + adapter_model.safetensors) for the checkpoint's LLM.

    The adapter targets q_proj and v_proj of every layer (r, alpha, dropout 0.05 as in the reference training);
    both lora_A and lora_B are random (peft's zero B would make it a no-op). Keys, with key_layout "llama"
    (peft on a LlamaForCausalLM, task CAUSAL_LM):
        base_model.model.model.layers.{i}.self_attn.{q,v}_proj.lora_A.weight   [r, hidden]
        base_model.model.model.layers.{i}.self_attn.{q,v}_proj.lora_B.weight   [out, r]
    With key_layout "mplug" (peft on the whole MplugOwlForConditionalGeneration, as mPLUG-Owl's own training
    script saves it) the prefix is base_model.model.language_model.model.layers.{i}... and target_modules is the
    reference regex. base_model_name_or_path is the checkpoint directory.
    text_hidden_override builds the adapter for a different hidden size: an adapter that must not fit the base.
    """
    if key_layout not in ("llama", "mplug"):
        raise ValueError(f"unknown key_layout {key_layout!r}; choose 'llama' or 'mplug'")
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    text = read_checkpoint_config(checkpoint_dir).text
    if text_hidden_override is not None:
        text = dataclasses.replace(text, hidden_size=text_hidden_override)
    model = _skeleton_llama(text)
    model.name_or_path = str(checkpoint_dir)  # what from_pretrained would set; peft records it in the config
    lora_config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=LORA_DROPOUT,
        target_modules=list(LORA_TARGET_MODULES),
        task_type="CAUSAL_LM" if key_layout == "llama" else None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations peft triggers; not ours to fix
        peft_model = get_peft_model(model, lora_config)
    _randomise_lora(peft_model, seed)
    out_dir = Path(out_dir)
    peft_model.save_pretrained(str(out_dir))
    if key_layout == "mplug":
        weights_path = out_dir / "adapter_model.safetensors"
        state = load_file(str(weights_path))
        renamed = {
            k.replace("base_model.model.model.", "base_model.model.language_model.model.", 1): v
            for k, v in state.items()
        }
        save_file(renamed, str(weights_path), metadata={"format": "pt"})
        config_path = out_dir / "adapter_config.json"
        raw = json.loads(config_path.read_text(encoding="utf-8"))
        raw["target_modules"] = LORA_TARGET_REGEX_MPLUG
        _write_json(config_path, raw)
    return out_dir


def _skeleton_llama(text: TextConfig) -> Any:
    """A LlamaForCausalLM with the adapter's shapes, on the meta device: only the LoRA weights are ever real."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(llama_config_for(text))


def _randomise_lora(peft_model: torch.nn.Module, seed: int) -> None:
    """Replace every lora_A / lora_B weight with a seeded random one (A ~ N(0, 1/in), B ~ N(0, 0.05^2))."""
    for name, param in list(peft_model.named_parameters()):
        if ".lora_A." not in name and ".lora_B." not in name:
            continue
        out_features, in_features = param.shape
        std = 1 / math.sqrt(in_features) if ".lora_A." in name else LORA_B_STD
        values = torch.randn((out_features, in_features), generator=_generator(seed, name), dtype=torch.float32)
        module_name, _, attr = name.rpartition(".")
        module = peft_model.get_submodule(module_name)
        setattr(module, attr, torch.nn.Parameter(values * std, requires_grad=False))
