"""The app's typed settings, with their defaults declared once, stored as JSON in the config dir.

Loading never fails: unknown keys are ignored, missing or ill-typed ones take their default, and a corrupt file is
kept as settings.json.bak while the app starts with defaults. Saving is atomic (temporary file, fsync, rename).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from owl_desktop import paths
from owl_desktop.atomic import write_atomic
from owl_desktop.engine import options
from owl_desktop.engine.options import LlmSettings, Sampling

if TYPE_CHECKING:  # the pipeline pulls in torch and llama.cpp: imported only when settings are turned into its types
    from owl_desktop.engine.pipeline import EngineSettings

log = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
THEMES = ("system", "light", "dark")

# fields restricted to a set of values (dataclass name, field name) → choices
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("Settings", "theme"): THEMES,
    ("EngineDefaults", "flash_attn"): tuple(options.FLASH_ATTN_IDS),
    ("EngineDefaults", "kv_type"): tuple(options.KV_TYPE_IDS),
    ("EngineDefaults", "vision_device"): tuple(options.VISION_DEVICES),
    ("EngineDefaults", "vision_dtype"): options.VISION_DTYPES,
}


@dataclass
class SamplingDefaults:
    """The sampling a new answer gets; defaults are the engine's (engine/options.py)."""

    temperature: float = Sampling.temperature
    top_k: int = Sampling.top_k
    top_p: float = Sampling.top_p
    min_p: float = Sampling.min_p
    repeat_penalty: float = Sampling.repeat_penalty
    no_repeat_ngram: int = Sampling.no_repeat_ngram
    max_new_tokens: int = Sampling.max_new_tokens
    seed: int | None = None  # None: a fresh random seed for each answer


@dataclass
class EngineDefaults:
    """How the engine runs; defaults are the engine's (engine/options.py)."""

    n_ctx: int = LlmSettings.n_ctx
    threads: int | None = None  # None: the physical cores
    gpu_layers: int = LlmSettings.n_gpu_layers  # -1: all layers on the GPU when there is one
    flash_attn: str = LlmSettings.flash_attn
    kv_type: str = LlmSettings.kv_type
    vision_device: str = "auto"
    vision_dtype: str = "auto"


@dataclass
class ApiServerDefaults:
    """The local API server (Settings → Local API server): off until the user turns it on; see server/."""

    enabled: bool = False
    # "OWL" on a phone keypad is 695. No peer listens on 8695: LM Studio 1234, Ollama 11434, Jan 1337, GPT4All 4891,
    # llama-server 8080, llama-cpp-python's server 8000.
    port: int = 8695
    allow_network: bool = False  # listen on every address (only with an API key), not only on 127.0.0.1
    api_key: str = ""  # "": none (allowed only without allow_network)
    cors_origins: str = ""  # browser origins allowed to call it, separated by spaces or commas


@dataclass
class Settings:
    theme: str = "system"
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    engine: EngineDefaults = field(default_factory=EngineDefaults)
    api_server: ApiServerDefaults = field(default_factory=ApiServerDefaults)
    system_prompt: str | None = None  # None: the model bundle's own system prompt
    last_model_id: str | None = None
    send_on_enter: bool = True
    sidebar_hidden: bool = False  # Ctrl+B in the window
    data_dir: str | None = None  # None: the platform default (or OWL_DATA_DIR); see apply_data_dir

    # ------------------------------------------------------------------ conversions

    def to_engine_settings(self) -> EngineSettings:
        from owl_desktop.engine.pipeline import EngineSettings

        e = self.engine
        llm = LlmSettings(
            n_ctx=e.n_ctx, n_threads=e.threads, n_gpu_layers=e.gpu_layers, flash_attn=e.flash_attn, kv_type=e.kv_type
        )
        return EngineSettings(llm=llm, vision_device=e.vision_device, vision_dtype=e.vision_dtype)

    def to_sampling(self) -> Sampling:
        return Sampling(**asdict(self.sampling))  # SamplingDefaults' fields are a subset of Sampling's

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> Settings:
        """Settings from parsed JSON, keeping every valid value and defaulting the rest."""
        return _build(cls, raw)

    # ------------------------------------------------------------------ file

    @classmethod
    def load(cls, path: Path | None = None) -> Settings:
        """The saved settings, or defaults (a corrupt file is kept as <name>.bak)."""
        path = path or default_path()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls()
        except OSError as exc:
            log.warning("cannot read %s (%s); using default settings", path, exc)
            return cls()
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            log.warning("settings file %s is corrupt (%s); kept as .bak, using defaults", path, exc)
            try:
                shutil.copyfile(path, backup_path(path))
            except OSError:
                pass
            return cls()
        return cls.from_dict(raw)

    def save(self, path: Path | None = None) -> Path:
        path = path or default_path()
        data = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        write_atomic(path, data.encode("utf-8"))
        return path


def default_path() -> Path:
    return paths.config_dir() / SETTINGS_FILE


def backup_path(path: Path) -> Path:
    return path.with_name(path.name + ".bak")


def apply_data_dir(settings: Settings) -> None:
    """Point paths.data_dir() at the chosen data folder (an OWL_DATA_DIR set by the user wins). Call at startup."""
    if settings.data_dir and "OWL_DATA_DIR" not in os.environ:
        os.environ["OWL_DATA_DIR"] = settings.data_dir


# ---------------------------------------------------------------------------------------------------- validation


def _build(cls: type, raw: Any) -> Any:
    out = cls()
    if not isinstance(raw, dict):
        return out
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name not in raw:
            continue
        value = _coerce(hints[f.name], raw[f.name], (cls.__name__, f.name))
        if value is not _INVALID:
            setattr(out, f.name, value)
    return out


_INVALID = object()


def _coerce(hint: Any, value: Any, key: tuple[str, str]) -> Any:
    """`value` as type `hint`, or _INVALID."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
    if isinstance(hint, type) and hasattr(hint, "__dataclass_fields__"):
        return _build(hint, value) if isinstance(value, dict) else _INVALID
    if hint is bool:
        return value if isinstance(value, bool) else _INVALID
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _INVALID
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok and value == value else _INVALID  # NaN is refused
    if hint is str:
        if not isinstance(value, str):
            return _INVALID
        choices = CHOICES.get(key)
        return value if choices is None or value in choices else _INVALID
    return _INVALID
