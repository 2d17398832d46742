"""Gather the licenses of everything the frozen app bundles into one notices file (plus the texts it quotes).

Run by the spec at build time, from the build environment: each bundled distribution's name, version, license
expression, home page and every license file its wheel ships (PEP 639 `licenses/` or LICENSE/COPYING/NOTICE files).
A few wheels ship no text at all (PySide6, shiboken6, sentencepiece...); resources/licenses/extra.toml names their
license, and the matching standard text is quoted from /usr/share/common-licenses when the build machine has it.

Usage (also importable): python third_party.py OUT_DIR
"""

from __future__ import annotations

import re
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
EXTRA = ROOT / "resources" / "licenses" / "extra.toml"
NOTICES = "THIRD-PARTY-NOTICES.txt"
# The build tools themselves are not in the bundle.
BUILD_ONLY = {
    "altgraph",
    "macholib",
    "pefile",
    "pip",
    "pyinstaller",
    "pyinstaller-hooks-contrib",
    "pywin32-ctypes",
    "setuptools",
    "wheel",
}
_LICENSE_FILE = re.compile(r"(^|/)(licen[cs]e|copying|notice|authors)[^/]*$", re.IGNORECASE)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _license_of(dist: metadata.Distribution) -> str:
    meta = dist.metadata
    expression = meta.get("License-Expression")
    if expression:
        return expression
    text = (meta.get("License") or "").strip()
    if text and "\n" not in text and len(text) < 100:
        return text
    classifiers = [c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    return "; ".join(classifiers) or "see the license text"


def _home_page(dist: metadata.Distribution) -> str:
    meta = dist.metadata
    if meta.get("Home-page"):
        return str(meta["Home-page"])
    for entry in meta.get_all("Project-URL") or []:
        label, _, url = entry.partition(",")
        if label.strip().lower() in {"homepage", "home", "source", "repository", "source code"}:
            return url.strip()
    return ""


def _license_texts(dist: metadata.Distribution) -> list[tuple[str, str]]:
    texts = []
    for file in dist.files or []:
        if ".dist-info/" in str(file) and _LICENSE_FILE.search(str(file)):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                texts.append((str(file), path.read_text(encoding="utf-8", errors="replace")))
    return texts


def _common_license(name: str) -> str | None:
    path = Path("/usr/share/common-licenses") / name
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None


def write_notices(out_dir: Path) -> Path:
    """Write out_dir/THIRD-PARTY-NOTICES.txt for the distributions installed in this environment."""
    extra = tomllib.loads(EXTRA.read_text(encoding="utf-8"))
    overrides = {_norm(k): v for k, v in extra.get("distribution", {}).items()}
    dists = {_norm(d.metadata["Name"]): d for d in metadata.distributions() if d.metadata["Name"]}
    parts = [
        "owl-desktop bundles the following third-party software. Each part below gives its name, version,",
        "license and the license text(s) shipped with it.",
        "",
    ]
    common_needed: set[str] = set()
    # The interpreter and the native components that are not Python distributions.
    for name, info in extra.get("component", {}).items():
        parts += _section(name, info.get("version", ""), info["license"], info.get("url", ""))
        text = _python_license() if name == "Python" else None
        if text:
            parts += ["", text]
        elif info.get("common"):
            common_needed.add(info["common"])
            parts += ["", f"License text: see {info['common']} at the end of this file."]
        parts.append("")
    for key in sorted(dists):
        if key in BUILD_ONLY:
            continue
        dist = dists[key]
        override = overrides.get(key, {})
        license_ = override.get("license") or _license_of(dist)
        parts += _section(dist.metadata["Name"], dist.version, license_, _home_page(dist))
        texts = _license_texts(dist)
        for file, text in texts:
            parts += ["", f"--- {file} ---", text.rstrip()]
        if not texts:
            if override.get("common"):
                common_needed.add(override["common"])
                parts += ["", f"License text: see {override['common']} at the end of this file."]
            else:
                parts += ["", "License text: not shipped in the wheel; see the project's home page."]
        parts.append("")
    for name in sorted(common_needed):
        text = _common_license(name)
        parts += ["=" * 78, f"{name}", "=" * 78]
        parts += [text.rstrip() if text else f"(the standard {name} text: https://spdx.org/licenses/)", ""]
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / NOTICES
    out.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return out


def _section(name: str, version: str, license_: str, url: str) -> list[str]:
    head = f"{name} {version}".strip()
    lines = ["=" * 78, head, "=" * 78, f"License: {license_}"]
    if url:
        lines.append(f"Home page: {url}")
    return lines


def _python_license() -> str | None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for candidate in (stdlib / "LICENSE.txt", Path(sys.base_prefix) / "LICENSE.txt"):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8", errors="replace")
    return None


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(write_notices(Path(sys.argv[1])))
