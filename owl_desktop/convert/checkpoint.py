"""Find, validate and read a Hugging Face mPLUG-Owl (or UReader) checkpoint, one tensor at a time.

Formats: `pytorch_model.bin` (a torch zip pickle), sharded `.bin` with `pytorch_model.bin.index.json`, and
`model.safetensors` (single or sharded with `model.safetensors.index.json`).

Safety: pickles are only ever read with `torch.load(..., weights_only=True)`, which refuses anything but tensors
and plain containers; a pickle that would run code is reported as such. Memory: zip pickles are memory-mapped
(`mmap=True`), so opening a checkpoint reads only its pickle; a tensor's bytes are read when it is used, and
`release()` hands its pages back afterwards (see pages.py).
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open

from owl_desktop.convert.layout import Layout, Shape, expected_tensors, family_of, is_dropped_tensor
from owl_desktop.convert.pages import FileMappings
from owl_desktop.errors import CheckpointError
from owl_desktop.model_config import OwlConfig

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_PROBLEMS_SHOWN = 3


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: Shape
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class _WeightsFile(Protocol):
    path: Path

    def metas(self) -> dict[str, TensorMeta]: ...

    def load(self, name: str) -> torch.Tensor: ...

    def release(self, tensor: torch.Tensor) -> None: ...

    def close(self) -> None: ...


class _PickleFile:
    """One torch zip pickle, memory-mapped; tensors are views into the file mapping."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tensors = load_pickled_weights(path)
        self._mappings = FileMappings.find(path)

    def metas(self) -> dict[str, TensorMeta]:
        return {k: TensorMeta(k, tuple(t.shape), t.dtype) for k, t in self._tensors.items()}

    def load(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def release(self, tensor: torch.Tensor) -> None:
        self._mappings.release(tensor)

    def close(self) -> None:
        self._tensors = {}


class _SafetensorsFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._handle = safe_open(str(path), framework="pt", device="cpu")
            self._metas = {k: self._meta(k) for k in self._handle.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path.name} is truncated or not a valid safetensors file ({exc})") from exc
        self._mappings = FileMappings.find(path)

    def _meta(self, name: str) -> TensorMeta:
        sl = self._handle.get_slice(name)
        dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
        if dtype is None:
            raise CheckpointError(f"{self.path.name}: tensor {name} has unsupported dtype {sl.get_dtype()}")
        return TensorMeta(name, tuple(sl.get_shape()), dtype)

    def metas(self) -> dict[str, TensorMeta]:
        return dict(self._metas)

    def load(self, name: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{self.path.name}: cannot read tensor {name} ({exc})") from exc

    def release(self, tensor: torch.Tensor) -> None:
        self._mappings.release(tensor)

    def close(self) -> None:
        self._handle = None  # type: ignore[assignment]


def load_pickled_weights(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True (never arbitrary unpickling), memory-mapped when the format allows."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap can only be used" not in str(exc):
                raise
            # legacy (pre-zip) pickle: cannot be mapped, so it is read whole
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        what = _unsafe_global(str(exc))
        raise CheckpointError(
            f"refusing to load {path.name}: its pickle carries code or objects other than tensors{what}; "
            "only plain weight files are accepted"
        ) from exc
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path.name} is truncated or corrupted ({_first_line(exc)})") from exc
    if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise CheckpointError(f"{path.name} is not a state dict of named tensors")
    return obj


def _unsafe_global(message: str) -> str:
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message) or re.search(r"GLOBAL ([\w.]+)", message)
    return f" (it calls {m.group(1)})" if m else ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@dataclass
class Checkpoint:
    """An opened, validated checkpoint: its config, tokenizer, and every tensor's metadata."""

    path: Path
    config: OwlConfig
    raw_config: dict[str, Any]
    tokenizer_path: Path
    format: str  # "bin", "sharded-bin", "safetensors" or "sharded-safetensors"
    layout: Layout
    tensors: dict[str, TensorMeta]  # full HF names, dropped buffers excluded
    family: str = "mplug-owl"  # or "ureader": found from the tensors (model_family.py)
    _files: list[_WeightsFile] = field(repr=False, default_factory=list)
    _owner: dict[str, _WeightsFile] = field(repr=False, default_factory=dict)

    def load(self, name: str) -> torch.Tensor:
        """The tensor `name` (full HF name); its bytes are read from disk on first use."""
        return self._owner[name].load(name)

    def release(self, name: str, tensor: torch.Tensor) -> None:
        """Hand back the pages of a tensor that has been written (memory-mapped sources only)."""
        self._owner[name].release(tensor)

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files.clear()
        self._owner.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def llm_dtype(self) -> torch.dtype:
        """The dtype of the language model's matrices (bf16 for the released checkpoints)."""
        dtypes = {m.dtype for k, m in self.tensors.items() if k.startswith("language_model.") and len(m.shape) == 2}
        return dtypes.pop() if len(dtypes) == 1 else torch.float32


def open_checkpoint(src: Path) -> Checkpoint:
    """Open `src` (a checkpoint folder), check it is a complete mPLUG-Owl v1 checkpoint, and index its tensors."""
    src = Path(src).expanduser()
    if not src.exists():
        raise CheckpointError(f"{src} does not exist")
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a folder; pass the checkpoint folder (with config.json)")
    raw = _read_config(src)
    config = OwlConfig.from_dict(raw)
    _check_text_config(raw)
    tokenizer = src / TOKENIZER_FILE
    if not tokenizer.is_file():
        raise CheckpointError(f"{src} has no {TOKENIZER_FILE} (the LLaMA SentencePiece tokenizer); it is required")
    fmt, paths, weight_map = _find_weights(src)
    files: list[_WeightsFile] = []
    try:
        for p in paths:
            files.append(_SafetensorsFile(p) if p.suffix == ".safetensors" else _PickleFile(p))
        owner, metas = _index_tensors(files, weight_map)
        family = family_of(metas)
        tied = bool(raw.get("text_config", {}).get("tie_word_embeddings"))
        layout = expected_tensors(config, tied_embeddings=tied, family=family)
        check_tensors(metas, layout)
    except BaseException:
        for f in files:
            f.close()
        raise
    return Checkpoint(src, config, raw, tokenizer, fmt, layout, metas, family=family, _files=files, _owner=owner)


def _read_config(src: Path) -> dict[str, Any]:
    path = src / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{src} is not an mPLUG-Owl checkpoint: it has no {CONFIG_FILE}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    if raw.get("model_type") not in ("mplug-owl", "mplug_owl"):
        kind = raw.get("model_type")
        raise CheckpointError(
            f"{src} is not an mPLUG-Owl checkpoint: config.json says model_type {kind!r}, expected 'mplug-owl'"
            if kind
            else f"{src} is not an mPLUG-Owl checkpoint: config.json has no model_type"
        )
    return raw


def _check_text_config(raw: dict[str, Any]) -> None:
    text = raw.get("text_config") or {}
    model_type = text.get("model_type", "llama")
    if model_type != "llama":
        raise CheckpointError(f"the language model is '{model_type}'; only LLaMA language models can be converted")
    scaling = text.get("rope_scaling")
    rope_type = (text.get("rope_parameters") or {}).get("rope_type", "default")
    if scaling or rope_type not in ("default", None):
        raise CheckpointError("the language model uses RoPE scaling, which this converter does not support")


def _find_weights(src: Path) -> tuple[str, list[Path], dict[str, str] | None]:
    for index_name, fmt in ((SAFETENSORS_INDEX, "sharded-safetensors"), (BIN_INDEX, "sharded-bin")):
        index = src / index_name
        if index.is_file():
            weight_map = _read_index(index)
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (src / s).is_file()]
            if missing:
                raise CheckpointError(f"{src}: shard {missing[0]} listed in {index_name} is missing")
            return fmt, [src / s for s in shards], weight_map
    if (src / SAFETENSORS_FILE).is_file():
        return "safetensors", [src / SAFETENSORS_FILE], None
    if (src / BIN_FILE).is_file():
        return "bin", [src / BIN_FILE], None
    raise CheckpointError(
        f"{src} has no weights: expected {BIN_FILE}, {SAFETENSORS_FILE}, or a sharded {BIN_INDEX} / {SAFETENSORS_INDEX}"
    )


