"""Runtime hook, run by the frozen app before its own code: point native loaders into the bundle."""

from __future__ import annotations

import os
import sys

_bundle = getattr(sys, "_MEIPASS", os.path.dirname(sys.executable))

# llama_cpp looks for libllama next to its own __file__ unless this is set; be explicit so that a moved or
# re-laid-out bundle still finds the copy we shipped (and never a stray system libllama).
os.environ.setdefault("LLAMA_CPP_LIB_PATH", os.path.join(_bundle, "llama_cpp", "lib"))
# A desktop app must not phone home: models come only from explicit downloads in the app.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
