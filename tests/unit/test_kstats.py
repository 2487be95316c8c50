"""The kernel's TCP counters and socket sysctls, parsed from recorded /proc text and read from this machine."""

import os

import pytest

from monitor.sockets.kstats import (
    KERNEL_COUNTERS,
    Limits,
    parse_snmp,
    read_kernel_counters,
    read_limits,
    read_sockstat,
    reserved_in_range,
)

# Excerpts in the kernel's layout (6.x): per group a header line of names, then a value line.
# The TcpExt lines are cut down to the counters used here plus neighbours, in the kernel's order.
NETSTAT = """\
TcpExt: SyncookiesSent SyncookiesRecv SyncookiesFailed EmbryonicRsts PruneCalled RcvPruned OfoPruned TW TWRecycled \
TWKilled PAWSActive DelayedACKs ListenOverflows ListenDrops TCPHPHits TCPAbortOnData TCPAbortOnClose \
TCPAbortOnMemory TCPAbortOnTimeout TCPAbortOnLinger TCPAbortFailed TCPMemoryPressures TCPTimeWaitOverflow \
TCPReqQFullDoCookies TCPReqQFullDrop TCPKeepAlive
TcpExt: 0 0 0 4 0 0 0 52714 31 0 0 8812 17 19 120433 211 35 2 9 1 0 0 1370 0 0 64
IpExt: InNoRoutes InTruncatedPkts InMcastPkts OutMcastPkts InBcastPkts OutBcastPkts InOctets OutOctets \
InMcastOctets OutMcastOctets InBcastOctets OutBcastOctets InCsumErrors InNoECTPkts InECT1Pkts InECT0Pkts InCEPkts \
ReasmOverlaps
IpExt: 0 0 0 0 0 0 61682410 829962 0 0 0 0 0 4902 0 0 0 0
"""

SNMP = """\
Ip: Forwarding DefaultTTL InReceives InHdrErrors InAddrErrors ForwDatagrams InUnknownProtos InDiscards InDelivers \
OutRequests OutDiscards OutNoRoutes ReasmTimeout ReasmReqds ReasmOKs ReasmFails FragOKs FragFails FragCreates \
OutTransmits
Ip: 1 64 5210 0 0 0 0 0 5210 4711 0 3 0 0 0 0 0 0 0 4711
Icmp: InMsgs InErrors InCsumErrors InDestUnreachs OutMsgs OutErrors OutRateLimitGlobal OutDestUnreachs
Icmp: 12 0 0 12 12 0 0 12
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs \
RetransSegs InErrs OutRsts InCsumErrors
Tcp: 1 200 120000 -1 346 275 31 15 3 4950 4578 2 0 91 0
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
Udp: 40 2 0 40 0 0 0 0 0
"""

EXPECTED = {
    "time_wait_overflow": 1370, "listen_overflows": 17, "listen_drops": 19, "abort_on_data": 211,
    "abort_on_close": 35, "abort_on_timeout": 9, "abort_on_linger": 1, "abort_on_memory": 2,
    "time_wait_expired": 52714, "time_wait_reused": 31,
    "out_rsts": 91, "estab_resets": 15, "attempt_fails": 31, "active_opens": 346, "passive_opens": 275,
}


def write_proc_net(path, netstat=NETSTAT, snmp=SNMP):
    (path / "netstat").write_text(netstat)
    (path / "snmp").write_text(snmp)
    return str(path)


def test_excerpts_are_well_formed():
    # parse_snmp zips names with values, so a miscounted excerpt would pass unnoticed.
    for text in (NETSTAT, SNMP):
        lines = text.splitlines()
        for header, values in zip(lines[::2], lines[1::2]):
            assert len(header.split()) == len(values.split()), header.split(":")[0]


def test_parse_snmp_pairs_names_with_values():
    t = parse_snmp(SNMP)
    assert t[("Tcp", "MaxConn")] == -1  # the one signed value: "no limit"
    assert t[("Tcp", "RtoMax")] == 120000
    assert t[("Ip", "OutTransmits")] == 4711
    assert t[("Udp", "MemErrors")] == 0
    n = parse_snmp(NETSTAT)
    assert n[("TcpExt", "TCPTimeWaitOverflow")] == 1370
    assert n[("IpExt", "InOctets")] == 61682410
    assert ("TcpExt", "InOctets") not in n  # groups do not bleed into each other


def test_parse_snmp_rejects_unpaired_lines():
    # A header whose value line is missing shifts every pair after it: refuse, do not misname.
    broken = "\n".join(line for line in SNMP.splitlines() if line != "Icmp: 12 0 0 12 12 0 0 12")
    with pytest.raises(ValueError):
        parse_snmp(broken)


def test_kernel_counters_from_files(tmp_path):
    assert read_kernel_counters(write_proc_net(tmp_path)) == EXPECTED
    assert set(EXPECTED) == {m for *_, m, _doc in KERNEL_COUNTERS}


def test_counter_missing_from_the_kernel_is_omitted(tmp_path):
    # An older kernel without a counter: no series, rather than a 0 that looks like a reading.
    lines = NETSTAT.splitlines()
    names, values = lines[0].split(), lines[1].split()
    drop = {names.index("TWRecycled"), names.index("TCPAbortOnLinger")}
    lines[0] = " ".join(v for i, v in enumerate(names) if i not in drop)
    lines[1] = " ".join(v for i, v in enumerate(values) if i not in drop)
    got = read_kernel_counters(write_proc_net(tmp_path, netstat="\n".join(lines) + "\n"))
    assert got == {k: v for k, v in EXPECTED.items() if k not in ("time_wait_reused", "abort_on_linger")}


