"""Typed settings: defaults, atomic save and load, tolerance of unknown, missing, ill-typed and corrupt content."""

from __future__ import annotations

import json
import os

import pytest

from owl_desktop import paths
from owl_desktop.app.settings import EngineDefaults, SamplingDefaults, Settings, apply_data_dir, backup_path


def test_defaults_match_the_engine_and_cli_defaults() -> None:
    from owl_desktop.engine.llm import LlmSettings, Sampling
    from owl_desktop.engine.pipeline import EngineSettings

    s = Settings()
    assert s.theme == "system" and s.send_on_enter and s.system_prompt is None and s.last_model_id is None
    assert s.to_engine_settings() == EngineSettings(llm=LlmSettings())
    assert s.to_sampling() == Sampling()


def test_round_trip_through_the_config_dir() -> None:
    s = Settings(theme="dark", system_prompt="Be brief.", last_model_id="owl-q4", send_on_enter=False)
    s.sampling = SamplingDefaults(temperature=0.2, top_k=10, seed=42, max_new_tokens=64)
    s.engine = EngineDefaults(n_ctx=4096, threads=6, gpu_layers=0, flash_attn="on", kv_type="q8_0", vision_device="cpu")
    path = s.save()
    assert path == paths.config_dir() / "settings.json"
    assert not [p for p in path.parent.iterdir() if p.name != "settings.json"]  # no temporary file left behind
    loaded = Settings.load()
    assert loaded == s
    eng = loaded.to_engine_settings()
    assert (eng.llm.n_ctx, eng.llm.n_threads, eng.llm.n_gpu_layers, eng.llm.flash_attn, eng.llm.kv_type) == (
        4096,
        6,
        0,
        "on",
        "q8_0",
    )
    assert eng.vision_device == "cpu"
    samp = loaded.to_sampling()
    assert (samp.temperature, samp.top_k, samp.seed, samp.max_new_tokens) == (0.2, 10, 42, 64)


def test_unknown_missing_and_ill_typed_keys_fall_back_per_field() -> None:
    raw = {
        "theme": "neon",  # not a theme
        "future_option": {"x": 1},
        "send_on_enter": "yes",  # not a bool
        "sampling": {"temperature": 1, "top_k": 2.5, "seed": None, "unknown": 3},
        "engine": {"n_ctx": True, "threads": 4, "kv_type": "q4_0"},
        "system_prompt": 12,
        "last_model_id": "demo-tiny-random",
    }
    paths.ensure(paths.config_dir())
    (paths.config_dir() / "settings.json").write_text(json.dumps(raw), encoding="utf-8")
    s = Settings.load()
    assert s.theme == "system" and s.send_on_enter is True and s.system_prompt is None
    assert s.sampling.temperature == 1.0 and isinstance(s.sampling.temperature, float)
    assert s.sampling.top_k == 40 and s.sampling.seed is None
    assert s.engine.n_ctx == 2048 and s.engine.threads == 4 and s.engine.kv_type == "q4_0"
    assert s.last_model_id == "demo-tiny-random"


def test_a_corrupt_file_gives_defaults_and_is_kept_as_bak() -> None:
    path = paths.ensure(paths.config_dir()) / "settings.json"
    path.write_text('{"theme": "dark", ', encoding="utf-8")
    assert Settings.load() == Settings()
    assert backup_path(path).read_text(encoding="utf-8") == '{"theme": "dark", '
    path.write_text("[1, 2]", encoding="utf-8")
    assert Settings.load() == Settings()
    Settings(theme="light").save()
    assert Settings.load().theme == "light"


def test_missing_file_gives_defaults() -> None:
    assert Settings.load() == Settings()


def test_data_dir_setting_applies_unless_the_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    apply_data_dir(Settings(data_dir="/elsewhere"))
    assert str(paths.data_dir()) != "/elsewhere" and os.environ["OWL_DATA_DIR"] != "/elsewhere"
    monkeypatch.delenv("OWL_DATA_DIR")
    apply_data_dir(Settings(data_dir="/elsewhere"))
    assert str(paths.data_dir()) == "/elsewhere"
