"""btf.py: byte offsets of kernel struct members, read from the running kernel's BTF (/sys/kernel/btf/vmlinux).

The kernel headers bcc compiles against may not match the running kernel, so a field read at a
header offset can be wrong. The kernel's own type information cannot be: offsets taken from it at
load time go into the program as -D constants (probes.py). Only what that needs is read: structs,
unions, the typedefs and qualifiers in front of them, and member offsets (no bitfields).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

VMLINUX = "/sys/kernel/btf/vmlinux"
MAGIC = 0xEB9F

# BTF_KIND_* (include/uapi/linux/btf.h)
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)

# Bytes after the 12-byte common header: a fixed part, plus vlen entries of a per-kind size.
_TRAILER = {INT: (4, 0), ARRAY: (12, 0), STRUCT: (0, 12), UNION: (0, 12), ENUM: (0, 8), FUNC_PROTO: (0, 8),
            VAR: (4, 0), DATASEC: (0, 12), DECL_TAG: (4, 0), ENUM64: (0, 12)}
_QUALIFIERS = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)


class BTFError(RuntimeError):
    """BTF missing, malformed, or without the member asked for."""


@dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int


class BTF:
    """The types of one BTF blob, indexed once; members are decoded when asked for."""

    def __init__(self, blob: bytes):
        if len(blob) < 24:
            raise BTFError("BTF too short for its header")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", blob, 0)
        if magic != MAGIC:
            raise BTFError(f"not BTF (magic {magic:#x}) or not little-endian")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", blob, 8)
        self._blob = blob
        self._types_at = hdr_len + type_off
        self._strings = blob[hdr_len + str_off:hdr_len + str_off + str_len]
        # Per type id (1-based; 0 is void): (kind, name_off, info, size_or_type, position of its trailer)
        self._types: list[tuple[int, int, int, int, int]] = [(0, 0, 0, 0, 0)]
        self._by_name: dict[str, list[int]] = {}
        pos, end = self._types_at, self._types_at + type_len
        while pos < end:
            name_off, info, size_or_type = struct.unpack_from("<III", blob, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            fixed, per = _TRAILER.get(kind, (0, 0))
            self._types.append((kind, name_off, info, size_or_type, pos + 12))
            if kind in (STRUCT, UNION) and name_off:
                self._by_name.setdefault(self._name(name_off), []).append(len(self._types) - 1)
            pos += 12 + fixed + per * vlen
        if pos != end:
            raise BTFError("BTF type section does not end where its header says")

    @classmethod
    def load(cls, path: str = VMLINUX) -> "BTF":
        try:
            return cls(Path(path).read_bytes())
        except OSError as exc:
            raise BTFError(f"cannot read {path}: {exc.strerror} (a kernel without CONFIG_DEBUG_INFO_BTF)") from None

    def _name(self, off: int) -> str:
        end = self._strings.index(b"\0", off)
        return self._strings[off:end].decode()

    def _resolve(self, type_id: int) -> int:
        """Through typedefs and qualifiers to the type underneath."""
        for _ in range(32):
            kind, _n, _i, ref, _p = self._types[type_id]
            if kind not in _QUALIFIERS:
                return type_id
            type_id = ref
        raise BTFError("typedef chain too long")

    def members(self, type_id: int) -> list[Member]:
        kind, _name, info, _size, pos = self._types[type_id]
        if kind not in (STRUCT, UNION):
            raise BTFError(f"type {type_id} is not a struct or union")
        kflag, vlen = info >> 31, info & 0xFFFF
        out = []
        for i in range(vlen):
            name_off, member_type, offset = struct.unpack_from("<III", self._blob, pos + 12 * i)
            bits, size = (offset & 0xFFFFFF, offset >> 24) if kflag else (offset, 0)
            out.append(Member(self._name(name_off) if name_off else "", member_type, bits, size))
        return out

    def struct_id(self, name: str) -> int:
        """The struct (or union) of that name that has members (a forward declaration has none)."""
        ids = self._by_name.get(name, [])
        for type_id in ids:
            if self._types[type_id][2] & 0xFFFF:
                return type_id
        if ids:
            return ids[0]
        raise BTFError(f"no struct {name} in the kernel's BTF")

    def _find(self, type_id: int, name: str) -> tuple[int, int] | None:
        """(bit offset, member type) of a member, looking inside anonymous structs and unions
        (e.g. sk_buff's header fields, sock_common's address unions)."""
        for m in self.members(type_id):
            if m.name == name:
                if m.bitfield_size:
                    raise BTFError(f"member {name} is a bitfield, which a byte offset cannot reach")
                return m.bit_offset, m.type_id
            if not m.name:
                inner = self._resolve(m.type_id)
                if self._types[inner][0] in (STRUCT, UNION):
                    found = self._find(inner, name)
                    if found is not None:
                        return found[0] + m.bit_offset, found[1]
        return None

    def offset(self, path: str) -> int:
        """Byte offset of a member: "sock.sk_err", "sock.__sk_common.skc_state" (dots go into
        named members), "sk_buff.data" (anonymous members are searched)."""
        struct_name, *names = path.split(".")
        if not names:
            raise BTFError(f"{path}: name a member, as in struct.member")
        type_id, bits = self.struct_id(struct_name), 0
        for i, name in enumerate(names):
            found = self._find(type_id, name)
            if found is None:
                raise BTFError(f"struct {struct_name} has no member {'.'.join(names[:i + 1])} on this kernel")
            bits += found[0]
            type_id = self._resolve(found[1])
            if i + 1 < len(names) and self._types[type_id][0] not in (STRUCT, UNION):
                raise BTFError(f"{path}: {name} is not a struct")
        if bits % 8:
            raise BTFError(f"{path} does not start on a byte")
        return bits // 8

    def size(self, struct_name: str) -> int:
        return self._types[self.struct_id(struct_name)][3]
