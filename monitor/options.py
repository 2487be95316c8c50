"""options.py: the click parameter types that parse command-line values into settings, with one-line errors."""

from __future__ import annotations

import ipaddress

import click

from monitor.settings import ListenAddress, normalize_cidr, parse_listen_address


class CidrType(click.ParamType):
    name = "CIDR"

    def convert(self, value, param, ctx):
        if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            return value
        try:
            return normalize_cidr(ipaddress.ip_network(str(value).strip(), strict=False))
        except ValueError:
            self.fail(f"{value!r} is not an IPv4 or IPv6 CIDR (e.g. 10.0.0.0/8, 2001:db8::/32)", param, ctx)


class PortType(click.ParamType):
    name = "PORT"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
            return value
        text = str(value).strip()
        if not text.isdigit() or not 1 <= int(text) <= 65535:
            self.fail(f"{value!r} is not a port number (1-65535)", param, ctx)
        return int(text)


class ListenAddressType(click.ParamType):
    name = "HOST:PORT"

    def convert(self, value, param, ctx):
        if isinstance(value, ListenAddress):
            return value
        try:
            return parse_listen_address(str(value))
        except ValueError as exc:
            self.fail(f"{value!r}: {exc}", param, ctx)


CIDR = CidrType()
PORT = PortType()
LISTEN_ADDRESS = ListenAddressType()
