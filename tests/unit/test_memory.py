"""memory.py: which mappings count as the compiler's, and the release running in this process."""

from monitor.system import memory

SMAPS = """\
55d0c0000000-55d0c0100000 r--p 00000000 08:01 131 /usr/bin/python3.11
Rss:                 100 kB
Anonymous:             0 kB
7f0000000000-7f0001000000 r--p 00000000 08:01 200 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:                5000 kB
Anonymous:          3000 kB
7f0001000000-7f0003000000 r-xp 01000000 08:01 200 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:               40000 kB
Anonymous:             0 kB
7f0004000000-7f0004100000 r-xp 00000000 08:01 201 /usr/lib/llvm-14/lib/libclang-cpp.so.14
Anonymous:             0 kB
7f0005000000-7f0005100000 r-xp 00000000 08:01 202 /usr/lib/x86_64-linux-gnu/libbcc.so.0.26.0
Anonymous:             0 kB
7f0006000000-7f0006100000 rw-p 00000000 00:00 0
Anonymous:          1024 kB
7f0007000000-7f0007100000 r-xp 00000000 08:01 203 /opt/x/libLLVMish-helper.so
Anonymous:             0 kB
7f0008000000-7f0008100000 r-xp 00000000 08:01 204 /usr/lib/x86_64-linux-gnu/libclang-14.so.1
Anonymous:            12 kB
"""


def test_compiler_mappings_are_llvm_and_clang_only_with_their_written_pages():
    got = memory.compiler_mappings(SMAPS)
    assert [(hex(a), hex(b), anon) for a, b, _, anon in got] == [
        ("0x7f0000000000", "0x7f0001000000", 3000), ("0x7f0001000000", "0x7f0003000000", 0),
        ("0x7f0004000000", "0x7f0004100000", 0), ("0x7f0008000000", "0x7f0008100000", 12)]
    assert not any("libbcc" in p or "python" in p for _, _, p, _ in got)  # map reads still need libbcc


def test_rss_is_read_from_status():
    assert memory.rss_kb("Name:\tx\nVmHWM:\t  154304 kB\nVmRSS:\t   52452 kB\n") == 52452
    assert memory.rss_kb("Name:\tx\n") == 0


def test_release_runs_here_and_says_what_it_did():
    line = memory.release_compiler_memory()  # no compiler loaded in this process: malloc_trim only
    assert line.startswith("memory after the compile: RSS ") and "malloc_trim" in line
