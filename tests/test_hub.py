"""The model manager against a local hub on 127.0.0.1 (devtools/hubserver.py) serving a tiny random checkpoint.

HF_ENDPOINT points at the server; HF_HUB_OFFLINE (set for every test in conftest) is lifted here, in the
environment and in huggingface_hub's import-time copy of it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
from PIL import Image

from owl_desktop import bundle as bundle_mod
from owl_desktop import paths
from owl_desktop.cli import main as cli_main
from owl_desktop.devtools.hubserver import Fault, HubServer, point_hub_clients_at
from owl_desktop.devtools.tiny_checkpoint import checkpoint_specs, make_checkpoint, preset_config
from owl_desktop.errors import BundleError, CheckpointError, DownloadError, DownloadPaused, PreflightError
from owl_desktop.hub.catalog import CATALOG, DEFAULT_REPO, lookup
from owl_desktop.hub.download import partial_path
from owl_desktop.hub.estimates import ModelFacts, footprint
from owl_desktop.hub.manager import ModelManager
from owl_desktop.hub.preflight import MemoryInfo, check
from owl_desktop.hub.retry import RetryPolicy
from owl_desktop.hub.snapshot import folder_name
from owl_desktop.tasks import CancelToken, Task

GATED = "owl-tests/gated-owl"
TOKEN = "hf_owl_test_token"
BIN = "pytorch_model.bin"
GiB = 1 << 30
FAST = RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.2, stall_timeout=1.0, connect_timeout=5.0)
ROOMY = MemoryInfo(ram_total=64 * GiB, ram_available=48 * GiB)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("hub") / "mplug-owl-tiny", "bin", preset="tiny", seed=0)


@pytest.fixture
def hub(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    server = HubServer(token=TOKEN)
    server.add_repo(DEFAULT_REPO, tiny_ckpt)
    server.add_repo(GATED, tiny_ckpt, gated=True)
    with server:
        point_hub_clients_at(server, monkeypatch, tmp_path)
        yield server


def manager(**kwargs: object) -> ModelManager:
    kwargs.setdefault("retry", FAST)
    kwargs.setdefault("memory", lambda: ROOMY)
    return ModelManager(**kwargs)  # type: ignore[arg-type]


def bin_size(ckpt: Path) -> int:
    return (ckpt / BIN).stat().st_size


def download_dir(repo_id: str = DEFAULT_REPO) -> Path:
    return paths.downloads_dir() / folder_name(repo_id)


def bin_gets(server: HubServer) -> list[str | None]:
    """The Range header of every GET of the weights file that reached the CDN."""
    return [h.range for h in server.hits if h.server == "cdn" and h.method == "GET" and h.file == BIN]


# ----------------------------------------------------------------------------------------------------------------
# catalog and preflight (no network)


def test_catalog_lists_the_releases_with_sizes_per_quantization() -> None:
    ureader = "Mizukiluke/ureader-v1"
    assert [e.repo_id for e in CATALOG] == [DEFAULT_REPO, f"{DEFAULT_REPO}-ft", f"{DEFAULT_REPO}-pt", ureader]
    default = lookup(DEFAULT_REPO.upper())
    assert default is not None and default.default and default.chat
    assert lookup(f"{DEFAULT_REPO}-pt").chat is False  # type: ignore[union-attr]
    for e in CATALOG:
        assert e.revision and e.license and e.description and "\n" not in e.description
        assert {"config.json", "tokenizer.model"} <= set(e.files)
        if e.repo_id == ureader:  # three float32 shards: 9.98 + 9.96 + 8.55 GB
            assert 28.4e9 < e.download_bytes < 28.6e9
        else:
            assert 14.0e9 < e.download_bytes < 14.5e9
        assert 6.73e9 < e.facts.llm_params < 6.75e9 and 0.38e9 < e.facts.vision_params < 0.39e9
        fps = e.footprints(2048)
        assert [f.quant for f in fps] == ["Q4_K_M", "Q5_K_M", "Q8_0", "F16", "F32"]
        assert all(a.bundle < b.bundle and a.ram < b.ram for a, b in zip(fps, fps[1:], strict=False))
        assert fps[0].kv_cache == 2 * 32 * 2048 * 4096 * 2  # f16 K and V (default), 32 layers, 2048 positions
        assert 3.7e9 < fps[0].llm_file < 4.3e9  # LLaMA-7B Q4_K_M is ~4.08 GB
    assert {"pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"} <= set(CATALOG[1].files)
    doc = lookup(ureader)
    assert doc is not None and doc.chat and not doc.default
    assert {f"pytorch_model-0000{i}-of-00003.bin" for i in (1, 2, 3)} < set(doc.files)
    assert "special_tokens_map.json" not in doc.files and "preprocessor_config.json" not in doc.files
    assert all(word in doc.description for word in ("documents", "charts", "tables", "web pages", "English"))


def test_parameter_counts_match_the_checkpoint_layout() -> None:
    cfg = preset_config("tiny")
    specs = [s for s in checkpoint_specs(cfg) if s.kind != "inv_freq"]
    facts = ModelFacts.from_config(cfg)
    numel = {s.name: int(np.prod(s.shape)) for s in specs}
    assert facts.llm_params == sum(n for k, n in numel.items() if k.startswith("language_model."))
    assert facts.vision_params == sum(n for k, n in numel.items() if not k.startswith("language_model."))


def test_preflight_recommends_a_quantization_and_says_when_it_will_not_fit(tmp_path: Path) -> None:
    facts = CATALOG[0].facts

    def run(memory: MemoryInfo, free: int, quant: str = "Q4_K_M") -> object:
        return check(
            repo_id=DEFAULT_REPO, quant=quant, n_ctx=2048, facts=facts, download_needed=14 * GiB,
            downloads_dir=tmp_path / "dl", models_dir=tmp_path / "models", free_space=lambda _p: free, memory=memory,
        )  # fmt: skip

    laptop = run(MemoryInfo(16 * GiB, 10 * GiB), 500 * GiB)
    assert laptop.fits and laptop.recommended == "Q4_K_M"  # type: ignore[attr-defined]
    assert not laptop.option("F32").fits and laptop.option("Q8_0").fits  # type: ignore[attr-defined]
    f16 = run(MemoryInfo(14 * GiB, 10 * GiB), 500 * GiB, quant="F16")
    assert not f16.memory_ok and "F16 will NOT fit" in f16.summary()  # type: ignore[attr-defined]
    tiny_ram = run(MemoryInfo(4 * GiB, 3 * GiB), 500 * GiB)
    assert tiny_ram.recommended is None and not tiny_ram.fits  # type: ignore[attr-defined]
    assert "will NOT fit" in tiny_ram.summary()  # type: ignore[attr-defined]
    gpu = run(MemoryInfo(32 * GiB, 20 * GiB, "RTX", 24 * GiB, 23 * GiB), 500 * GiB)
    assert gpu.recommended == "Q8_0" and "runs entirely on the GPU" in gpu.summary()  # type: ignore[attr-defined]
    full_disk = run(MemoryInfo(16 * GiB, 10 * GiB), 20 * GiB)
    assert not full_disk.disk_ok and "NOT ENOUGH" in full_disk.summary()  # type: ignore[attr-defined]
    needed = full_disk.disks[0].needed  # type: ignore[attr-defined]
    assert needed == 14 * GiB + footprint(facts, "Q4_K_M").conversion_peak  # download + conversion, one disk


def test_the_gpu_estimate_counts_the_cache_that_backend_runs_with() -> None:
    """With a q8_0 cache chosen: on Vulkan flash attention stays off (see options.attention_on), so the cache is f16
    in GPU memory and the attention scores need a buffer; other backends keep the q8_0 cache. The CPU's figure never
    changes."""
    facts = CATALOG[0].facts
    cpu_only, vulkan, cuda = (
        footprint(facts, "Q4_K_M", kv_type="q8_0", gpu_backend=b) for b in (None, "Vulkan", "CUDA")
    )
    assert vulkan.ram == cuda.ram == cpu_only.ram and cuda.vram == cpu_only.vram
    f16_cache = 2 * 32 * 2048 * 4096 * 2  # K and V, 32 layers, 2048 positions
    scores = 2048 * 512 * 32 * 4  # one batch of 512 against the context, 32 heads, float32
    assert vulkan.vram - cpu_only.vram == f16_cache - cpu_only.kv_cache + scores


# ----------------------------------------------------------------------------------------------------------------
# pull end to end


def test_models_pull_downloads_verifies_converts_and_the_bundle_answers(
    hub: HubServer, tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["models", "pull", DEFAULT_REPO]) == 0
    out = capsys.readouterr()
    assert "mplug-owl-llama-7b-q4_k_m" in out.out and "verdict: fits" in out.err
    bundle = paths.models_dir() / "mplug-owl-llama-7b-q4_k_m"
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["quantization"] == "Q4_K_M"
    assert manifest["source"]["repo"] == DEFAULT_REPO
    assert manifest["source"]["revision"] == hub.state.repos[DEFAULT_REPO].commit
    assert not download_dir().exists()  # the source checkpoint was removed
    assert hub.bytes_sent(BIN) == bin_size(tiny_ckpt)
    assert not any(h.authorized for h in hub.hits if h.server == "cdn")

    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(image)
    ask = ["ask", "--model", bundle.name, "--image", str(image), "--greedy", "--max-new-tokens", "4", "--threads", "2"]
    assert cli_main([*ask, "--json", "What is in the picture?"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert len(answer["token_ids"]) == 4 and answer["answer"]

    assert cli_main(["models", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["id"] for m in listed["installed"]] == [bundle.name] and listed["installed"][0]["ok"]
    assert listed["downloads"] == [] and len(listed["catalog"]) == len(CATALOG)
    assert cli_main(["models", "rename", bundle.name, "  My owl  "]) == 0
    assert "now shown as: My owl" in capsys.readouterr().out
    assert cli_main(["models", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["installed"][0]["name"] == "My owl"

    assert cli_main(["models", "pull", DEFAULT_REPO]) == 0  # same commit: nothing fetched again
    assert hub.bytes_sent(BIN) == bin_size(tiny_ckpt)
    assert cli_main(["models", "verify", bundle.name]) == 0
    assert "matches its sha256" in capsys.readouterr().out
    assert cli_main(["models", "rm", bundle.name]) == 0
    assert "MiB freed" in capsys.readouterr().out and not bundle.exists()


def test_pull_keep_source_then_convert_again_offline(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    m = manager()
    m.pull(DEFAULT_REPO, "Q8_0", keep_source=True)
    [kept] = m.downloads()
    assert kept.complete and kept.repo_id == DEFAULT_REPO and m.partial_downloads() == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub.hits)
    out = m.pull(DEFAULT_REPO, "F16", keep_source=True)  # a verified checkpoint on disk: no network needed
    assert out.name == "mplug-owl-llama-7b-f16" and len(hub.hits) == before
    assert {b.quant for b in m.installed()} == {"Q8_0", "F16"}


# ----------------------------------------------------------------------------------------------------------------
# faults


def test_dropped_connection_resumes_from_the_partial_bytes(hub: HubServer, tiny_ckpt: Path) -> None:
    size = bin_size(tiny_ckpt)
    hub.inject(Fault("drop", BIN, at=size // 2))
    seen: list[str] = []
    folder = manager().download(DEFAULT_REPO, task=Task(lambda p: seen.append(p.stage)))
    assert (folder / BIN).read_bytes() == (tiny_ckpt / BIN).read_bytes()
    assert bin_gets(hub) == [None, f"bytes={size // 2}-"]
    assert hub.bytes_sent(BIN) < 1.1 * size  # measured: exactly 1.0x, nothing fetched twice
    assert any("connection dropped" in s and "retrying" in s for s in seen)
    assert not partial_path(folder / BIN).exists()


def test_corrupted_bytes_are_detected_and_the_file_is_not_accepted(
    hub: HubServer, tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.inject(Fault("corrupt", BIN, at=bin_size(tiny_ckpt) // 3, times=-1))
    assert cli_main(["models", "pull", DEFAULT_REPO]) == 1
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and "corrupted" in err and "sha256" in err and "deleted" in err
    folder = download_dir()
    assert not (folder / BIN).exists() and not partial_path(folder / BIN).exists()
    assert manager().installed() == []


def test_gated_repo_needs_hf_token(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DownloadError, match="HF_TOKEN") as info:
        manager().download(GATED)
    assert "\n" not in str(info.value) and "401" in str(info.value)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(DownloadError, match="refused the HF_TOKEN"):
        manager().download(GATED)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    folder = manager().download(GATED)
    assert (folder / BIN).is_file()
    assert any(h.authorized for h in hub.hits if h.server == "hub")
    assert not any(h.authorized for h in hub.hits if h.server == "cdn")  # the token never leaves the hub


def test_missing_repo_and_server_errors_give_clear_messages(hub: HubServer, tiny_ckpt: Path) -> None:
    with pytest.raises(DownloadError, match="no model repository owl-tests/missing"):
        manager().download("owl-tests/missing")
    with pytest.raises(DownloadError, match="not a hub repository id"):
        manager().download("../etc")
    hub.inject(Fault("status", BIN, status=503, times=2))  # twice, then it recovers: retries carry on
    assert (manager().download(DEFAULT_REPO) / BIN).is_file()
    shutil.rmtree(download_dir())
    hub.inject(Fault("status", None, status=500, times=-1))
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"answered 500 \(server error\).*gave up after 3 tries"):
        manager().download(DEFAULT_REPO)
    assert time.monotonic() - start < 5


def test_stalled_server_is_dropped_retried_and_reported(hub: HubServer, tiny_ckpt: Path) -> None:
    size = bin_size(tiny_ckpt)
    hub.inject(Fault("stall", BIN, at=size // 2, times=-1, seconds=20))
    start = time.monotonic()
    with pytest.raises(DownloadError, match="stalled") as info:
        manager(retry=RetryPolicy(attempts=2, base_delay=0.05, stall_timeout=0.5)).download(DEFAULT_REPO)
    assert time.monotonic() - start < 6
    assert "kept" in str(info.value)
    assert partial_path(download_dir() / BIN).stat().st_size == size // 2


def test_cancel_returns_promptly_and_pauses(hub: HubServer, tiny_ckpt: Path) -> None:
    size = bin_size(tiny_ckpt)
    hub.inject(Fault("stall", BIN, at=size // 2, seconds=30))
    token = CancelToken()
    cancelled_at: list[float] = []

    def cancel_when_stalled() -> None:
        deadline = time.monotonic() + 20
        while hub.bytes_sent(BIN) < size // 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # the client is now blocked in a read that the stall timeout (30 s) would not end
        cancelled_at.append(time.monotonic())
        token.cancel()

    threading.Thread(target=cancel_when_stalled, daemon=True).start()
    slow = RetryPolicy(attempts=2, base_delay=0.05, stall_timeout=30.0)
    with pytest.raises(DownloadPaused, match="pull again to resume"):
        manager(retry=slow).pull(DEFAULT_REPO, task=Task(cancel=token))
    assert time.monotonic() - cancelled_at[0] < 1.5
    [partial] = manager().partial_downloads()
    assert partial.repo_id == DEFAULT_REPO and not partial.complete
    assert partial_path(download_dir() / BIN).stat().st_size == size // 2
    manager().pull(DEFAULT_REPO)  # resume: the fault was used up
    assert hub.bytes_sent(BIN) == size and bin_gets(hub)[-1] == f"bytes={size // 2}-"
    assert manager().partial_downloads() == [] and manager().downloads() == []


def test_not_enough_disk_is_refused_before_downloading(hub: HubServer) -> None:
    m = manager(free_space=lambda _path: 10 << 20)
    report = m.preflight(DEFAULT_REPO)
    assert not report.disk_ok and "NOT ENOUGH" in report.summary()
    with pytest.raises(PreflightError, match="not enough disk space.*nothing was downloaded"):
        m.pull(DEFAULT_REPO)
    with pytest.raises(PreflightError, match="not enough disk space"):
        manager(free_space=lambda _path: 1 << 20).download(DEFAULT_REPO)
    assert not any(h.server == "cdn" for h in hub.hits)  # no weights requested at all
    assert not download_dir().exists() or not any(p.name.endswith(".part") for p in download_dir().iterdir())


def test_not_enough_memory_is_refused_unless_forced(hub: HubServer) -> None:
    m = manager(memory=lambda: MemoryInfo(ram_total=1 * GiB, ram_available=GiB // 2))
    with pytest.raises(PreflightError, match="no quantization fits this machine"):
        m.pull(DEFAULT_REPO)
    assert bin_gets(hub) == []


def test_a_new_process_resumes_the_partial_download(hub: HubServer, tiny_ckpt: Path) -> None:
    size = bin_size(tiny_ckpt)
    hub.inject(Fault("stall", BIN, at=size // 2, seconds=30))
    script = textwrap.dedent(
        """
        import sys
        from owl_desktop.hub.manager import ModelManager
        from owl_desktop.hub.retry import RetryPolicy
        ModelManager(retry=RetryPolicy(attempts=2, base_delay=0.05, stall_timeout=60)).download(sys.argv[1])
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    part = partial_path(download_dir() / BIN)
    first = subprocess.Popen([sys.executable, "-c", script, DEFAULT_REPO], env=env)
    try:
        deadline = time.monotonic() + 60
        while not (part.is_file() and part.stat().st_size >= size // 2) and time.monotonic() < deadline:
            assert first.poll() is None, "the first download process ended on its own"
            time.sleep(0.05)
    finally:
        first.kill()  # a crash, not a clean stop
        first.wait(timeout=30)
    assert part.stat().st_size == size // 2
    second = subprocess.run([sys.executable, "-c", script, DEFAULT_REPO], env=env, timeout=120)
    assert second.returncode == 0
    assert (download_dir() / BIN).read_bytes() == (tiny_ckpt / BIN).read_bytes()
    assert bin_gets(hub) == [None, f"bytes={size // 2}-"]
    assert hub.bytes_sent(BIN) < 1.1 * size


def test_offline_mode_gives_a_clear_message(
    hub: HubServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    estimate = manager().preflight(DEFAULT_REPO, online=False)  # fit badges before any network call
    assert estimate.download_needed == CATALOG[0].download_bytes and estimate.recommended == "Q4_K_M"
    with pytest.raises(DownloadError, match="neither in the catalog nor downloaded"):
        manager().preflight("someone/other-owl", online=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE is set"):
        manager().pull(DEFAULT_REPO)
    assert cli_main(["models", "pull", DEFAULT_REPO]) == 1
    assert "Unset HF_HUB_OFFLINE" in capsys.readouterr().err
    report = manager().preflight(DEFAULT_REPO)  # from the catalog, without the network
    assert report.download_needed == CATALOG[0].download_bytes
    assert cli_main(["models", "list"]) == 0
    assert hub.hits == []
    # huggingface_hub's own copy of the flag (read at its import) is reported the same way
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):
        manager().download(DEFAULT_REPO)


# ----------------------------------------------------------------------------------------------------------------
# manage: import, verify, remove


def test_an_imported_model_has_a_readable_name_that_can_be_changed(tiny_ckpt: Path) -> None:
    m = manager()
    bundle = m.import_path(tiny_ckpt, "Q8_0")
    [model] = m.installed()
    assert model.name == "mplug-owl-tiny · Q8_0"  # not the folder id "mplug-owl-tiny-q8_0"
    manifest = bundle / "bundle.json"
    before = json.loads(manifest.read_text(encoding="utf-8"))

    assert m.rename(model.id, " Tiny owl 🦉 (test) ") == "Tiny owl 🦉 (test)"
    [model] = m.installed()
    assert model.name == "Tiny owl 🦉 (test)" and model.id == "mplug-owl-tiny-q8_0" and model.ok
    after = json.loads(manifest.read_text(encoding="utf-8"))
    assert after == {**before, "name": "Tiny owl 🦉 (test)"}  # every other field as it was
    assert [p.name for p in bundle.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    assert bundle_mod.load(model.id, verify=True).name == "Tiny owl 🦉 (test)"  # the files still match

    for bad, why in [
        ("   ", "cannot be empty"),
        ("x" * (bundle_mod.NAME_MAX + 1), "at most 80 characters"),
        ("two\nlines", "control characters"),
        ("bell\x07", "control characters"),
        ("evil\u202etxt.exe", "control characters"),  # a right-to-left override
    ]:
        with pytest.raises(BundleError, match=why):
            m.rename(model.id, bad)
    assert m.installed()[0].name == "Tiny owl 🦉 (test)"  # a refused name changes nothing
    with pytest.raises(BundleError, match="no installed model"):
        m.rename("nothing-here", "A name")

    # bundle.json is untrusted: a name that could not have been given is not shown
    manifest.write_text(json.dumps({**after, "name": "line\nbreak"}), encoding="utf-8")
    assert m.installed()[0].name == "mplug-owl-tiny · Q8_0"


def test_import_verify_and_remove(tiny_ckpt: Path, tmp_path: Path) -> None:
    m = manager()
    with pytest.raises(CheckpointError, match="neither a model bundle"):
        m.import_path(tmp_path)
    bundle = m.import_path(tiny_ckpt, "Q8_0")
    [model] = m.installed()
    assert model.id == bundle.name == "mplug-owl-tiny-q8_0" and model.ok and model.quant == "Q8_0"
    assert m.verify(model.id).ok

    exported = tmp_path / "exported"
    shutil.copytree(bundle, exported)
    freed = m.remove(model.id)
    assert freed >= model.size and m.installed() == []
    with pytest.raises(BundleError, match="no installed model"):
        m.remove(model.id)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(exported, corrupt)
    gguf = corrupt / "llm-Q8_0.gguf"
    data = bytearray(gguf.read_bytes())
    data[len(data) // 2] ^= 0xFF
    gguf.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="corrupted"):
        m.import_path(corrupt)
    assert m.installed() == [] and list(paths.models_dir().iterdir()) == []  # no half bundle left

    assert m.import_path(exported) == bundle and exported.is_dir()  # copied
    with pytest.raises(BundleError, match="already installed"):
        m.import_path(exported)
    m.remove(model.id)
    assert m.import_path(exported, move=True) == bundle and not exported.exists()  # moved
    assert m.verify(str(bundle)).id == model.id  # by path too

    gguf = bundle / "llm-Q8_0.gguf"
    data = bytearray(gguf.read_bytes())
    data[100] ^= 0xFF
    gguf.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        m.verify(model.id)
    gguf.write_bytes(b"short")
    assert m.installed()[0].problem == "llm-Q8_0.gguf has the wrong size"
