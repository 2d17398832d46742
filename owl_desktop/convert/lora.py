"""A peft LoRA adapter, merged into the language model one weight at a time while the GGUF is written.

peft's `merge_and_unload()` needs the whole model in memory (13.5 GB for LLaMA-7B in bf16); here each adapted
weight gets W ← W + s·B·A just before it is written, where s = lora_alpha / r (or lora_alpha / √r with rsLoRA).

Adapter keys may be relative to a bare LlamaForCausalLM
(`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`) or to the whole mPLUG-Owl model
(`base_model.model.language_model.model.layers.N.self_attn.q_proj.lora_A.default.weight`); both are accepted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from owl_desktop.convert.checkpoint import load_pickled_weights
from owl_desktop.convert.layout import LLM_PREFIX, VISION_PREFIXES, Shape
from owl_desktop.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraUpdate:
    """ΔW = scale · B @ A for one weight of the language model."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float
    fan_in_fan_out: bool = False

    def delta(self) -> torch.Tensor:
        d = self.b.float() @ self.a.float()  # [out, in]
        if self.fan_in_fan_out:
            d = d.T  # the base weight is stored [in, out]
        return d * self.scale


@dataclass(frozen=True)
class LoraAdapter:
    path: Path
    rank: int
    alpha: float
    use_rslora: bool
    base_model: str | None
    updates: dict[str, LoraUpdate]  # LLM weight name (e.g. "model.layers.0.self_attn.q_proj.weight") → update

    def merge(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """`weight` with its update added (float32), or `weight` unchanged if the adapter does not touch it."""
        update = self.updates.get(name)
        if update is None:
            return weight
        return weight.float() + update.delta()  # [out, in]

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "base_model": self.base_model,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "targets": sorted({n.rsplit(".", 2)[-2] for n in self.updates}),
        }


def load_adapter(path: Path, llm_shapes: dict[str, Shape]) -> LoraAdapter:
    """Read a peft LoRA adapter folder and check that it fits the language model whose shapes are given."""
    path = Path(path).expanduser()
    config = _read_config(path)
    weights = _read_weights(path)
    modules = _group_by_module(weights, path)
    updates: dict[str, LoraUpdate] = {}
    for module, pair in modules.items():
        weight_name = _llm_weight_name(module)
        updates[weight_name] = _make_update(module, weight_name, pair, config, llm_shapes)
    if not updates:
        raise CheckpointError(f"LoRA adapter {path.name} holds no LoRA weights")
    return LoraAdapter(
        path=path,
        rank=int(config.r),
        alpha=float(config.lora_alpha),
        use_rslora=bool(getattr(config, "use_rslora", False)),
        base_model=getattr(config, "base_model_name_or_path", None),
        updates=updates,
    )


def _read_config(path: Path) -> Any:
    if not path.is_dir():
        raise CheckpointError(f"LoRA adapter {path} is not a folder")
    if not (path / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{path} is not a peft adapter: it has no {ADAPTER_CONFIG}")
    from peft import LoraConfig, PeftConfig  # heavy import, only when an adapter is given

    try:
        config = PeftConfig.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{path / ADAPTER_CONFIG} is not a valid peft config ({exc})") from exc
    if not isinstance(config, LoraConfig):
        raise CheckpointError(f"{path.name} is a {config.peft_type} adapter; only LoRA adapters can be merged")
    if getattr(config, "use_dora", False):
        raise CheckpointError(f"{path.name} is a DoRA adapter; only plain LoRA can be merged")
    if getattr(config, "bias", "none") != "none":
        raise CheckpointError(f"{path.name} trains biases (bias={config.bias!r}); LLaMA has none to merge them into")
    return config


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    for name in ADAPTER_WEIGHTS:
        f = path / name
        if not f.is_file():
            continue
        if f.suffix == ".safetensors":
            try:
                return load_file(str(f))
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{f.name} is truncated or not a valid safetensors file ({exc})") from exc
        return load_pickled_weights(f)
    raise CheckpointError(f"{path} has no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")


def _group_by_module(weights: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise CheckpointError(f"{path.name}: unsupported adapter tensor {key} (only lora_A / lora_B are merged)")
        modules.setdefault(m.group("module"), {})[m.group("which")] = tensor
    for module, pair in modules.items():
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"{path.name}: {module} has lora_{next(iter(pair))} without its partner")
    return modules


def _llm_weight_name(module: str) -> str:
    """The language-model weight a peft module path refers to, whichever model the adapter was saved from."""
    name = module.removeprefix(_PEFT_PREFIX)
    if name.startswith(LLM_PREFIX):
        name = name[len(LLM_PREFIX) :]
    elif name.startswith(VISION_PREFIXES):
        raise CheckpointError(
            f"the LoRA adapter changes the vision tower ({name}); only language-model LoRA can be merged"
        )
    return name + ".weight"


def _make_update(
    module: str, weight_name: str, pair: dict[str, torch.Tensor], config: Any, llm_shapes: dict[str, Shape]
) -> LoraUpdate:
    target = llm_shapes.get(weight_name)
    if target is None or len(target) != 2:
        raise CheckpointError(
            f"the LoRA adapter targets {module.removeprefix(_PEFT_PREFIX)}, which this model does not have: "
            "it was made for another base model"
        )
    a, b = pair["A"], pair["B"]  # [r, in], [out, r]
    fan_in_fan_out = bool(getattr(config, "fan_in_fan_out", False))
    out_dim, in_dim = (target[1], target[0]) if fan_in_fan_out else target
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != (out_dim, in_dim):
        raise CheckpointError(
            f"the LoRA adapter does not fit this model: {weight_name} is {list(target)} but the adapter's update "
            f"is {[b.shape[0], a.shape[1]] if a.dim() == 2 and b.dim() == 2 else 'malformed'} "
            "(an adapter for another base model?)"
        )
    rank = a.shape[0]
    alpha = _pattern_value(getattr(config, "alpha_pattern", None) or {}, module, float(config.lora_alpha))
    scale = alpha / math.sqrt(rank) if getattr(config, "use_rslora", False) else alpha / rank
    return LoraUpdate(a=a, b=b, scale=scale, fan_in_fan_out=fan_in_fan_out)


def _pattern_value(patterns: dict[str, Any], module: str, default: float) -> float:
    """peft's per-module override: the first pattern that matches the end of the module path."""
    key = module.removeprefix(_PEFT_PREFIX)
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return float(value)
    return default
