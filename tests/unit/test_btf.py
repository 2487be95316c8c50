"""The BTF reader on blobs built here: member offsets through anonymous members, typedefs and named nesting."""

import struct

import pytest

from monitor.kernel.btf import BTF, CONST, INT, PTR, STRUCT, TYPEDEF, UNION, BTFError


class Blob:
    """A little-endian BTF blob, type by type (ids from 1)."""

    def __init__(self):
        self.strings = b"\0"
        self.types = b""
        self.count = 0

    def name(self, s: str) -> int:
        if not s:
            return 0
        off = len(self.strings)
        self.strings += s.encode() + b"\0"
        return off

    def add(self, kind, name, size_or_type, trailer=b"", vlen=0, kflag=0) -> int:
        info = (kflag << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self.name(name), info, size_or_type) + trailer
        self.count += 1
        return self.count

    def int_(self, name, size):
        return self.add(INT, name, size, struct.pack("<I", size * 8))

    def compound(self, kind, name, size, members, kflag=0):
        trailer = b"".join(struct.pack("<III", self.name(n), t, off) for n, t, off in members)
        return self.add(kind, name, size, trailer, vlen=len(members), kflag=kflag)

    def bytes(self) -> bytes:
        hdr_len = 24
        return struct.pack("<HBBIIIII", 0xEB9F, 1, 0, hdr_len, 0, len(self.types), len(self.types),
                           len(self.strings)) + self.types + self.strings


@pytest.fixture
def btf():
    b = Blob()
    i32 = b.int_("int", 4)
    u16 = b.int_("unsigned short", 2)
    ptr = b.add(PTR, "", i32)
    b.compound(STRUCT, "common", 0, [])  # a forward-like empty twin, met first: the full one wins
    addrs = b.compound(STRUCT, "", 8, [("skc_daddr", i32, 0), ("skc_rcv_saddr", i32, 32)])
    anon = b.compound(UNION, "", 8, [("skc_addrpair", i32, 0), ("", addrs, 0)])
    common = b.compound(STRUCT, "common", 16, [("skc_family", u16, 0), ("", anon, 64)])
    typedef = b.add(TYPEDEF, "common_t", common)
    const = b.add(CONST, "", typedef)
    bits = b.compound(STRUCT, "flags", 4, [("low", i32, (3 << 24) | 0), ("high", i32, (5 << 24) | 3)], kflag=1)
    b.compound(STRUCT, "sock", 64, [("__sk_common", const, 0), ("sk_err", i32, 192), ("data", ptr, 256),
                                     ("flags", bits, 320), ("half", u16, 340)])
    return BTF(b.bytes())


def test_direct_and_nested_members(btf):
    assert btf.offset("sock.sk_err") == 24
    assert btf.offset("sock.data") == 32
    assert btf.offset("sock.__sk_common.skc_family") == 0  # through a const typedef to the full struct


def test_anonymous_members_are_searched(btf):
    assert btf.offset("common.skc_daddr") == 8
    assert btf.offset("common.skc_rcv_saddr") == 12
    assert btf.offset("sock.__sk_common.skc_rcv_saddr") == 12


def test_sizes_and_the_full_twin(btf):
    assert btf.size("common") == 16 and btf.size("sock") == 64


def test_what_cannot_be_read_is_refused(btf):
    with pytest.raises(BTFError, match="no member sk_nope"):
        btf.offset("sock.sk_nope")
    with pytest.raises(BTFError, match="no struct nosuch"):
        btf.offset("nosuch.x")
    with pytest.raises(BTFError, match="bitfield"):
        btf.offset("flags.high")
    with pytest.raises(BTFError, match="does not start on a byte"):
        btf.offset("sock.half")  # bit 340
    with pytest.raises(BTFError, match="is not a struct"):
        btf.offset("sock.sk_err.x")
    with pytest.raises(BTFError, match="name a member"):
        btf.offset("sock")


def test_malformed_blobs():
    with pytest.raises(BTFError, match="magic"):
        BTF(b"\0" * 32)
    b = Blob()
    b.int_("int", 4)
    raw = bytearray(b.bytes())
    struct.pack_into("<I", raw, 12, 13)  # type_len one byte short of the INT's trailer
    with pytest.raises(BTFError, match="does not end"):
        BTF(bytes(raw))
