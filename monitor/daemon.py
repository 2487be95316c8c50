"""daemon.py: `tcpstate run` as components: started in order, stopped in reverse, the detector config reloaded on SIGHUP."""

from __future__ import annotations

import contextlib
import logging
import platform
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from monitor import __version__
from monitor.detect.config import ConfigError, load_detector_config
from monitor.detect.detectors import DETECTORS, build
from monitor.detect.engine import Engine
from monitor.detect.sinks import JsonLines, Webhook
from monitor.kernel import offenders
from monitor.kernel.counters import aggregate
from monitor.kernel.probes import ProbeError, Probes, Windows, bcc_version, open_probes
from monitor.kernel.tracefs import TracefsError
from monitor.serve import summary
from monitor.serve.collectors.anomalies import AnomalyCollector
from monitor.serve.collectors.config import ReloadCollector
from monitor.serve.collectors.kernel import KernelCollector
from monitor.serve.collectors.sockets import SocketCollector
from monitor.serve.http import HttpServer, ServerError
from monitor.serve.webconfig import WebConfig
from monitor.settings import Filters, ListenAddress
from monitor.sockets import tally
from monitor.sockets.poller import StatePoller, Target
from monitor.system import memory, privileges
from monitor.system.sdnotify import Notifier
from monitor.timing import WallClock

log = logging.getLogger("tcpstate")  # the daemon speaks as tcpstate, as the CLI does


class DaemonError(RuntimeError):
    """The daemon cannot run; the message names the cause and the fix (one line)."""


@dataclass(frozen=True)
class RunOptions:
    """What `tcpstate run` was asked to do, validated by the CLI."""

    listen: ListenAddress
    filters: Filters
    max_sockets: int
    recent_closes: int
    max_offenders: int
    state_interval: float
    top_n: int
    targets: tuple[Target, ...]
    forecast_window: float
    config_path: str | None
    overrides: tuple[str, ...]  # --set SECTION.KEY=VALUE items
    detector_cfg: dict  # as loaded from config_path and overrides at start
    events_out: JsonLines
    webhook_url: str | None = None
    web: WebConfig | None = None
    account: privileges.Account | None = None
    raw_tracepoints: bool = True


@dataclass
class ReloadHistory:
    """Config loads since start, for tcpstate_config_*: counts by result, whether the last one
    worked, when the config in use was loaded."""

    success: int = 0
    failure: int = 0
    last_ok: bool = True
    last_success: float = field(default_factory=time.time)

    def snapshot(self) -> dict:
        return {"success": self.success, "failure": self.failure, "last_ok": self.last_ok,
                "last_success": self.last_success}


