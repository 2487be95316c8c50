"""The kernel's TCP counters and socket sysctls, parsed from recorded /proc text and read from this machine."""

import pytest

from monitor.kstats import KERNEL_COUNTERS, Limits, parse_snmp, read_kernel_counters, read_limits

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
    broken = "\n".join(l for l in SNMP.splitlines() if l != "Icmp: 12 0 0 12 12 0 0 12")
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


def test_limits_from_files(tmp_path):
    (tmp_path / "tcp_max_tw_buckets").write_text("131072\n")
    (tmp_path / "ip_local_port_range").write_text("32768\t60999\n")
    limits = read_limits(str(tmp_path))
    assert limits == Limits(131072, 32768, 60999)
    assert limits.ephemeral_ports == 28232


def test_inverted_port_range_has_no_ports():
    assert Limits(1, 61000, 60999).ephemeral_ports == 0
    assert Limits(1, 5000, 5000).ephemeral_ports == 1


def test_this_machine():
    counters = read_kernel_counters()
    assert set(counters) == set(EXPECTED)  # every one of them is decades old in Linux
    assert all(isinstance(v, int) and v >= 0 for v in counters.values())
    limits = read_limits()
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        first, last = map(int, f.read().split())
    with open("/proc/sys/net/ipv4/tcp_max_tw_buckets") as f:
        tw_max = int(f.read())
    assert limits == Limits(tw_max, first, last)
    assert limits.ephemeral_ports == last - first + 1