def _read_index(index: Path) -> dict[str, str]:
    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
        weight_map = raw["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index.name} is not a valid shard index ({exc})") from exc
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index.name} has an empty weight_map")
    for shard in weight_map.values():
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise CheckpointError(f"{index.name} names an invalid shard file {shard!r}")
    return {str(k): str(v) for k, v in weight_map.items()}


def _index_tensors(
    files: list[_WeightsFile], weight_map: dict[str, str] | None
) -> tuple[dict[str, _WeightsFile], dict[str, TensorMeta]]:
    owner: dict[str, _WeightsFile] = {}
    metas: dict[str, TensorMeta] = {}
    for f in files:
        for name, meta in f.metas().items():
            if name in owner:
                raise CheckpointError(f"tensor {name} appears in both {owner[name].path.name} and {f.path.name}")
            if weight_map is not None and weight_map.get(name) not in (None, f.path.name):
                raise CheckpointError(f"tensor {name} is in {f.path.name} but the index places it elsewhere")
            owner[name] = f
            if not is_dropped_tensor(name):
                metas[name] = meta
    if weight_map is not None:
        absent = [k for k in weight_map if k not in owner]
        if absent:
            raise CheckpointError(f"tensor {absent[0]} listed in the shard index is missing from its shard")
    return owner, metas


def check_tensors(metas: dict[str, TensorMeta], layout: Layout) -> None:
    """Every expected tensor present with its exact shape and a float dtype; nothing unknown."""
    expected = layout.full_names()
    missing = [k for k in expected if k not in metas]
    if missing:
        raise CheckpointError(f"checkpoint is missing {_some(missing)}: incomplete, or not mPLUG-Owl v1")
    wrong = [
        f"{k} has shape {list(metas[k].shape)}, expected {list(shape)}"
        for k, shape in expected.items()
        if metas[k].shape != shape
    ]
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise CheckpointError(f"tensor {wrong[0]}{more}: the weights do not match config.json")
    unknown = [k for k in metas if k not in expected]
    if unknown:
        raise CheckpointError(f"checkpoint has unexpected {_some(unknown)}: not the mPLUG-Owl v1 layout")
    not_float = [k for k, m in metas.items() if not m.dtype.is_floating_point]
    if not_float:
        raise CheckpointError(f"tensor {not_float[0]} is {metas[not_float[0]].dtype}, expected floating point")


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_PROBLEMS_SHOWN])
    more = f" and {len(names) - _MAX_PROBLEMS_SHOWN} more" if len(names) > _MAX_PROBLEMS_SHOWN else ""
    noun = "tensor" if len(names) == 1 else "tensors"
    return f"{noun} {shown}{more}"
