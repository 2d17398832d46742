"""A bundle folder handed to `models import` is untrusted: its bundle.json may name paths outside the bundle, links,
odd ids and unknown quantizations. Every such bundle is refused before anything reaches the models folder.

Also: the app's log (rotating file in the log folder) gets errors with their traceback and llama.cpp's errors,
and the user's message names the file; conversation content never reaches it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from owl_desktop import bundle as bundle_mod
from owl_desktop import logs, paths
from owl_desktop.cli import main as cli_main
from owl_desktop.convert.converter import convert_checkpoint
from owl_desktop.devtools.tiny_checkpoint import make_checkpoint
from owl_desktop.errors import BundleError
from owl_desktop.hub.manager import ModelManager


@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("untrusted")
    ckpt = make_checkpoint(root / "ckpt", "bin", preset="tiny", seed=3)
    return convert_checkpoint(ckpt, root / "bundle", quant="F16")


def _hostile(good: Path, tmp_path: Path, edit: Callable[[dict, Path], None]) -> Path:
    folder = tmp_path / "hostile"
    shutil.copytree(good, folder)
    manifest = json.loads((folder / "bundle.json").read_text(encoding="utf-8"))
    edit(manifest, folder)
    (folder / "bundle.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


def _rename_file(manifest: dict, old: str, new: str) -> None:
    manifest["files"][new] = manifest["files"].pop(old)


HOSTILE: dict[str, tuple[Callable[[dict, Path], None], str]] = {
    "parent path": (lambda m, _f: _rename_file(m, "vision.safetensors", "../../x"), "no bundle holds"),
    "absolute path": (lambda m, _f: _rename_file(m, "vision.safetensors", "/etc/passwd"), "no bundle holds"),
    "extra file": (lambda m, _f: m["files"].update({"llm-Q8_0.gguf": m["files"]["llm-F16.gguf"]}), "and only them"),
    "id with a path": (lambda m, _f: m.update(id="../../evil"), "not a plain name"),
    "unknown quantization": (lambda m, _f: m.update(quantization="Q1_EVIL"), "unknown quantization"),
    "malformed hash": (lambda m, _f: m["files"]["llm-F16.gguf"].update(sha256="zz"), "malformed"),
    "not an object": (lambda m, _f: m.clear(), "unreadable"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_manifest_is_refused_and_nothing_is_installed(good_bundle: Path, tmp_path: Path, case: str) -> None:
    edit, message = HOSTILE[case]
    folder = _hostile(good_bundle, tmp_path, edit)
    with pytest.raises(BundleError, match=message):
        ModelManager().import_path(folder)
    models = paths.models_dir()
    assert not models.exists() or list(models.iterdir()) == []
    assert not (tmp_path.parent / "x").exists() and not (tmp_path / "evil").exists()


def test_a_linked_file_is_refused(good_bundle: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not yours")
    folder = _hostile(good_bundle, tmp_path, lambda _m, _f: None)
    vision = folder / "vision.safetensors"
    real = tmp_path / "elsewhere.safetensors"
    shutil.move(vision, real)
    os.symlink(real, vision)
    with pytest.raises(BundleError, match="is a link"):
        ModelManager().import_path(folder)
    assert not paths.models_dir().exists() or list(paths.models_dir().iterdir()) == []


def test_an_import_is_hashed_once_and_not_again_on_first_load(good_bundle: Path, tmp_path: Path) -> None:
    installed = ModelManager().import_path(good_bundle)
    stamps = json.loads((paths.cache_dir() / "verified-bundles.json").read_text(encoding="utf-8"))
    assert len(stamps) == 1  # recorded while copying: bundle.load() will not hash the files again
    flipped = installed / "llm-F16.gguf"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0xFF
    flipped.write_bytes(bytes(data))
    os.utime(flipped, ns=(flipped.stat().st_atime_ns, flipped.stat().st_mtime_ns + 1))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        bundle_mod.load(installed)  # a changed file (mtime) is hashed again


def _ask(bundle: Path, tmp_path: Path, question: str, *extra: str) -> int:
    from PIL import Image

    image = tmp_path / "img.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(image)
    args = ["ask", "--model", str(bundle), "--image", str(image), "--threads", "2", "--max-new-tokens", "2"]
    return cli_main([*args, *extra, question])


def _fresh_log(monkeypatch: pytest.MonkeyPatch, folder: Path) -> Path:
    """A new process sets its log up once; here each test points it at its own folder."""
    import logging

    monkeypatch.setenv("OWL_LOG_DIR", str(folder))
    if logs._handler is not None:
        logging.getLogger("owl_desktop").removeHandler(logs._handler)
        logs._handler.close()
        monkeypatch.setattr(logs, "_handler", None)
    return folder / logs.LOG_FILE


def test_errors_go_to_the_log_but_never_the_question(
    good_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    log_file = _fresh_log(monkeypatch, tmp_path / "logs")
    broken = tmp_path / "broken"
    shutil.copytree(good_bundle, broken)
    gguf = broken / "llm-F16.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * (gguf.stat().st_size - 4))  # same size, nothing readable in it
    question = "What is the secret number 4711?"
    assert _ask(broken, tmp_path, question) != 0
    err = capsys.readouterr().err
    assert "owl-desktop: error:" in err and "Traceback" not in err
    log_text = log_file.read_text(encoding="utf-8")
    assert "WARNING owl_desktop.cli: ask:" in log_text
    assert "4711" not in log_text


def test_llama_cpp_warnings_are_routed_into_the_log(
    good_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    log_file = _fresh_log(monkeypatch, tmp_path / "logs")
    trained = bundle_mod.load(good_bundle).config.text.max_position_embeddings
    # a context beyond what the model was trained for: llama.cpp warns about it (and still answers)
    assert _ask(good_bundle, tmp_path, "Hello there?", "--n-ctx", str(trained * 2)) == 0
    capsys.readouterr()
    log_text = log_file.read_text(encoding="utf-8")
    assert "WARNING owl_desktop.llama_cpp:" in log_text
    assert "Hello there" not in log_text
