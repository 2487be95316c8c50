"""memory.py: hand back to the kernel what bcc's one-off compile of the BPF program left resident (LLVM's code, freed heap)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import re
from pathlib import Path

MADV_DONTNEED = 4  # unmap now: a mapping of the file alone reads the same pages back from it if touched
MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now; they fault back in if ever touched again
# Libraries only the compile runs: clang and LLVM (tens of MB of code). libbcc stays: map reads use it.
COMPILER_LIBRARIES = re.compile(r"/lib(LLVM|clang-cpp|clang)[-.][^/]*\.so[^/]*$")


def compiler_mappings(smaps_text: str) -> list[tuple[int, int, str, int]]:
    """(start, end, path, anonymous kB) of every mapping of a compiler library in /proc/PID/smaps
    text. Anonymous pages are the library's own that this process wrote (relocations): dropping
    them would lose data."""
    out = []
    current = None
    for line in smaps_text.splitlines():
        fields = line.split(None, 5)
        if fields and "-" in fields[0] and len(fields) >= 5 and all(c in "0123456789abcdef-" for c in fields[0]):
            current = None
            if len(fields) == 6 and COMPILER_LIBRARIES.search(fields[5]):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                current = [start, end, fields[5], 0]
                out.append(current)
        elif current is not None and line.startswith("Anonymous:"):
            current[3] = int(line.split()[1])
    return [tuple(m) for m in out]


def rss_kb(status_text: str) -> int:
    m = re.search(r"^VmRSS:\s+(\d+) kB", status_text, re.M)
    return int(m.group(1)) if m else 0


def release_compiler_memory() -> str:
    """After the program is loaded: return freed heap to the kernel (malloc_trim) and drop the
    compiler libraries' pages from this process: mappings holding only file pages are unmapped
    (MADV_DONTNEED; touched again, they read back from the file), the others are reclaimed
    (MADV_PAGEOUT, Linux >= 5.4: never loses data; the pages the process wrote stay without
    swap). Returns a line for the log; never raises."""
    try:
        return _release()
    except OSError as exc:  # /proc unreadable (an odd sandbox): keep running, say so
        return f"memory after the compile: not released ({exc})"


def _release() -> str:
    before = rss_kb(Path("/proc/self/status").read_text())
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    trimmed = False
    if hasattr(libc, "malloc_trim"):  # glibc only; musl has no such call
        libc.malloc_trim(ctypes.c_size_t(0))
        trimmed = True
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    paged, refused = 0, None
    for start, end, _path, anonymous_kb in compiler_mappings(Path("/proc/self/smaps").read_text()):
        # Pure file pages: unmap them even where another process (another bcc tool) maps them too,
        # which MADV_PAGEOUT would skip. Written pages: only reclaim, which never loses them.
        advice = MADV_PAGEOUT if anonymous_kb else MADV_DONTNEED
        if libc.madvise(ctypes.c_void_p(start), end - start, advice) == 0:
            paged += 1
        else:
            refused = ctypes.get_errno()
    after = rss_kb(Path("/proc/self/status").read_text())
    how = ", ".join(filter(None, ["malloc_trim" if trimmed else "",
                                  f"paged out {paged} compiler mappings" if paged else "",
                                  f"madvise refused ({errno.errorcode.get(refused, refused)})" if refused else ""]))
    return f"memory after the compile: RSS {before // 1024} MB -> {after // 1024} MB ({how or 'nothing to do'})"