class Daemon:
    """run() starts every component, serves until stop is set, reloads when reload is set, and
    stops everything it started, in reverse, whatever happened."""

    def __init__(self, opts: RunOptions):
        self.opts = opts
        self.detector_cfg = opts.detector_cfg
        self.reloads = ReloadHistory()
        self.registry = CollectorRegistry(auto_describe=False)
        self.http = HttpServer(opts.listen, self.registry, opts.filters.describe(), web_config=opts.web)
        self.probes: Probes | None = None
        self.engine: Engine | None = None

    def run(self, stop: threading.Event, reload: threading.Event) -> None:
        with contextlib.ExitStack() as stack:
            systemd = stack.enter_context(contextlib.closing(Notifier()))
            stack.callback(log.info, "stopped")
            stack.callback(self.opts.events_out.close)
            if not self._start(stack, stop):
                return  # a signal came while the program compiled
            # The first to stop: no scrape reads a map being closed, and systemd knows at once.
            stack.callback(self.http.stop)
            stack.callback(systemd.stopping)
            scheme = self.opts.web.scheme if self.opts.web else "http"
            how = f" ({self.opts.web.describe()})" if self.opts.web else ""
            log.info("ready: serving %s://%s/metrics%s", scheme, self.opts.listen, how)
            attached = self.probes.attached
            systemd.ready(f"serving {scheme}://{self.opts.listen}/metrics; "
                          f"{sum(attached.values())} of {len(attached)} tracepoints attached")
            while not stop.wait(0.2):  # signal handlers only set flags: the work happens here
                if reload.is_set():
                    reload.clear()
                    self.reload()

    def _start(self, stack: contextlib.ExitStack, stop: threading.Event) -> bool:
        opts, cfg = self.opts, self.detector_cfg
        try:
            self.http.start()  # the port is taken first: a second daemon fails before compiling
        except ServerError as exc:
            raise DaemonError(str(exc)) from None
        stack.callback(self.http.stop)
        log.info("filters: %s", opts.filters.describe())
        try:
            self.probes = open_probes(opts.filters, raw_tracepoints=opts.raw_tracepoints,
                                      max_sockets=opts.max_sockets, recent_closes=opts.recent_closes,
                                      max_offenders=opts.max_offenders, windows=Windows.from_config(cfg))
        except (TracefsError, ProbeError) as exc:
            raise DaemonError(str(exc)) from None
        probes, layout = self.probes, self.probes.layout
        stack.callback(probes.close)
        if stop.is_set():
            return False
        build_info = {"version": __version__, "kernel": platform.release(), "bcc_version": bcc_version(),
                      "send_reset_layout": layout.send_reset_variant or "none"}
        self.registry.register(KernelCollector(probes.counts, lambda: probes.attached, build_info))
        self._drop_privileges()
        log.info(memory.release_compiler_memory())
        log.info("socket tables: counted by %s", tally.LIBRARY)

        poller = StatePoller(list(opts.targets), opts.state_interval, opts.top_n, opts.forecast_window)
        self.registry.register(SocketCollector(poller.results, poller.errors, time.time))
        poller.start()
        stack.callback(poller.stop)

        sinks = [opts.events_out]
        webhook = Webhook(opts.webhook_url) if opts.webhook_url else None
        if webhook is not None:
            stack.callback(webhook.close)
            sinks.append(webhook)
        # The page's rates come from the engine's one read per tick: no read of the maps of its own.
        sampler, firing = summary.Sampler(), summary.ActiveEvents()
        detectors = build(cfg)
        self.engine = Engine(detectors, lambda: sampler.observe(aggregate(probes.read(), layout.reason_names)),
                             poller.results, sinks + [firing], cfg["anomaly"]["interval_seconds"],
                             read_offenders=lambda: offenders.decode(probes.read_offenders(), WallClock()),
                             top_offenders=cfg["anomaly"]["top_offenders"])
        self.registry.register(AnomalyCollector(list(DETECTORS), self.engine.fired, self.engine.active, webhook))
        self.registry.register(ReloadCollector(self.reloads.snapshot))
        self.engine.start()
        stack.callback(self.engine.stop)
        log.info("anomaly detectors: %s", ", ".join(d.kind for d in detectors) or "none")

        kernel = summary.kernel_info(platform.release(), layout, probes.attached)
        self.http.summary = lambda: summary.build(sampler.span(), poller.results(), firing.events(), kernel,
                                                  opts.filters, __version__)
        self.http.ready.set()
        return True

    def _drop_privileges(self) -> None:
        """Credentials are per thread: the HTTP thread pauses so that the process has one thread
        while they change, and every thread started later inherits the dropped set."""
        account = self.opts.account
        needs = privileges.netns_needs(t.path for t in self.opts.targets if t.path)
        self.http.pause()
        try:
            log.info(privileges.drop_after_attach(self.probes.read_everything, account, needs))
        except privileges.ReadsRefused as exc:
            if account is not None:
                raise DaemonError(f"cannot become user {account.name}: {exc.strerror}; run without --user") from None
            log.warning("privileges kept: %s", exc.strerror)
        except privileges.PrivilegeError as exc:  # a half-done drop is no state to serve in
            who = f"become user {account.name}" if account is not None else "drop privileges"
            raise DaemonError(f"cannot {who}: {exc.strerror}") from None
        finally:
            self.http.resume()

    def reload(self) -> None:
        """SIGHUP: read --config again (with --set on top). A bad file keeps the config in use and
        says why; a good one goes to the detectors and the kernel's windows at once."""
        path = self.opts.config_path
        if path is None:
            log.info("SIGHUP: no --config file to reload; the thresholds stay as they are")
            return
        try:
            cfg = load_detector_config(path, self.opts.overrides)
            windows = Windows.from_config(cfg)
            if windows != self.probes.windows:
                try:
                    self.probes.set_windows(windows)
                except Exception as exc:  # noqa: BLE001 (bcc raises bare exceptions): keep what the kernel has
                    raise ConfigError(f"cannot update the kernel's windows: {exc}") from None
        except ConfigError as why:
            self.reloads.failure += 1
            self.reloads.last_ok = False
            log.error("config reload failed, keeping the previous config: %s", why)
            return
        changed = self.engine.reconfigure(cfg)
        self.detector_cfg = cfg
        self.reloads.success += 1
        self.reloads.last_ok = True
        self.reloads.last_success = time.time()
        log.info("config reloaded from %s: %s", path, "changed " + ", ".join(changed) if changed else "no changes")