def write_proc_sys(path, reserved=None):
    (path / "tcp_max_tw_buckets").write_text("131072\n")
    (path / "ip_local_port_range").write_text("32768\t60999\n")
    if reserved is not None:
        (path / "ip_local_reserved_ports").write_text(reserved)
    return str(path)


def test_limits_from_files(tmp_path):
    # A kernel without ip_local_reserved_ports: nothing reserved.
    limits = read_limits(write_proc_sys(tmp_path))
    assert limits == Limits(131072, 32768, 60999, reserved=0)
    assert limits.ephemeral_ports == limits.usable_ports == 28232


@pytest.mark.parametrize("text", ["\n", ""])
def test_limits_with_no_ports_reserved(tmp_path, text):
    # The kernel writes an empty list as a lone newline.
    limits = read_limits(write_proc_sys(tmp_path, text))
    assert limits == Limits(131072, 32768, 60999, reserved=0)
    assert limits.usable_ports == 28232


def test_limits_with_reserved_ports(tmp_path):
    # In the range 32768..60999: 50000 and 40000..40009; 8080 and 61000..61005 are outside it,
    # and 60995..61005 is cut at 60999 (5 ports).
    limits = read_limits(write_proc_sys(tmp_path, "8080,40000-40009,50000,60995-61005\n"))
    assert limits == Limits(131072, 32768, 60999, reserved=16)
    assert limits.ephemeral_ports == 28232
    assert limits.usable_ports == 28232 - 16


def test_unreadable_reserved_ports_fail_the_read(tmp_path):
    # A garbled list is an error, not "nothing reserved".
    with pytest.raises(ValueError):
        read_limits(write_proc_sys(tmp_path, "8080,x\n"))


@pytest.mark.parametrize("text, first, last, want", [
    ("", 32768, 60999, 0),
    ("\n", 32768, 60999, 0),
    ("8080\n", 32768, 60999, 0),  # below the range
    ("61000-62000\n", 32768, 60999, 0),  # above it
    ("1-32767,61000-65535", 32768, 60999, 0),  # right up to both edges, not in
    ("32768", 32768, 60999, 1),  # on the edges
    ("60999", 32768, 60999, 1),
    ("32760-32770", 32768, 60999, 3),  # overlapping the first edge: 32768..32770
    ("60990-61010", 32768, 60999, 10),  # overlapping the last edge: 60990..60999
    ("1-65535", 32768, 60999, 28232),  # covering the range
    ("40000-40009,40005-40014", 32768, 60999, 15),  # overlapping each other: counted once
    ("40000,40000,40000-40001", 32768, 60999, 2),  # duplicates
    ("40000-40009,50000,8080\n", 40005, 40005, 1),  # a one-port range
    ("40000-40009", 40100, 40000, 0),  # an empty (inverted) range
])
def test_reserved_in_range(text, first, last, want):
    assert reserved_in_range(text, first, last) == want


def test_inverted_port_range_has_no_ports():
    assert Limits(1, 61000, 60999).ephemeral_ports == 0
    assert Limits(1, 61000, 60999).usable_ports == 0
    assert Limits(1, 5000, 5000).ephemeral_ports == 1


def test_usable_ports():
    assert Limits(1, 40000, 40099).usable_ports == 100
    assert Limits(1, 40000, 40099, reserved=20).usable_ports == 80
    assert Limits(1, 40000, 40099, reserved=20).ephemeral_ports == 100
    assert Limits(1, 40000, 40099, reserved=100).usable_ports == 0
    assert Limits(1, 40000, 40099, reserved=150).usable_ports == 0  # never negative


SOCKSTAT = "sockets: used 300\nTCP: inuse 5 orphan 0 tw 320 alloc 12 mem 3\nUDP: inuse 1 mem 0\n"
SOCKSTAT6 = "TCP6: inuse 2\nUDP6: inuse 2\nUDPLITE6: inuse 0\nRAW6: inuse 1\nFRAG6: inuse 0 memory 0\n"


def test_read_sockstat_joins_both_files(tmp_path):
    (tmp_path / "sockstat").write_text(SOCKSTAT)
    (tmp_path / "sockstat6").write_text(SOCKSTAT6)
    text = read_sockstat(str(tmp_path))
    assert text == SOCKSTAT + SOCKSTAT6
    assert "TCP6: inuse 2" in text.splitlines()


def test_read_sockstat_without_ipv6(tmp_path):
    (tmp_path / "sockstat").write_text(SOCKSTAT)
    assert read_sockstat(str(tmp_path)) == SOCKSTAT


def test_read_sockstat_needs_sockstat(tmp_path):
    # Every network namespace has /proc/net/sockstat; only sockstat6 is missing without IPv6.
    (tmp_path / "sockstat6").write_text(SOCKSTAT6)
    with pytest.raises(FileNotFoundError):
        read_sockstat(str(tmp_path))


def test_this_machine():
    counters = read_kernel_counters()
    assert set(counters) == set(EXPECTED)  # every one of them is decades old in Linux
    assert all(isinstance(v, int) and v >= 0 for v in counters.values())
    limits = read_limits()
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        first, last = map(int, f.read().split())
    with open("/proc/sys/net/ipv4/tcp_max_tw_buckets") as f:
        tw_max = int(f.read())
    with open("/proc/sys/net/ipv4/ip_local_reserved_ports") as f:
        reserved = {p for part in f.read().strip().split(",") if part
                    for lo, _, hi in [part.partition("-")] for p in range(int(lo), int(hi or lo) + 1)}
    assert limits == Limits(tw_max, first, last, len({p for p in reserved if first <= p <= last}))
    assert limits.ephemeral_ports == last - first + 1
    text = read_sockstat()
    assert text.startswith("sockets:") and "\nTCP: inuse " in text
    if os.path.exists("/proc/net/sockstat6"):
        assert "\nTCP6: inuse " in text
