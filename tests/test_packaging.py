"""Fast checks of the packaging files: desktop entry, AppStream metainfo, icons, PyInstaller entry and hooks.

The package itself is built and installed in a clean Debian by packaging/linux/build-deb and verify-deb (run by
.ci/run); these tests catch metadata mistakes in seconds and without root.
"""

from __future__ import annotations

import ast
import configparser
import os
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from owl_desktop import __version__

ROOT = Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "packaging"
LINUX = ROOT / "resources" / "linux"
DESKTOP = LINUX / "owl-desktop.desktop"
APP_ID = "io.github.owldesktop.OwlDesktop"
METAINFO = LINUX / f"{APP_ID}.metainfo.xml"
ICON_SIZES = (16, 22, 24, 32, 48, 64, 128, 256, 512)
# What the app accepts (owl_desktop/gui/attachments.py IMAGE_SUFFIXES), as MIME types.
IMAGE_MIME_TYPES = {"image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/tiff"}


def _desktop_entry() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(DESKTOP, encoding="utf-8")
    return parser["Desktop Entry"]


def _metainfo() -> ET.Element:
    return ET.parse(METAINFO).getroot()


def test_desktop_entry_launches_the_app_with_files() -> None:
    entry = _desktop_entry()
    assert entry["Type"] == "Application"
    assert entry["Exec"].split() == ["owl-desktop", "%F"]  # several images at once
    assert entry["TryExec"] == "owl-desktop"
    assert entry["Icon"] == "owl-desktop"  # the name of the icons installed under hicolor
    # Matches QGuiApplication.setDesktopFileName / applicationName, so the window is tied to this launcher.
    assert entry["StartupWMClass"] == "owl-desktop"
    assert entry["Terminal"] == "false"


def test_desktop_and_metainfo_offer_the_same_image_types() -> None:
    desktop_types = {t for t in _desktop_entry()["MimeType"].split(";") if t}
    meta_types = {el.text for el in _metainfo().iterfind("provides/mediatype")}
    assert desktop_types == IMAGE_MIME_TYPES
    assert meta_types == IMAGE_MIME_TYPES


def test_metainfo_identity_release_and_screenshot() -> None:
    root = _metainfo()
    assert root.get("type") == "desktop-application"
    assert root.findtext("id") == APP_ID
    assert root.findtext("launchable[@type='desktop-id']") == DESKTOP.name
    assert root.findtext("icon[@type='stock']") == "owl-desktop"
    assert root.findtext("provides/binary") == "owl-desktop"
    releases = [el.get("version") for el in root.iterfind("releases/release")]
    assert releases and releases[0] == __version__, "the newest <release> must be the package's version"
    assert all(el.find("description") is not None for el in root.iterfind("releases/release"))
    shots = [el.text or "" for el in root.iterfind("screenshots/screenshot/image")]
    assert shots and all(url.startswith("https://") for url in shots)
    assert (LINUX / "screenshots" / "main-window.png").is_file()  # the source of the published screenshot


@pytest.mark.skipif(shutil.which("desktop-file-validate") is None, reason="desktop-file-utils not installed")
def test_desktop_file_validates() -> None:
    subprocess.run(["desktop-file-validate", str(DESKTOP)], check=True)


@pytest.mark.skipif(shutil.which("appstreamcli") is None, reason="appstream not installed")
def test_metainfo_validates() -> None:
    subprocess.run(["appstreamcli", "validate", "--no-net", str(METAINFO)], check=True, capture_output=True)


