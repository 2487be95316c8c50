"""bpf/tcpstate.c compiled by gcc for every kernel's tracepoint formats and every compile variant.

bcc builds a tracepoint's args struct from the running kernel's format file, so a field the program
reads that a layout lacks only shows when the daemon starts on that kernel (5.10 once failed so on
`family`). Here a shim stands in for bcc: the args structs come from each kernel's captured formats
(tests/unit/data/kernels/), maps become structs of function pointers with bcc's method names, and gcc
checks every field access of every variant (filters, watch stream, table sizes 0, with and without
the BTF offsets) without root or a kernel.
"""

import ipaddress
import itertools
import re
import subprocess
import textwrap

import pytest

from monitor.kernel.abi import bpf_dir
from monitor.kernel.probes import Probes, bcc_source
from monitor.kernel.tracefs import parse_format
from monitor.settings import Filters

from .test_tracefs import DATA, KERNELS, layout_of

SHIM = textwrap.dedent("""
    /* bcc's names, as plain C: enough for gcc to type-check the program. */
    #include <linux/types.h>
    #define NULL ((void *)0)
    /* Keys as bcc takes them: any pointer. Values typed, so every use of a value is checked. */
    #define BPF_MAP_OPS(k, v) struct { v *(*lookup)(const void *); int (*update)(const void *, v *); \\
                                      int (*insert)(const void *, v *); int (*delete)(const void *); }
    #define BPF_PERCPU_ARRAY(n, v, size) BPF_MAP_OPS(int, v) n
    #define BPF_ARRAY(n, v, size) BPF_MAP_OPS(int, v) n
    #define BPF_HASH(n, k, v, size) BPF_MAP_OPS(k, v) n
    #define BPF_LPM_TRIE(n, k, v, size) BPF_MAP_OPS(k, v) n
    #define BPF_TABLE(type, k, v, n, size) BPF_MAP_OPS(k, v) n
    #define BPF_F_TABLE(type, k, v, n, size, flags) BPF_MAP_OPS(k, v) n
    #define BPF_RINGBUF_OUTPUT(n, pages) struct { void *(*ringbuf_reserve)(__u64); \\
                                                   void (*ringbuf_submit)(void *, __u64); } n
    #define TRACEPOINT_PROBE(group, name) int tracepoint__##group##__##name(struct tracepoint__##group##__##name *args)
    struct bpf_raw_tracepoint_args { __u64 args[0]; };
    #define RAW_TRACEPOINT_PROBE(name) int raw_tracepoint__##name(struct bpf_raw_tracepoint_args *ctx)
    #define BPF_F_NO_COMMON_LRU 2
    __u64 bpf_ktime_get_ns(void);
    __u64 bpf_get_current_pid_tgid(void);
    long bpf_get_current_comm(void *buf, __u32 size);
    long bpf_probe_read_kernel(void *dst, __u32 size, const void *src);
""")

_ARRAY = re.compile(r"^(?P<type>.*?)\s*\[(?P<len>\d*)\]$")


def args_struct(group: str, fmt) -> str:
    """What bcc generates for a format: each field with its declared type (enums become int)."""
    lines = []
    for f in fmt.fields.values():
        ctype = re.sub(r"\benum\s+\w+", "int", f.ctype)
        suffix = f"[{f.array_len}]" if f.array_len else ""
        lines.append(f"    {ctype} {f.name}{suffix};")
    return f"struct tracepoint__{group}__{fmt.name} {{\n    __u64 common;\n" + "\n".join(lines) + "\n};\n"


def shim_for(kernel: str) -> str:
    out = [SHIM]
    for path in sorted((DATA / kernel).glob("*.format")):
        fmt = parse_format(path.read_text())
        out.append(args_struct(_GROUP.get(fmt.name, "tcp"), fmt))
    return "\n".join(out)


_GROUP = {"inet_sock_set_state": "sock", "inet_sk_error_report": "sock", "kfree_skb": "skb"}
TEST_NET, DOC_NET = ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("2001:db8::/32")
FILTERS = {"none": Filters(), "all": Filters(include_cidrs=(TEST_NET,), exclude_cidrs=(DOC_NET,), include_ports=(443,)),
           "include": Filters(include_cidrs=(TEST_NET,)), "exclude": Filters(exclude_cidrs=(TEST_NET,)),
           "ports": Filters(include_ports=(443,))}
