"""Before the window opens: the system libraries Qt needs on Linux, and a clear message naming the missing ones.

A pip install brings Qt itself (PySide6) but not the libraries it loads from the system. Without them Qt stops the
process with "could not load the Qt platform plugin" (the cause is in a debug log nobody reads) or the PySide6
import fails on a missing .so. This asks the dynamic loader for each library first (dlopen, as Qt would) and names
what is missing with the Debian/Ubuntu command that installs it. No Qt import here.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping

# loaded by PySide6's QtGui/QtWidgets/QtSvg themselves, whatever the platform plugin
CORE: dict[str, str] = {
    "libEGL.so.1": "libegl1",
    "libGL.so.1": "libgl1",
    "libfontconfig.so.1": "libfontconfig1",
    "libfreetype.so.6": "libfreetype6",
    "libxkbcommon.so.0": "libxkbcommon0",
    "libglib-2.0.so.0": "libglib2.0-0",
    "libdbus-1.so.3": "libdbus-1-3",
}
# the X11 platform plugin (xcb), Qt's default on Linux desktops
XCB: dict[str, str] = {
    "libX11-xcb.so.1": "libx11-xcb1",
    "libxcb.so.1": "libxcb1",
    "libxcb-cursor.so.0": "libxcb-cursor0",
    "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-image.so.0": "libxcb-image0",
    "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-shape.so.0": "libxcb-shape0",
    "libxcb-xfixes.so.0": "libxcb-xfixes0",
    "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
}


def needed(platform: str | None = None) -> dict[str, str]:
    """The libraries (soname → Debian package) the platform plugin in use needs: xcb unless told otherwise."""
    name = (platform if platform is not None else os.environ.get("QT_QPA_PLATFORM", "")).split(":")[0]
    if name in ("offscreen", "minimal", "vnc", "eglfs", "linuxfb"):
        return dict(CORE)
    if name.startswith("wayland") or (not name and os.environ.get("WAYLAND_DISPLAY") and not os.environ.get("DISPLAY")):
        return dict(CORE)
    return {**CORE, **XCB}


def missing(libraries: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """(soname, package) of each library the dynamic loader cannot find; [] off Linux."""
    if not sys.platform.startswith("linux"):
        return []
    out = []
    for soname, package in (libraries if libraries is not None else needed()).items():
        try:
            ctypes.CDLL(soname)
        except OSError:
            out.append((soname, package))
    return out


def message(absent: list[tuple[str, str]]) -> str:
    names = ", ".join(soname for soname, _ in absent)
    packages = " ".join(dict.fromkeys(package for _, package in absent))
    return (
        f"Owl cannot open its window: this computer lacks system libraries that Qt needs ({names}).\n"
        f"On Debian or Ubuntu, install them with:\n\n    sudo apt install {packages}\n\n"
        "Then start Owl again. (The command line works without them: owl-desktop --help.)"
    )
