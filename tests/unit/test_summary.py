"""summary.build on recorded counters, polls and events: exact rates and shapes; the README's schema of /api/v1/summary matches what it emits."""

import json
import re
from pathlib import Path

from monitor.detect.event import Event
from monitor.kernel.counters import Counts
from monitor.serve import summary

from .summary_data import FILTERS, KERNEL, T0, counts, inputs
from .test_tracefs import layout_of

README = Path(__file__).resolve().parents[2] / "README.md"


def by_edge(s):
    return {(t["from"], t["to"]): (t["total"], t["delta"], t["rate"]) for t in s["transitions"]}


def test_rates_are_the_growth_over_the_window():
    s = summary.build(**inputs())
    assert s["window"] == {"start": T0, "end": T0 + 10, "seconds": 10.0}
    assert s["time"] == T0 + 10
    edges = by_edge(s)
    assert edges[("CLOSE", "SYN_SENT")] == (120, 80, 8.0)
    assert edges[("SYN_SENT", "CLOSE")] == (30, 20, 2.0)
    assert edges[("LAST_ACK", "CLOSE")] == (60, 40, 4.0)
    assert edges[("CLOSING", "TIME_WAIT")] == (0, 0, 0.0)  # in the figure: there, at zero
    # The figure's edges first, in its order, then what else was counted.
    assert [(t["from"], t["to"]) for t in s["transitions"]] == [*summary.FIGURE_TRANSITIONS, ("SYN_RECV", "FIN_WAIT1")]
    assert edges[("SYN_RECV", "FIN_WAIT1")] == (1, 0, 0.0)
    assert s["resets"] == [
        {"direction": "received", "state": "SYN_SENT", "reason": "UNKNOWN", "total": 30, "delta": 20, "rate": 2.0},
        {"direction": "sent", "state": "ESTABLISHED", "reason": "TCP_STATE", "total": 90, "delta": 60, "rate": 6.0},
        {"direction": "sent", "state": "NONE", "reason": "NO_SOCKET", "total": 30, "delta": 20, "rate": 2.0}]
    assert s["counters"]["connect_failures"][0] == {"label": "refused", "total": 30, "delta": 20, "rate": 2.0}
    assert s["counters"]["port_reuse"] == [{"label": "client", "total": 1, "delta": 0, "rate": 0.0},
                                           {"label": "server", "total": 0, "delta": 0, "rate": 0.0}]
    assert s["counters"]["resets_after_handshake"][3] == {"label": "received/server", "total": 30, "delta": 20,
                                                          "rate": 2.0}


def test_rates_round_to_milliunits():
    span = ((T0, counts(0)), (T0 + 3, counts(1)))
    s = summary.build(span, {}, [], KERNEL, FILTERS, "0.1.0")
    assert by_edge(s)[("SYN_SENT", "CLOSE")] == (1, 1, 0.333)


def test_syn_retransmits_show_only_when_counted():
    assert "syn_retransmits" not in summary.build(**inputs())["counters"]
    group = summary.build(**inputs(syn_retransmits=True))["counters"]["syn_retransmits"]
    assert group == [{"label": "client", "total": 120, "delta": 80, "rate": 8.0},
                     {"label": "server", "total": 0, "delta": 0, "rate": 0.0}]


def test_before_the_first_read_and_with_one_read():
    s = summary.build(None, {}, [], KERNEL, FILTERS, "0.1.0")
    assert s["window"] == {"start": None, "end": None, "seconds": 0.0} and s["time"] is None
    assert by_edge(s)[("CLOSE", "SYN_SENT")] == (0, 0, None)
    assert s["resets"] == [] and s["counters"] == {} and s["namespaces"] == [] and s["anomalies"] == []
    one = summary.build(((T0, counts(2)), (T0, counts(2))), {}, [], KERNEL, FILTERS, "0.1.0")
    assert by_edge(one)[("CLOSE", "SYN_SENT")] == (8, 0, None)  # no span: no rate yet, not 0


def test_namespaces_anomalies_kernel_and_filters():
    s = summary.build(**inputs())
    host = s["namespaces"][0]
    assert [ns["netns"] for ns in s["namespaces"]] == ["", "blue"]
    assert host["polled"] == T0 + 9.5
    assert host["sockets"]["TIME_WAIT"] == 41 and host["sockets"]["NEW_SYN_RECV"] == 1
    assert list(host["sockets"])[:3] == ["ESTABLISHED", "SYN_SENT", "SYN_RECV"]  # kernel order
    assert host["time_wait"] == {"sockets": 41, "limit": 262144, "top_ports": [
        {"side": "local", "port": 80, "time_wait": 40}, {"side": "remote", "port": 5432, "time_wait": 1}]}
    assert s["anomalies"] == [{
        "kind": "connect_failures", "severity": "warning", "since": T0 + 8,
        "summary": "40% of 20 connects failed over 8 s", "value": 0.4, "threshold": 0.1,
        "top_offenders": inputs()["anomalies"][0].details["top_offenders"]}]
    assert s["filters"] == {"text": "include 198.18.0.0/15; ports 80,443", "include_cidrs": ["198.18.0.0/15"],
                            "exclude_cidrs": [], "include_ports": [80, 443]}
    assert s["kernel"]["probes"] == {"sock:inet_sock_set_state": True, "tcp:tcp_receive_reset": False,
                                     "tcp:tcp_send_reset": True}
    assert s["kernel"]["signals"] == KERNEL["signals"]
    json.dumps(s, allow_nan=False)  # what the endpoint sends


