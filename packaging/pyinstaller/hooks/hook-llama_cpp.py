"""PyInstaller hook for llama-cpp-python: its native libraries are loaded with ctypes, which the analysis cannot see.

Without this hook the frozen app fails with "Shared library with base name 'llama' not found"
(abetlen/llama-cpp-python#1475). Our build's backends are modules in the same folder (libggml-cpu-<variant>.so,
libggml-vulkan.so) that owl_desktop/engine/llm_backends.py loads at run time; nothing links to them, so only this
hook brings them along.
"""

from __future__ import annotations

import re
from pathlib import Path

from PyInstaller.utils.hooks import collect_data_files, collect_dynamic_libs, get_package_paths

# The wheel carries each library three times as regular files (libX.so, libX.so.0, libX.so.0.25.3): ctypes opens the
# bare name and the libraries find each other by SONAME (libX.so.0). The fully versioned copy is used by nobody.
_WANTED = re.compile(r"^lib[\w.-]+?\.(so|so\.\d+|dylib|\d+\.dylib)$|\.dll$")

_, _pkg_dir = get_package_paths("llama_cpp")
_lib_dir = Path(_pkg_dir) / "lib"

binaries = [
    (src, dest)
    for src, dest in collect_dynamic_libs("llama_cpp", search_patterns=["*.so", "*.so.*", "*.dylib", "*.dll"])
    if _WANTED.search(Path(src).name)
]
# Any data files (none today besides py.typed); the libraries above are not data.
datas = collect_data_files("llama_cpp", excludes=["lib/**", "**/*.so*", "**/*.dylib", "**/*.dll"])

# Fail the build here, not on a user's machine: the app is useless without these, and without a CPU backend (linked
# in as libggml-cpu, or one module per instruction-set level).
_names = {Path(src).name for src, _ in binaries}
for _stem in ("llama", "ggml", r"ggml-cpu(-[\w.]+)?"):
    if not any(re.match(rf"^(lib)?{_stem}\.(so|dylib|dll)$", name) for name in _names):
        raise SystemExit(f"hook-llama_cpp: lib{_stem} was not found in {_lib_dir} (collected: {sorted(_names)})")
