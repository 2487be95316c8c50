"""probes.py: compile bpf/tcpstate.c for this kernel's layout, attach it, and read its maps (the only module importing bcc)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import platform
import re
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

from monitor.detect.config import DETECTOR_DEFAULTS
from monitor.kernel.abi import C, Offender, OffenderKey, bpf_dir
from monitor.kernel.counters import Counts, RawCounters, SocketTable, aggregate
from monitor.kernel.tracefs import RAW_TRACEPOINTS, TRACEPOINTS, Layout, detect_layout, ensure_tracefs
from monitor.settings import (
    DEFAULT_MAX_OFFENDERS,
    DEFAULT_MAX_SOCKETS,
    DEFAULT_RECENT_CLOSES,
    Filters,
)

log = logging.getLogger(__name__)


class ProgramStats(NamedTuple):
    run_time_ns: int
    run_cnt: int
    recursion_misses: int  # runs skipped: another BPF program was active on the CPU (README, "Limits")


class Windows(NamedTuple):
    """The seconds the kernel counts by (its settings map), from the detector config: a new
    connection on a 4-tuple closed this recently is a port reuse; a reset this soon after
    ESTABLISHED is one after the handshake (0 turns either off); an offender silent this long
    starts a new count."""

    reuse: float
    early_reset: float
    offender_idle: float

    @classmethod
    def from_config(cls, cfg: dict) -> "Windows":
        return cls(cfg["port_reuse"]["reuse_within_seconds"], cfg["reset_after_handshake"]["within_seconds"],
                   cfg["anomaly"]["offender_idle_seconds"])


DEFAULT_WINDOWS = Windows.from_config(DETECTOR_DEFAULTS)
NO_FILTERS = Filters()


class ProbeError(RuntimeError):
    """The program could not be built or attached; the message names the cause and the fix."""


def import_bcc():
    try:
        import bcc  # noqa: F401  (the Debian package python3-bpfcc)
        from bcc import BPF
    except ImportError as exc:
        raise ProbeError(
            f"cannot import bcc ({exc}): install python3-bpfcc (apt-get install python3-bpfcc) and run "
            "from a virtualenv made with --system-site-packages (make setup does both)"
        ) from None
    return BPF


def headers_dir() -> Path:
    """Where bcc takes the kernel headers from: $BCC_KERNEL_SOURCE when set (bcc then compiles in
    that one tree; the container image points it at its generic headers because it cannot link
    them under the host's read-only /lib/modules), else /lib/modules/$(uname -r)/build."""
    source = os.environ.get("BCC_KERNEL_SOURCE")
    return Path(source) if source else Path("/lib/modules", platform.release(), "build")


def check_headers() -> str:
    """Path of the kernel headers bcc will use, or a ProbeError naming the fix."""
    build = headers_dir()
    if os.environ.get("BCC_KERNEL_SOURCE") and not (build / "include" / "linux" / "kconfig.h").is_file():
        raise ProbeError(f"kernel headers missing: BCC_KERNEL_SOURCE={build} has no include/linux/kconfig.h; "
                         "point it at a kernel header tree (one directory) or unset it")
    if not (build / "include").is_dir():
        raise ProbeError(
            f"kernel headers missing: {build} does not exist; run 'make setup' (installs "
            f"linux-headers-{platform.release()} or the distribution's generic headers and links them there)"
        )
    return str(build.resolve())


def bcc_version() -> str:
    try:
        import bcc

        return getattr(bcc, "__version__", "unknown")
    except ImportError:
        return "missing"


def possible_cpus() -> int:
    from bcc.utils import get_possible_cpus

    return len(get_possible_cpus())


@contextlib.contextmanager
def compiler_output():
    """What clang prints while bcc compiles (warnings that mismatched headers cause), taken off
    the terminal: yields a function that returns it. bcc writes to fd 2 directly."""
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: (sink.seek(0), sink.read().decode(errors="replace"))[1].strip()
        finally:
            os.dup2(saved, 2)
            os.close(saved)


_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$')


def bcc_source(path: Path, _seen: set | None = None) -> str:
    """path's text with the headers it includes from its own folder spliced in, recursively, each
    once (as their include guards have it), and #line markers so that compiler messages name the
    real file and line. bcc rewrites map calls (socks.lookup() and the like) only in the text it
    is given: left in an included header they compile to calls through a null pointer."""
    seen = set() if _seen is None else _seen
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = _LOCAL_INCLUDE.match(line)
        header = path.parent / m.group(1) if m else None
        if header is None or not header.is_file():
            out.append(line)
        elif header.resolve() not in seen:
            seen.add(header.resolve())
            out += [f'#line 1 "{header}"', bcc_source(header, seen).rstrip("\n"), f'#line {n + 1} "{path}"']
        else:
            out.append(f"/* {line.strip()}: spliced above */")
    return "\n".join(out) + "\n"


# Programs bcc does not attach by itself (probes.attach), by tracepoint name.
MANUAL_PROGRAMS = {"kfree_skb": "tcpstate_kfree_skb"}


def program_name(group: str, name: str, raw: bool = False) -> str:
    """The function bcc loads for a tracepoint (raw: attached as a raw tracepoint)."""
    if raw and name in RAW_TRACEPOINTS:
        return f"raw_tracepoint__{name}"
    return MANUAL_PROGRAMS.get(name, f"tracepoint__{group}__{name}")


class Probes:
    """The loaded program: build flags from the layout and filters, then read counters."""

    COUNTER_MAPS = ("transitions", "resets", "connect_fails", "durations", "stats", "port_reuse", "resets_after_hs",
                    "retransmits", "syn_retrans")

    def __init__(self, layout: Layout, filters: Filters = NO_FILTERS, emit_events: bool = False,
                 max_sockets: int = DEFAULT_MAX_SOCKETS, recent_closes: int = DEFAULT_RECENT_CLOSES,
                 max_offenders: int = DEFAULT_MAX_OFFENDERS, windows: Windows = DEFAULT_WINDOWS):
        self.layout = layout
        self.filters = filters
        self.emit_events = emit_events
        self.max_sockets = max_sockets
        self.recent_closes = recent_closes
        self.max_offenders = max_offenders
        self.windows = windows
        self.bpf = None
        self._ncpus = 0
        self._buffers: dict = {}
        self._lock = threading.Lock()
        self._evictions = 0  # the highest derived so far: a counter must not go back

    def cflags(self) -> list[str]:
        flags = [f"-I{bpf_dir()}", f"-DTCPSTATE_MAX_SOCKS={self.max_sockets}",
                 f"-DTCPSTATE_MAX_CLOSES={self.recent_closes}", f"-DTCPSTATE_MAX_OFFENDERS={self.max_offenders}"]
        flags += self.layout.cflags()
        if self.filters.include_cidrs:
            flags.append("-DTCPSTATE_FILTER_INCLUDE_CIDR")
        if self.filters.exclude_cidrs:
            flags.append("-DTCPSTATE_FILTER_EXCLUDE_CIDR")
        if self.filters.include_ports:
            flags.append("-DTCPSTATE_FILTER_PORTS")
        if self.emit_events:
            flags.append("-DTCPSTATE_EMIT_EVENTS")
        return flags

    @property
    def attached(self) -> dict[str, bool]:
        """tracepoint ("group:name") -> attached, for the tracepoints this kernel needs."""
        return {tp: self.bpf is not None and ok for tp, ok in self.layout.probe_states().items()}

    def attach(self) -> None:
        if not self.layout.usable("inet_sock_set_state"):
            raise ProbeError(
                "tracepoint sock:inet_sock_set_state is " + self.layout.describe("inet_sock_set_state")
                + ": tcpstate needs it (Linux >= 4.16)"
            )
        BPF = import_bcc()
        check_headers()
        src = bpf_dir() / "tcpstate.c"
        # bcc attaches TRACEPOINT_PROBEs as it loads them, before the filter maps are filled:
        # include filters reject everything until then; an exclude filter may let the events
        # of those few microseconds through.
        with compiler_output() as output:
            try:
                self.bpf = BPF(text=bcc_source(src).encode(), cflags=self.cflags())
                for group, name, _ in TRACEPOINTS:
                    if name in MANUAL_PROGRAMS and self.layout.used(name):
                        self.bpf.attach_tracepoint(tp=f"{group}:{name}".encode(),
                                                   fn_name=MANUAL_PROGRAMS[name].encode())
            except Exception as exc:  # bcc raises bare Exception for compile and load errors
                failed = exc
            else:
                failed = None
            printed = output()
        if printed:
            log.log(logging.ERROR if failed else logging.DEBUG, "compiler output for %s:\n%s", src.name, printed)
        if failed is not None:
            self.close()
            raise ProbeError(f"could not compile or load {src}: {failed} (the log has the compiler's output; "
                             "run 'tcpstate check' for details)") from None
        self._fill_filters()
        self.set_windows(self.windows)
        self._ncpus = possible_cpus()
        log.debug("attached: %s", ", ".join(k for k, v in self.attached.items() if v))

    def set_windows(self, windows: Windows) -> None:
        """The kernel counts by these windows at once."""
        def ns(seconds: float) -> int:
            return max(1, round(seconds * 1e9)) if seconds > 0 else 0

        table = self.bpf[b"settings"]
        table[table.Key(C["TCPSTATE_SET_REUSE_WINDOW_NS"])] = table.Leaf(ns(windows.reuse))
        table[table.Key(C["TCPSTATE_SET_EARLY_RESET_NS"])] = table.Leaf(ns(windows.early_reset))
        table[table.Key(C["TCPSTATE_SET_OFFENDER_IDLE_NS"])] = table.Leaf(ns(windows.offender_idle))
        self.windows = windows

    def _fill_filters(self) -> None:
        def fill(prefix: str, cidrs) -> None:
            v4, v6 = self.bpf[f"{prefix}_v4".encode()], self.bpf[f"{prefix}_v6".encode()]
            for net in cidrs:
                table = v4 if net.version == 4 else v6
                key = table.Key()
                key.prefixlen = net.prefixlen
                raw = net.network_address.packed
                for i, b in enumerate(raw):
                    key.addr[i] = b
                table[key] = table.Leaf(1)

        if self.filters.include_cidrs:
            fill("include", self.filters.include_cidrs)
        if self.filters.exclude_cidrs:
            fill("exclude", self.filters.exclude_cidrs)
        if self.filters.include_ports:
            ports = self.bpf[b"include_ports"]
            for port in self.filters.include_ports:
                ports[ports.Key(port)] = ports.Leaf(1)

    def _read_percpu(self, name: str) -> tuple:
        """Per-key sums of a per-CPU u64 array, in one BPF_MAP_LOOKUP_BATCH call."""
        from bcc.libbcc import lib

        table = self.bpf[name.encode()]
        n = table.max_entries
        bufs = self._buffers.get(name)
        if bufs is None:
            # bcc's own batch helper sizes values for one CPU; per-CPU maps need ncpus each.
            bufs = ((ctypes.c_uint32 * n)(), (ctypes.c_uint64 * (n * self._ncpus))())
            self._buffers[name] = bufs
        keys, values = bufs
        count = ctypes.c_uint32(n)
        out_batch = ctypes.c_uint32(0)
        res = lib.bpf_lookup_batch(table.map_fd, None, ctypes.byref(out_batch), keys, values, ctypes.byref(count))
        if res != 0:
            err = ctypes.get_errno()
            if err in (errno.EINVAL, errno.EOPNOTSUPP, 524):  # 524: ENOTSUPP, no batch ops before 5.6
                return self._read_percpu_slow(table, n)
            if err != errno.ENOENT:  # ENOENT: the whole array came in this call
                raise OSError(err, f"reading map {name}: {os.strerror(err)}")
        if count.value != n:
            raise OSError(errno.EIO, f"reading map {name}: got {count.value} of {n} entries")
        ncpus = self._ncpus
        flat = values[:]
        sums = [0] * n
        for i in range(count.value):
            sums[keys[i]] = sum(flat[i * ncpus:(i + 1) * ncpus]) & 0xFFFFFFFFFFFFFFFF
        return tuple(sums)

    @staticmethod
    def _read_percpu_slow(table, n: int) -> tuple:
        # Kernels before 5.6 have no batch lookup for arrays.
        return tuple(sum(table.getvalue(table.Key(i))) & 0xFFFFFFFFFFFFFFFF for i in range(n))

    def counts(self) -> Counts:
        """Every counter named, with the programs' own stats and the socket table: what a scrape shows."""
        return aggregate(self.read(), self.layout.reason_names, self.program_stats(), self.socket_table())

    def read_everything(self) -> None:
        """Every map read the daemon makes once it runs, for the privilege drop to try first."""
        self.read()
        self.read_offenders()
        self.program_stats()
        self.socket_table()

    def read(self) -> RawCounters:
        with self._lock:  # concurrent scrapes share the read buffers; close() waits for them
            if self.bpf is None:
                raise ProbeError("probes are not attached")
            # What this kernel cannot count is absent, not 0: SYN retransmissions without the
            # tracepoint, the SYNs of failed connects (connect_fails' last slot) without segs_out.
            maps = [m for m in self.COUNTER_MAPS if m != "syn_retrans" or self.layout.used("tcp_retransmit_skb")]
            values = {name: self._read_percpu(name) for name in maps}
            if "TCPSTATE_SEGS_OUT_AT" not in self.layout.offsets:
                values["connect_fails"] = values["connect_fails"][:C["TCPSTATE_NFAILS"]]
            return RawCounters(**values)

    _COUNT_CHUNK = 4096  # entries per batch call: bounds the buffers whatever --max-sockets is

    def _count_entries(self, name: str) -> int:
        """Entries in a hash map now, by batch lookups (the kernel keeps no count it will tell)."""
        from bcc.libbcc import lib

        table = self.bpf[name.encode()]
        bufs = self._buffers.get(name)
        if bufs is None:
            n = self._COUNT_CHUNK
            bufs = ((ctypes.c_char * (ctypes.sizeof(table.Key) * n))(),
                    (ctypes.c_char * (ctypes.sizeof(table.Leaf) * n))())
            self._buffers[name] = bufs
        keys, values = bufs
        token, count, total = ctypes.c_uint32(0), ctypes.c_uint32(0), 0
        for call in range(table.max_entries // self._COUNT_CHUNK + 64):  # a bound: buckets can refill meanwhile
            count.value = self._COUNT_CHUNK
            res = lib.bpf_lookup_batch(table.map_fd, ctypes.byref(token) if call else None, ctypes.byref(token),
                                       keys, values, ctypes.byref(count))
            err = ctypes.get_errno() if res != 0 else 0
            total += count.value
            if err == errno.ENOENT:  # the last bucket was read
                return total
            if err:
                raise OSError(err, f"reading map {name}: {os.strerror(err)}")
        return total

    def socket_table(self) -> SocketTable:
        """The kernel says nothing when an LRU map evicts, so evictions are derived: entries
        inserted, minus those freed when their socket was destroyed, minus those still in the table.
        The counts are read before and after the entries (inserted before, freed after), so the
        result errs low by at most the churn of one read; it is kept monotonic."""
        inserted, freed = C["TCPSTATE_STAT_SOCK_INSERTED"], C["TCPSTATE_STAT_SOCK_FREED"]
        with self._lock:
            if self.bpf is None:
                raise ProbeError("probes are not attached")
            before = self._read_percpu("stats")
            entries = self._count_entries("socks")
            after = self._read_percpu("stats")
            self._evictions = max(self._evictions, before[inserted] - after[freed] - entries)
            return SocketTable(self.max_sockets, entries, self._evictions)

    def read_offenders(self) -> list[Offender]:
        """Every entry of the offenders table (empty when it is off). Bounded by its size; read
        only when an anomaly event is written, never per scrape."""
        with self._lock:
            if self.bpf is None or self.max_offenders == 0:
                return []
            table = self.bpf[b"offenders"]
            try:
                items = list(table.items_lookup_batch())
            except Exception:  # no batch ops for hash maps before 5.6: one lookup per key
                items = list(table.items())
        out = []
        for k, v in items:
            raw_key, raw_value = bytes(k), bytes(v)
            if len(raw_key) != ctypes.sizeof(OffenderKey) or len(raw_value) != ctypes.sizeof(Offender):
                raise OSError(errno.EIO, f"offenders: entry of {len(raw_key)}/{len(raw_value)} bytes, expected "
                              f"{ctypes.sizeof(OffenderKey)}/{ctypes.sizeof(Offender)}")
            out.append((OffenderKey.from_buffer_copy(raw_key), Offender.from_buffer_copy(raw_value)))
        return out

    def read_stats(self) -> dict[str, int]:
        with self._lock:
            raw = self._read_percpu("stats")
        return {"events_lost": raw[C["TCPSTATE_STAT_EVENTS_LOST"]],
                "untracked_transitions": raw[C["TCPSTATE_STAT_SOCK_UNTRACKED"]]}

    # Offsets in struct bpf_prog_info (uapi, append-only ABI; recursion_misses since 5.12).
    _INFO_SIZE, _RUN_TIME_NS, _RUN_CNT, _RECURSION_MISSES = 232, 192, 200, 208

    def program_stats(self) -> dict[str, ProgramStats]:
        """Per tracepoint: the kernel's own accounting of our program's runs. run_time_ns and
        run_cnt stay 0 unless kernel.bpf_stats_enabled=1; recursion_misses always counts, and
        takes in the runs the program skipped itself because another of ours held the CPU
        (bpf/guard.h)."""
        from bcc.libbcc import lib

        out = {}
        with self._lock:
            if self.bpf is None:
                return out
            funcs = dict(self.bpf.funcs)
            skips = self._read_percpu("probe_skips")
        for index, (group, name, _) in enumerate(TRACEPOINTS):
            fn = funcs.get(program_name(group, name, self.layout.raw_tracepoints).encode())
            if fn is None:
                continue
            buf = ctypes.create_string_buffer(self._INFO_SIZE)
            size = ctypes.c_uint32(self._INFO_SIZE)
            if lib.bpf_obj_get_info_by_fd(fn.fd, buf, ctypes.byref(size)) != 0:
                continue
            raw = buf.raw

            def u64(off, raw=raw, n=size.value):
                return int.from_bytes(raw[off:off + 8], "little") if off + 8 <= n else 0

            out[f"{group}:{name}"] = ProgramStats(u64(self._RUN_TIME_NS), u64(self._RUN_CNT),
                                                  u64(self._RECURSION_MISSES) + skips[index])
        return out

    def open_events(self, callback) -> None:
        """Call callback(data_ptr, size) for each watch record (needs emit_events=True)."""
        self.bpf[b"events"].open_ring_buffer(lambda _ctx, data, size: callback(data, size))

    def poll_events(self, timeout_ms: int) -> None:
        self.bpf.ring_buffer_poll(timeout_ms)

    def drain_events(self) -> None:
        """Stop the programs (the maps stay readable) and hand every record left in the ring
        buffer to the callback: with producers still running, the drain might never end."""
        with self._lock:
            for tp in list(self.bpf.tracepoint_fds):
                self.bpf.detach_tracepoint(tp)
            for tp in list(self.bpf.raw_tracepoint_fds):
                self.bpf.detach_raw_tracepoint(tp)
        self.bpf.ring_buffer_consume()

    def close(self) -> None:
        with self._lock:
            if self.bpf is not None:
                self.bpf.cleanup()
                self.bpf = None


def open_probes(filters: Filters = NO_FILTERS, raw_tracepoints: bool = True, **kwargs) -> Probes:
    """This kernel's tracepoints found (tracefs mounted if need be) and said in the log, how each
    count is read here, and the program compiled, loaded and attached. raw_tracepoints False: the
    tracepoints' records even where BTF would allow raw tracepoints. kwargs: Probes'. Raises
    TracefsError or ProbeError, one line each."""
    layout = detect_layout(ensure_tracefs())
    if not raw_tracepoints:
        layout.raw_off = "turned off (--no-raw-tracepoints)"
    for tp, usable in layout.probe_states().items():
        log.log(logging.INFO if usable else logging.WARNING, "tracepoint %s: %s", tp,
                layout.describe(tp.split(":", 1)[1]))
    if layout.btf_problem:
        log.warning("kernel BTF: %s", layout.btf_problem)
    for sig in layout.signals():
        if sig.source:
            log.info("%s: counted from %s", sig.name, sig.source)
        else:
            log.warning("%s: running without them: %s", sig.name, sig.missing)
    probes = Probes(layout, filters, **kwargs)
    probes.attach()
    return probes
