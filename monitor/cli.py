"""cli.py: the `tcpstate` command group (run, check, watch, config-check): options parsed and checked, then handed on."""

from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from monitor import __version__
from monitor.check import run_checks
from monitor.daemon import Daemon, DaemonError, RunOptions
from monitor.detect.config import ConfigError, load_detector_config, split_overrides
from monitor.detect.sinks import JsonLines
from monitor.kernel.probes import ProbeError, open_probes
from monitor.kernel.tracefs import TracefsError
from monitor.kernel.watch import stream
from monitor.options import CIDR, LISTEN_ADDRESS, PORT
from monitor.serve import webconfig
from monitor.settings import (
    DEFAULT_FORECAST_WINDOW,
    DEFAULT_LISTEN_ADDRESS,
    DEFAULT_MAX_OFFENDERS,
    DEFAULT_MAX_SOCKETS,
    DEFAULT_RECENT_CLOSES,
    DEFAULT_STATE_INTERVAL,
    DEFAULT_TOP_N,
    make_filters,
)
from monitor.sockets import tally
from monitor.sockets.poller import Target
from monitor.system import privileges

log = logging.getLogger("tcpstate")


class Fatal(click.ClickException):
    """A runtime failure with its cause and fix; exit 1, one line, no traceback."""


class OneLineErrors(click.Group):
    """click prints usage plus a multi-line error; tcpstate prints one line and exits 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name or "tcpstate", complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `tcpstate`: help, not an error
            click.echo(exc.format_message())
            sys.exit(0)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else "tcpstate"
            click.echo(f"{where}: error: {exc.format_message()} (see '{where} --help')", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            click.echo(f"tcpstate: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("tcpstate: aborted", err=True)
            sys.exit(1)
        sys.exit(rv or 0)


def filter_options(fn):
    options = [
        click.option("--include-cidr", "include_cidr", type=CIDR, multiple=True, envvar="TCPSTATE_INCLUDE_CIDR",
                     help="Only connections with an endpoint in this CIDR (IPv4 or IPv6). Repeatable."),
        click.option("--exclude-cidr", "exclude_cidr", type=CIDR, multiple=True, envvar="TCPSTATE_EXCLUDE_CIDR",
                     help="Drop connections with an endpoint in this CIDR. Repeatable."),
        click.option("--include-port", "include_port", type=PORT, multiple=True, envvar="TCPSTATE_INCLUDE_PORT",
                     help="Only connections with this local or remote port. Repeatable."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _require_privileges() -> None:
    ok, why = privileges.can_load_programs()
    if not ok:
        raise Fatal(why)


def _stop_event() -> threading.Event:
    stop = threading.Event()

    def handler(signum, _frame):
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="tcpstate")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              envvar="TCPSTATE_LOG_LEVEL", show_default=True, help="Log verbosity (logs go to stderr).")
def cli(log_level):
    """tcpstate: live TCP connection states, resets and failed connects, counted in the kernel
    from tracepoints and served to Prometheus.

    \b
    Examples:
      sudo tcpstate check                      # can tcpstate run here?
      sudo tcpstate run                        # serve metrics on :9966
      sudo tcpstate watch --include-port 443   # stream transitions and resets
    """
    _setup_logging(log_level)


@cli.command()
@click.option("--listen-address", type=LISTEN_ADDRESS, default=DEFAULT_LISTEN_ADDRESS, show_default=True,
              envvar="TCPSTATE_LISTEN_ADDRESS", help="HOST:PORT to serve on; [ADDR]:PORT for IPv6.")
@filter_options
@click.option("--max-sockets", type=click.IntRange(1024, 1 << 24), default=DEFAULT_MAX_SOCKETS, show_default=True,
              envvar="TCPSTATE_MAX_SOCKETS", help="Size of the in-kernel per-socket table (LRU).")
@click.option("--recent-closes", type=click.IntRange(0, 1 << 24), default=DEFAULT_RECENT_CLOSES, show_default=True,
              envvar="TCPSTATE_RECENT_CLOSES", help="4-tuples of closed connections remembered in the kernel to count "
              "port reuse (in sets of 8 by a hash of the 4-tuple, each forgetting its oldest; 0 turns port-reuse "
              "counting off).")
@click.option("--max-offenders", type=click.IntRange(0, 1 << 20), default=DEFAULT_MAX_OFFENDERS, show_default=True,
              envvar="TCPSTATE_MAX_OFFENDERS", help="Peers remembered in the kernel as evidence for anomaly events "
              "(LRU; 0: events carry no top offenders).")
@click.option("--state-interval", type=click.FloatRange(0.1, 3600), default=DEFAULT_STATE_INTERVAL,
              show_default=True, envvar="TCPSTATE_STATE_INTERVAL", metavar="SECONDS",
              help="How often to count sockets by state from the kernel's socket tables (sock_diag).")
@click.option("--top-n", type=click.IntRange(1, 1000), default=DEFAULT_TOP_N, show_default=True,
              envvar="TCPSTATE_TOP_N", help="Ports and remote endpoints exported by name; the rest add up in "
              "port=\"other\".")
@click.option("--netns", "netns_paths", type=click.Path(dir_okay=False), multiple=True, envvar="TCPSTATE_NETNS",
              metavar="PATH", help="Also poll the sockets of this network namespace (/var/run/netns/NAME or "
              "/proc/PID/ns/net), labelled netns=NAME or netns=PATH. Repeatable; in the environment, "
              "colon-separated.")
@click.option("--forecast-window", type=click.FloatRange(1, 60), default=DEFAULT_FORECAST_WINDOW,
              show_default=True, envvar="TCPSTATE_FORECAST_WINDOW", metavar="SECONDS",
              help="The port-exhaustion forecast's rate counts the connections that entered TIME_WAIT within "
              "this many seconds (at most the 60 s TIME_WAIT lifetime).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="TCPSTATE_CONFIG", metavar="FILE",
              help="TOML file of anomaly detector thresholds (README, \"Anomaly detection\"); "
              "`tcpstate config-check FILE` validates one.")
@click.option("--set", "settings", multiple=True, metavar="SECTION.KEY=VALUE", envvar="TCPSTATE_SET",
              help="Override one threshold of the config, e.g. --set rst_storm.rate=50. Repeatable; in the "
              "environment, space-separated.")
@click.option("--events", "events_path", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              show_default=True, envvar="TCPSTATE_EVENTS", metavar="FILE",
              help="Where anomaly events go, one JSON object per line; - is stdout.")
@click.option("--events-webhook", metavar="URL", envvar="TCPSTATE_EVENTS_WEBHOOK",
              help="Also POST each event's JSON to this http(s) URL (bounded queue, retried, never blocks).")
@click.option("--web-config-file", "web_config_path", type=click.Path(dir_okay=False), metavar="FILE",
              envvar="TCPSTATE_WEB_CONFIG_FILE", help="TLS and basic auth for every endpoint, in the format of "
              "Prometheus' exporters (deploy/web-config.yml); re-read when it or its certificates change.")
@click.option("--user", "user", metavar="USER", envvar="TCPSTATE_USER",
              help="Once the probes are attached, become this user (name or uid). Capabilities are dropped "
              "either way, to none unless --netns needs some.")
@click.option("--raw-tracepoints/--no-raw-tracepoints", default=True, show_default=True,
              envvar="TCPSTATE_RAW_TRACEPOINTS", help="Attach inet_sock_set_state and tcp_destroy_sock as raw "
              "tracepoints that read the socket at offsets from the kernel's BTF (not held back while another "
              "tool's BPF program or a map read holds the CPU; no cheaper measured: BENCHMARKS.md); off, or "
              "without BTF, their tracepoint records are used.")
def run(listen_address, include_cidr, exclude_cidr, include_port, max_sockets, recent_closes, max_offenders,
        state_interval, top_n, netns_paths, forecast_window, config_path, settings, events_path, events_webhook,
        web_config_path, user, raw_tracepoints):
    """Run the daemon: attach the tracepoints and serve /metrics.

    Serves / (the live TCP state machine: transition rates, sockets per state, resets,
    anomalies), /api/v1/summary (the same as JSON), /metrics, /-/healthy, and /-/ready
    (200 once every available probe is attached). SIGTERM or SIGINT detaches everything
    and exits 0; SIGHUP re-reads --config (a file that does not load keeps the config in use).
    Once attached, the daemon drops every capability it no longer needs (and becomes
    --user if given) and, under systemd (Type=notify), reports ready.
    Socket counts by state, TIME_WAIT by port and the port-exhaustion forecast come
    from a background poll of the kernel's socket tables every --state-interval; the
    filters do not apply to them.
    Anomaly detectors (RST storm, TIME_WAIT buildup, connect failures, port reuse, resets
    right after the handshake; thresholds from --config and --set) write firing/resolved
    events as JSON lines to --events, with the top offending peers from the kernel.

    \b
    Examples:
      sudo tcpstate run
      sudo tcpstate run --listen-address 127.0.0.1:9966
      sudo tcpstate run --include-cidr 10.0.0.0/8 --include-cidr 2001:db8::/32
      sudo tcpstate run --exclude-cidr 127.0.0.0/8 --exclude-cidr ::1/128
      sudo tcpstate run --netns /var/run/netns/blue --netns /proc/4242/ns/net
      sudo TCPSTATE_INCLUDE_PORT="80 443" tcpstate run --state-interval 2
      sudo tcpstate run --config /etc/tcpstate/tcpstate.toml --events /var/log/tcpstate/events.jsonl
      sudo tcpstate run --set rst_storm.rate=50 --events-webhook http://127.0.0.1:9000/hook
      sudo tcpstate run --user nobody --web-config-file /etc/tcpstate/web-config.yml
    """
    detector_cfg = _detector_config(config_path, settings)
    web = None
    if web_config_path:
        try:
            web = webconfig.load(web_config_path)
        except webconfig.WebConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="'--web-config-file'") from None
    account = None
    if user:
        try:
            account = privileges.Account.lookup(user)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--user'") from None
    if events_webhook and not events_webhook.startswith(("http://", "https://")):
        raise click.BadParameter(f"{events_webhook!r} is not an http:// or https:// URL", param_hint="'--events-webhook'")
    targets = [Target.own()] + [Target.from_path(p) for p in netns_paths]
    labels = [t.label for t in targets]
    for t in targets:
        if labels.count(t.label) > 1:
            raise click.BadParameter(f"{t.path or 'the own namespace'} gives the label {t.label!r} twice",
                                     param_hint="'--netns'")
    try:
        events_out = JsonLines(sys.stdout) if events_path == "-" else JsonLines.open(events_path)
    except OSError as exc:
        raise click.BadParameter(f"{events_path}: cannot open: {exc.strerror}", param_hint="'--events'") from None
    stop = _stop_event()
    reload = threading.Event()
    signal.signal(signal.SIGHUP, lambda _signum, _frame: reload.set())
    _require_privileges()
    if tally.LIB is None:
        raise Fatal(f"cannot count socket tables: {tally.UNAVAILABLE}")
    opts = RunOptions(listen=listen_address, filters=make_filters(include_cidr, exclude_cidr, include_port),
                      max_sockets=max_sockets, recent_closes=recent_closes, max_offenders=max_offenders,
                      state_interval=state_interval, top_n=top_n, targets=tuple(targets),
                      forecast_window=forecast_window, config_path=config_path, overrides=split_overrides(settings),
                      detector_cfg=detector_cfg, events_out=events_out, webhook_url=events_webhook, web=web,
                      account=account, raw_tracepoints=raw_tracepoints)
    try:
        Daemon(opts).run(stop, reload)
    except DaemonError as exc:
        raise Fatal(str(exc)) from None
    return 0


def _detector_config(path, settings) -> dict:
    try:
        return load_detector_config(path, split_overrides(settings))
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="'--config'" if path and not str(exc).startswith("--set")
                                 else "'--set'") from None


@cli.command("config-check")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--set", "settings", multiple=True, metavar="SECTION.KEY=VALUE", help="An override, as for run.")
def config_check(path, settings):
    """Validate a detector config file and print the thresholds run would use.

    Exits 0 when the file is valid; 2 with the file, line and key when not.

    \b
    Example:
      tcpstate config-check /etc/tcpstate/tcpstate.toml
    """
    cfg = _detector_config(path, settings)
    for section, keys in cfg.items():
        click.echo(f"[{section}]")
        for key, value in keys.items():
            click.echo(f"{key} = {_toml_value(value)}")
        click.echo("")
    click.echo(f"{path}: OK", err=True)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


@cli.command()
def check():
    """Check that `tcpstate run` can work on this host.

    Prints one line per item (privileges, tracefs, each tracepoint and its layout,
    bcc, kernel headers, a test compile) with OK, WARN or FAIL and the fix.
    Exits 0 when `run` would work (WARN lines included), 1 otherwise.

    \b
    Example:
      sudo tcpstate check
    """

    items = run_checks()
    for item in items:
        click.echo(item.line())
    failed = [i for i in items if i.status == "FAIL"]
    click.echo("tcpstate run would not work: fix the FAIL lines above" if failed else "tcpstate run would work")
    return 1 if failed else 0


@cli.command()
@filter_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of a table.")
def watch(include_cidr, exclude_cidr, include_port, as_json):
    """Stream TCP transitions and resets live.

    Each line shows the endpoints, the states (for a reset, the state the connection
    was in and the kernel's reason), the time spent in the previous state, and the
    process that opened the socket when known. Events the ring buffer had to drop
    are reported on stderr, never dropped silently.

    \b
    Examples:
      sudo tcpstate watch
      sudo tcpstate watch --include-port 5432 --json | jq .
      sudo tcpstate watch --exclude-cidr 127.0.0.0/8
    """
    filters = make_filters(include_cidr, exclude_cidr, include_port)
    _require_privileges()
    stop = _stop_event()
    try:
        probes = open_probes(filters, emit_events=True)
    except (TracefsError, ProbeError) as exc:
        raise Fatal(str(exc)) from None
    log.info("watching (filters: %s); Ctrl-C stops", filters.describe())
    try:
        skipped = stream(probes, sys.stdout, as_json, stop, lambda line: click.echo(line, err=True))
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (e.g. `| head`); nothing left to say
        return 0
    finally:
        probes.close()
    if skipped:
        click.echo(f"tcpstate: {skipped} records had an unexpected size and were skipped", err=True)
    return 0


def main() -> None:
    cli(prog_name="tcpstate")


if __name__ == "__main__":
    main()