# BTF: "raw" (every offset: raw tracepoints), "records" (every offset, --no-raw-tracepoints), "none".
def variants():
    for kernel, btf, filters, events, sizes in itertools.product(
            KERNELS, ("raw", "records", "none"), ("none", "all"), (False, True), ((65536, 4096), (0, 0))):
        yield kernel, btf, filters, events, sizes
    for kernel, filters in itertools.product(KERNELS, ("include", "exclude", "ports")):
        yield kernel, "raw", filters, False, (65536, 4096)


def variant_layout(tmp_path, kernel, btf):
    layout = layout_of(tmp_path, kernel, btf != "none")
    if btf == "records":
        layout.raw_off = "turned off (--no-raw-tracepoints)"
    return layout


@pytest.fixture(scope="module")
def shims(tmp_path_factory):
    d = tmp_path_factory.mktemp("bcc-shim")
    (d / "uapi" / "linux").mkdir(parents=True)
    (d / "uapi" / "linux" / "ptrace.h").write_text("")
    for kernel in KERNELS:
        (d / f"shim-{kernel}.h").write_text(shim_for(kernel))
    return d


@pytest.mark.parametrize("kernel,btf,filters,events,sizes", list(variants()),
                         ids=lambda v: str(v) if not isinstance(v, tuple) else f"{v[0]}-{v[1]}")
def test_every_variant_compiles_against_every_kernels_formats(shims, tmp_path, kernel, btf, filters, events, sizes):
    layout = variant_layout(tmp_path, kernel, btf)  # gcc checks the code the offsets switch on, not their values
    p = Probes(layout, FILTERS[filters], emit_events=events, recent_closes=sizes[0], max_offenders=sizes[1])
    cmd = ["gcc", "-fsyntax-only", "-std=gnu11", "-Wall", "-Werror", "-Wno-unused-function", "-Wno-unknown-pragmas",
           "-Wno-pointer-arith", f"-I{shims}", "-include", str(shims / f"shim-{kernel}.h"), *p.cflags(),
           str(bpf_dir() / "tcpstate.c")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(p.cflags())}\n{res.stderr}"


def gcc_preprocessed(shims, kernel, cflags, src) -> str:
    cmd = ["gcc", "-E", "-P", "-std=gnu11", f"-I{shims}", "-include", str(shims / f"shim-{kernel}.h"), *cflags, str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return " ".join(res.stdout.split())


@pytest.mark.parametrize("kernel,btf", list(itertools.product(KERNELS, (True, False))))
def test_bcc_gets_the_program_gcc_builds_from_the_files(shims, tmp_path, kernel, btf):
    """bcc rewrites map calls only in the text it is handed, so probes.bcc_source splices bpf/'s
    headers into tcpstate.c: once preprocessed, that text is the program the files make."""
    p = Probes(layout_of(tmp_path, kernel, btf), FILTERS["all"], emit_events=True, recent_closes=65536,
               max_offenders=4096)
    text = bcc_source(bpf_dir() / "tcpstate.c")
    assert not re.search(r'^\s*#\s*include\s+"', text, re.M), "a local header was left to bcc"
    spliced = tmp_path / "spliced.c"
    spliced.write_text(text)
    assert (gcc_preprocessed(shims, kernel, p.cflags(), spliced)
            == gcc_preprocessed(shims, kernel, p.cflags(), bpf_dir() / "tcpstate.c"))


MAP_CALL = re.compile(r"\.\s*(lookup|update|insert|delete|ringbuf_reserve|ringbuf_submit)\s*\(")


def test_no_map_call_is_spelled_inside_a_macro():
    """bcc refuses a map call written in a macro ("cannot use map function inside a macro"), and the
    shim cannot tell: each #define of bpf/ (continuation lines included) is checked here."""
    for path in sorted(bpf_dir().glob("*.[ch]")):
        for define in re.findall(r"^[ \t]*#[ \t]*define\b(?:[^\n]*\\\n)*[^\n]*", path.read_text(), re.M):
            assert not MAP_CALL.search(define), f"{path.name}: {define.splitlines()[0]}"
