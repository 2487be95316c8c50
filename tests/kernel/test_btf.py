"""The BTF reader on the running kernel's /sys/kernel/btf/vmlinux against bpftool's own decoding of it."""

import re
import subprocess

from monitor.kernel.btf import BTF
from monitor.kernel.tracefs import detect_layout, ensure_tracefs

BPFTOOL = "/usr/sbin/bpftool"


def bpftool_members(struct_name: str) -> dict[str, int]:
    """Direct members of a struct and their byte offsets, as bpftool prints the raw BTF."""
    raw = subprocess.run([BPFTOOL, "btf", "dump", "file", "/sys/kernel/btf/vmlinux", "format", "raw"],
                         check=True, capture_output=True, text=True).stdout
    block = re.search(rf"^\[\d+\] STRUCT '{struct_name}' size=\d+ vlen=[1-9]\d*\n((?:\t.*\n)+)", raw, re.M)
    assert block, f"bpftool shows no struct {struct_name}"
    return {m.group(1): int(m.group(2)) // 8
            for m in re.finditer(r"^\t'(\w+)' type_id=\d+ bits_offset=(\d+)$", block.group(1), re.M)}


def test_offsets_agree_with_bpftool():
    btf = BTF.load()
    for struct_name, names in (("sock", ("sk_err", "sk_protocol", "__sk_common")),
                               ("sk_buff", ("head", "data", "len")), ("inet_sock", ("sk", "inet_saddr", "inet_sport"))):
        expected = bpftool_members(struct_name)
        for name in names:
            assert btf.offset(f"{struct_name}.{name}") == expected[name], f"{struct_name}.{name}"


def test_the_raw_tracepoints_run_here():
    """README's kernel table: every kernel CI boots gives the socket fields the raw tracepoints read
    (bpf/sockread.h), each where bpftool's own decoding puts it; inet_sock starts with the socket."""
    layout = detect_layout(ensure_tracefs())
    assert layout.raw_tracepoints, layout.raw_problem
    assert bpftool_members("inet_sock")["sk"] == 0 and bpftool_members("sock")["__sk_common"] == 0
    common = bpftool_members("sock_common")
    assert layout.offsets["TCPSTATE_SKC_FAMILY_AT"] == common["skc_family"]
    assert layout.offsets["TCPSTATE_SKC_V6_DADDR_AT"] == common["skc_v6_daddr"]
    assert layout.offsets["TCPSTATE_SKC_V6_RCV_SADDR_AT"] == common["skc_v6_rcv_saddr"]
