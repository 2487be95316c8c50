"""Parsing of listen addresses and filters."""

import ipaddress

import pytest

from monitor.settings import make_filters, parse_listen_address


@pytest.mark.parametrize("text,host,port", [
    (":9966", "", 9966),
    ("127.0.0.1:80", "127.0.0.1", 80),
    ("[::1]:9966", "::1", 9966),
    ("[::]:0", "::", 0),
    ("localhost:9966", "localhost", 9966),
])
def test_listen_address(text, host, port):
    addr = parse_listen_address(text)
    assert (addr.host, addr.port) == (host, port)


@pytest.mark.parametrize("text", ["9966", "::1:9966", "[::1]9966", "1.2.3.4:", "1.2.3.4:http", "a b:1", "[::1]:70000"])
def test_bad_listen_address(text):
    with pytest.raises(ValueError):
        parse_listen_address(text)


def test_filters_dedupe_and_describe():
    f = make_filters([ipaddress.ip_network("10.0.0.0/8")] * 2, [ipaddress.ip_network("::1/128")], [443, 80, 443])
    assert f.include_cidrs == (ipaddress.ip_network("10.0.0.0/8"),)
    assert f.include_ports == (80, 443)
    assert f.describe() == "include 10.0.0.0/8; exclude ::1/128; ports 80,443"
    assert make_filters().describe() == "none"


def test_v4_mapped_cidr_becomes_ipv4():
    from monitor.options import CIDR

    assert CIDR.convert("::ffff:198.18.0.0/111", None, None) == ipaddress.ip_network("198.18.0.0/15")
    assert CIDR.convert("2001:db8::/32", None, None) == ipaddress.ip_network("2001:db8::/32")
    assert CIDR.convert("10.1.2.3/8", None, None) == ipaddress.ip_network("10.0.0.0/8")


def test_header_define_that_cannot_be_evaluated_is_an_error(tmp_path):
    from monitor.kernel.abi import header_constants

    h = tmp_path / "h.h"
    h.write_text("#define TCPSTATE_A 4\n#define TCPSTATE_B (TCPSTATE_A * 2)\n#define TCPSTATE_C (1U << 3)\n")
    with pytest.raises(ValueError, match="TCPSTATE_C"):
        header_constants(str(h))
    h.write_text("#define TCPSTATE_A 4\n#define TCPSTATE_B (TCPSTATE_A * 2)\n")
    assert header_constants(str(h)) == {"TCPSTATE_A": 4, "TCPSTATE_B": 8}