def test_sampler_keeps_one_read_at_or_before_the_window():
    now = [T0]
    sampler = summary.Sampler(window=10, clock=lambda: now[0])
    assert sampler.span() is None
    reads = [Counts() for _ in range(15)]
    for i, c in enumerate(reads):
        now[0] = T0 + i
        assert sampler.observe(c) is c  # handed on to the engine unchanged
    (t_old, old), (t_new, new) = sampler.span()
    assert (t_old, t_new) == (T0 + 4, T0 + 14) and old is reads[4] and new is reads[14]
    now[0] = T0 + 14.5
    sampler.observe(reads[0])
    assert sampler.span()[0][0] == T0 + 4  # T0 + 5 is not yet at or before 14.5 - 10


def test_active_events_keep_the_firing_event_until_it_resolves():
    def event(kind, status):
        return Event(T0, kind, status, "warning", f"{kind} {status}", 1.0, 1.0, 10.0)

    active = summary.ActiveEvents()
    active(event("rst_storm", "firing"))
    active(event("connect_failures", "firing"))
    assert [e.kind for e in active.events()] == ["connect_failures", "rst_storm"]
    active(event("rst_storm", "resolved"))
    assert [e.summary for e in active.events()] == ["connect_failures firing"]


def test_kernel_info_from_the_layout_and_the_probes(tmp_path):
    layout = layout_of(tmp_path, "5.10")
    info = summary.kernel_info("5.10.0-46-amd64", layout, layout.probe_states())
    assert info["release"] == "5.10.0-46-amd64" and info["send_reset_layout"] == "legacy-nofamily"
    assert info["probes"] == {"sock:inet_sock_set_state": True, "tcp:tcp_send_reset": True,
                              "tcp:tcp_receive_reset": True, "tcp:tcp_destroy_sock": True,
                              "tcp:tcp_retransmit_skb": True, "tcp:tcp_retransmit_synack": True}
    signals = {s["name"]: s for s in info["signals"]}
    assert signals["transitions"] == {"name": "transitions", "missing": None, "source":
                                      "sock:inet_sock_set_state (raw tracepoint: struct sock fields at offsets from BTF)"}
    nosock = signals["resets sent for no socket"]
    assert nosock["source"] is None and "not counted" in nosock["missing"]  # what the page shows as degraded
    assert len(signals) == 11


# --- the README's schema ---------------------------------------------------------------------------

def readme_section() -> str:
    text = README.read_text()
    start = text.index("### `/api/v1/summary`")
    return text[start:text.index("\n## ", start)]


def shape(value):
    """Keys all the way down; a list by its first element."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return None


# Maps keyed by data (state names, tracepoints) and the anomaly events' own offender records,
# described in the README's prose rather than field by field.
OPAQUE = {"namespaces[].sockets", "kernel.probes", "anomalies[].top_offenders"}


def paths(value, prefix=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield f"{prefix}{k}"
            if f"{prefix}{k}" not in OPAQUE:
                yield from paths(v, f"{prefix}{k}.")
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        yield from paths(value[0], prefix.rstrip(".") + "[].")


def test_readme_example_has_the_shape_the_builder_emits():
    example = json.loads(re.search(r"```json\n(.*?)\n```", readme_section(), re.S).group(1))
    emitted = summary.build(**inputs(syn_retransmits=True))
    # Sockets by state and the counter groups are keyed by name: their keys are data, not schema.
    for s in (example, emitted):
        s["namespaces"][0]["sockets"] = {}
        s["counters"] = {k: v for k, v in s["counters"].items() if k == "connect_failures"}
        s["kernel"]["probes"] = {}
    assert shape(example) == shape(emitted)


def test_readme_documents_every_field():
    first_cells = re.findall(r"^\| ([^|]+) \|", readme_section(), re.M)
    documented = {name for cell in first_cells for name in re.findall(r"`([^`]+)`", cell)}
    emitted = summary.build(**inputs(syn_retransmits=True))
    emitted["counters"] = {"GROUP": emitted["counters"]["connect_failures"]}
    missing = sorted(set(paths(emitted)) - documented)
    assert not missing, f"README's /api/v1/summary table lacks {missing}"
    assert sorted(documented - set(paths(emitted))) == []
