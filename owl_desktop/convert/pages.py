"""Give back the pages of a memory-mapped tensor once it has been written (Linux; a no-op elsewhere).

Reading a tensor through a file mapping faults its pages into the process: they count in RSS until the mapping
goes away, so streaming a 14 GB checkpoint would end with ~14 GB resident (file-backed, reclaimable, but alarming
and it pushes other memory out). `madvise(MADV_DONTNEED)` drops them: the mapping is private and never written,
so a later access just reads the file again.

Safety: MADV_DONTNEED on *anonymous* memory zeroes it. `FileMappings` therefore records the address ranges the
kernel maps from a given file (/proc/self/maps) and `release` only touches pages that lie inside one of them.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE


def _libc_madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


# OWL_CONVERT_KEEP_PAGES=1 turns the release off (only to measure its effect: `owl-desktop bench convert`)
_madvise = None if os.environ.get("OWL_CONVERT_KEEP_PAGES") else _libc_madvise()


@dataclass
class FileMappings:
    """Address ranges [start, end) that this process maps from one file."""

    path: Path
    ranges: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def find(cls, path: Path) -> FileMappings:
        target = os.path.realpath(path)
        ranges: list[tuple[int, int]] = []
        try:
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
                for line in f:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6 and parts[5].rstrip("\n") == target:
                        lo, hi = parts[0].split("-")
                        ranges.append((int(lo, 16), int(hi, 16)))
        except OSError:
            pass  # not Linux, or no procfs: nothing will be released
        return cls(Path(path), ranges)

    def release(self, tensor: torch.Tensor) -> int:
        """Drop the resident pages of `tensor`'s storage if they belong to this file's mapping; bytes advised."""
        if _madvise is None or not self.ranges:
            return 0
        storage = tensor.untyped_storage()
        start, size = storage.data_ptr(), storage.nbytes()
        if size == 0:
            return 0
        lo = start - start % _PAGE  # page-align outwards: neighbours' pages are simply read again if needed
        hi = -(-(start + size) // _PAGE) * _PAGE
        for r_lo, r_hi in self.ranges:
            if r_lo <= start and start + size <= r_hi:
                lo, hi = max(lo, r_lo), min(hi, r_hi)
                if _madvise(lo, hi - lo, _MADV_DONTNEED) == 0:
                    return hi - lo
                return 0
        return 0
