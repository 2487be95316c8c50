"""memory.py: hand back to the kernel what bcc's one-off compile of the BPF program left resident (LLVM's code, freed heap)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now; they fault back in if ever touched again
# Libraries only the compile runs: clang and LLVM (tens of MB of code). libbcc stays: map reads use it.
COMPILER_LIBRARIES = re.compile(r"/lib(LLVM|clang-cpp|clang)[-.][^/]*\.so[^/]*$")


def compiler_mappings(maps_text: str) -> list[tuple[int, int, str]]:
    """(start, end, path) of every mapping of a compiler library in /proc/PID/maps text."""
    out = []
    for line in maps_text.splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6 and COMPILER_LIBRARIES.search(fields[5]):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end, fields[5]))
    return out


def rss_kb(status_text: str) -> int:
    m = re.search(r"^VmRSS:\s+(\d+) kB", status_text, re.M)
    return int(m.group(1)) if m else 0


def release_compiler_memory() -> str:
    """After the program is loaded: return freed heap to the kernel (malloc_trim) and page out
    the compiler libraries' pages (MADV_PAGEOUT: never loses data; clean file pages are dropped,
    the few private pages they dirtied stay). Returns a line for the log; never raises."""
    before = rss_kb(Path("/proc/self/status").read_text())
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    trimmed = False
    if hasattr(libc, "malloc_trim"):  # glibc only; musl has no such call
        libc.malloc_trim(ctypes.c_size_t(0))
        trimmed = True
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    paged, refused = 0, None
    for start, end, _path in compiler_mappings(Path("/proc/self/maps").read_text()):
        if libc.madvise(ctypes.c_void_p(start), end - start, MADV_PAGEOUT) == 0:
            paged += 1
        else:
            refused = ctypes.get_errno()
            if refused == errno.EINVAL:  # a kernel before 5.4: nothing to gain from the rest
                break
    after = rss_kb(Path("/proc/self/status").read_text())
    how = ", ".join(filter(None, ["malloc_trim" if trimmed else "",
                                  f"paged out {paged} compiler mappings" if paged else "",
                                  f"madvise refused ({errno.errorcode.get(refused, refused)})" if refused else ""]))
    return f"memory after the compile: RSS {before // 1024} MB -> {after // 1024} MB ({how or 'nothing to do'})"
