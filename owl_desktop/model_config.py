"""The mPLUG-Owl v1 model configuration, read from a checkpoint's config.json.

Defaults are those of the reference code; the checkpoint's values override them. The same dataclasses
describe the tiny random checkpoints the tests build and travel inside bundle.json.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from owl_desktop.errors import CheckpointError

# LayerNorm eps of the abstractor's norm1 / normk / norm2 (nn.LayerNorm default in the reference code);
# the configured layer_norm_eps applies only to the SwiGLU's inner ffn_ln.
ABSTRACTOR_ATTN_LN_EPS = 1e-5


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + 1  # + CLS: 257 for 224 / 14


@dataclass(frozen=True)
class AbstractorConfig:
    hidden_size: int = 1024
    num_hidden_layers: int = 6
    num_attention_heads: int = 16
    intermediate_size: int = 2816
    layer_norm_eps: float = 1e-6
    encoder_hidden_size: int = 1024


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class OwlConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    abstractor: AbstractorConfig = field(default_factory=AbstractorConfig)
    text: TextConfig = field(default_factory=TextConfig)
    num_query_tokens: int = 64

    @property
    def image_rows(self) -> int:
        """Rows one image contributes to the LLM: the queries plus the learned vit_eos vector."""
        return self.num_query_tokens + 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "vision_config": dataclasses.asdict(self.vision),
            "visual_abstractor_config": dataclasses.asdict(self.abstractor),
            "text_config": dataclasses.asdict(self.text),
            "num_query_tokens": self.num_query_tokens,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> OwlConfig:
        """Parse a checkpoint's config.json (or the `config` of a bundle.json)."""
        if not isinstance(raw, dict):
            raise CheckpointError("config.json is not a JSON object")
        model_type = raw.get("model_type")
        if model_type is not None and model_type not in ("mplug-owl", "mplug_owl"):
            raise CheckpointError(f"config.json describes a '{model_type}' model, not mPLUG-Owl")
        missing = [k for k in ("vision_config", "visual_abstractor_config", "text_config") if k not in raw]
        if missing:
            raise CheckpointError(f"config.json lacks {', '.join(missing)}: not an mPLUG-Owl checkpoint")
        text_raw = dict(raw["text_config"])
        if "num_key_value_heads" not in text_raw or text_raw["num_key_value_heads"] is None:
            text_raw["num_key_value_heads"] = text_raw.get("num_attention_heads", TextConfig.num_attention_heads)
        if text_raw.get("rope_theta") is None:
            text_raw["rope_theta"] = (text_raw.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        try:
            return cls(
                vision=_pick(VisionConfig, raw["vision_config"]),
                abstractor=_pick(AbstractorConfig, raw["visual_abstractor_config"]),
                text=_pick(TextConfig, text_raw),
                num_query_tokens=int(raw.get("num_query_tokens", 64)),
            )
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"config.json has an invalid value: {exc}") from exc


def _pick(cls: type, raw: Any) -> Any:
    """Build a config dataclass from the known keys of a dict, casting each to the field's type."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"config.json: {cls.__name__} section is not an object")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in raw and raw[f.name] is not None:
            caster = float if f.type in ("float", float) else int
            kwargs[f.name] = caster(raw[f.name])
    return cls(**kwargs)