@pytest.mark.parametrize("size", ICON_SIZES)
def test_icon_png_sizes(size: int) -> None:
    data = (ROOT / "resources" / "app-icon" / "png" / f"{size}.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (size, size)


def test_icon_svg_source_is_square() -> None:
    root = ET.parse(ROOT / "resources" / "app-icon" / "owl-desktop.svg").getroot()
    assert root.get("viewBox") == "0 0 512 512"


def test_entry_script_calls_freeze_support_before_the_app() -> None:
    """In the frozen app the quantizer's spawn child re-runs this script; freeze_support must catch it first."""
    tree = ast.parse((PACKAGING / "pyinstaller" / "entry.py").read_text(encoding="utf-8"))
    main_blocks = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
    assert len(main_blocks) == 1
    first = main_blocks[0].body[0]
    assert isinstance(first, ast.Expr) and ast.unparse(first.value) == "multiprocessing.freeze_support()"
    top_imports = [ast.unparse(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert not any("owl_desktop" in line for line in top_imports), "import the app only after freeze_support()"


def test_runtime_hook_points_llama_cpp_into_the_bundle(tmp_path: Path) -> None:
    hook = PACKAGING / "pyinstaller" / "rthooks" / "pyi_rth_owl_desktop.py"
    code = (
        "import os, runpy, sys\n"
        f"sys._MEIPASS = {str(tmp_path)!r}\n"
        f"runpy.run_path({str(hook)!r})\n"
        "print(os.environ['LLAMA_CPP_LIB_PATH'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
    assert out.strip() == str(tmp_path / "llama_cpp" / "lib")


def test_llama_cpp_hook_collects_the_libraries() -> None:
    pytest.importorskip("PyInstaller")
    pytest.importorskip("llama_cpp")
    hook = PACKAGING / "pyinstaller" / "hooks" / "hook-llama_cpp.py"
    namespace: dict[str, object] = {"__file__": str(hook)}
    exec(compile(hook.read_text(encoding="utf-8"), str(hook), "exec"), namespace)  # noqa: S102
    names = {Path(src).name for src, _ in namespace["binaries"]}  # type: ignore[attr-defined]
    assert "libllama.so" in names and "libggml.so" in names
    assert not any(name.count(".") > 2 for name in names), "fully versioned duplicates are not needed"
    # every backend module (CPU variants, Vulkan) travels too: nothing links to them, llm_backends loads them
    from owl_desktop.engine.llm_backends import lib_dir

    assert {p.name for p in lib_dir().glob("libggml-*.so")} <= names


def test_spec_wires_hooks_entry_and_pruning() -> None:
    spec = (PACKAGING / "pyinstaller" / "owl-desktop.spec").read_text(encoding="utf-8")
    ast.parse(spec)
    for needle in ('"hooks"', "pyi_rth_owl_desktop.py", '"entry.py"', "torch/test/", "torch/include/", "COLLECT("):
        assert needle in spec
    assert "exclude_binaries=True" in spec  # one folder: the libraries sit beside the executable


def test_third_party_notices_cover_the_big_components(tmp_path: Path) -> None:
    sys.path.insert(0, str(PACKAGING / "pyinstaller"))
    try:
        from third_party import write_notices
    finally:
        sys.path.pop(0)
    text = write_notices(tmp_path).read_text(encoding="utf-8")
    for name in ("Python", "torch", "PySide6_Essentials", "llama_cpp_python", "llama.cpp and ggml", "Qt 6"):
        assert name in text
    assert "LGPL-3.0" in text


def test_qt_depends_are_package_names() -> None:
    lines = (PACKAGING / "linux" / "qt-depends.txt").read_text(encoding="utf-8").splitlines()
    entries = [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]
    assert "libxcb-cursor0" in entries and "libegl1" in entries
    for entry in entries:
        for alternative in entry.split("|"):
            name = alternative.strip()
            assert name and name == name.lower() and " " not in name, entry


@pytest.mark.skipif(
    shutil.which("desktop-file-validate") is None or shutil.which("appstreamcli") is None,
    reason="desktop-file-utils / appstream not installed",
)
def test_build_deb_check_mode() -> None:
    result = subprocess.run(
        ["bash", str(PACKAGING / "linux" / "build-deb"), "--check"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "metadata OK" in result.stderr
