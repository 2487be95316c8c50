"""page.py: the live state-machine page at /: a server-rendered snapshot of the summary (inline SVG), refreshed by web/page.js."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from html import escape
from importlib import resources

from monitor.serve.summary import FIGURE_TRANSITIONS

REFRESH_SECONDS = 2  # how often page.js polls the summary
HOT_RATE = 10.0  # per second: an edge at or above it is drawn "hot" (bold label, red)

# Assets at their own paths so that the CSP can forbid inline script and style.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
ASSETS = {"/static/page.js": ("page.js", "text/javascript; charset=utf-8"),
          "/static/page.css": ("page.css", "text/css; charset=utf-8")}

VIEW_W, VIEW_H = 1120, 880
NODE_W, NODE_H = 176, 66
# Centres of the states, as in the classic figure: opens at the top, the client's path (active
# open, active close) on the left, the server's (passive open and close) on the right, TIME_WAIT
# at the bottom. NEW_SYN_RECV (request sockets, counted by the poll, never a tracepoint state)
# sits beside LISTEN, whose handshakes they are.
NODES = {
    "CLOSE": (560, 50), "SYN_SENT": (250, 170), "LISTEN": (840, 170), "NEW_SYN_RECV": (1020, 250),
    "SYN_RECV": (840, 300), "ESTABLISHED": (560, 410), "FIN_WAIT1": (250, 530), "CLOSE_WAIT": (860, 530),
    "FIN_WAIT2": (250, 660), "CLOSING": (500, 660), "LAST_ACK": (860, 660), "TIME_WAIT": (330, 805),
}
TIME_WAIT_SIZE = (300, 96)  # room for the limit and the top ports
TERM_W, TERM_H = 92, 26
# Where each X -> CLOSE ends: a CLOSED terminal beside X, so that aborts and resets do not cross
# the figure to the one CLOSED at the top. LAST_ACK's normal end and TIME_WAIT's timer share one.
TERMINALS = {
    "SYN_SENT": (70, 170), "LISTEN": (1020, 110), "SYN_RECV": (1020, 360), "ESTABLISHED": (560, 530),
    "FIN_WAIT1": (70, 530), "FIN_WAIT2": (70, 660), "CLOSING": (660, 730), "CLOSE_WAIT": (1050, 530),
    "LAST_ACK": (860, 805),
}
STATE_ORDER = tuple(NODES)


def node_size(state: str) -> tuple:
    return TIME_WAIT_SIZE if state == "TIME_WAIT" else (NODE_W, NODE_H)


def _clip(cx, cy, w, h, dx, dy) -> tuple:
    """Where the ray from a box's centre along (dx, dy) leaves the box."""
    scale = min((w / 2) / abs(dx) if dx else math.inf, (h / 2) / abs(dy) if dy else math.inf)
    return cx + dx * scale, cy + dy * scale


def edge_geometry(a: str, b: str) -> tuple:
    """(x1, y1, x2, y2, label_x, label_y, anchor) of the edge a -> b between box borders."""
    (x1, y1), size1 = NODES[a], node_size(a)
    if b == "CLOSE" and a in TERMINALS:
        (x2, y2), size2 = TERMINALS[a], (TERM_W, TERM_H)
    else:
        (x2, y2), size2 = NODES[b], node_size(b)
    dx, dy = x2 - x1, y2 - y1
    sx, sy = _clip(x1, y1, *size1, dx, dy)
    ex, ey = _clip(x2, y2, *size2, -dx, -dy)
    mx, my = (sx + ex) / 2, (sy + ey) / 2
    if abs(dx) < 1:  # vertical: the label to the right of the line
        return sx, sy, ex, ey, mx + 8, my + 4, "start"
    length = math.hypot(dx, dy)
    # Above the line (on its left going right), so opposite edges' labels do not meet.
    nx, ny = dy / length, -dx / length
    if ny > 0:
        nx, ny = -nx, -ny
    return sx, sy, ex, ey, mx + nx * 10, my + ny * 10 + 4, "middle"


def rate_text(rate) -> str:
    return "…/s" if rate is None else f"{rate:.2f}/s"


def edge_class(rate) -> str:
    if not rate:
        return "idle"
    return "hot" if rate >= HOT_RATE else "busy"


def stroke_width(rate) -> float:
    return round(1.5 + min(7.0, 2 * math.log10(1 + 10 * (rate or 0))), 2)


def node_resets(resets: list, state: str) -> dict:
    """direction -> summed rate of the resets in a state (NONE, no socket, is drawn on CLOSE)."""
    states = ("CLOSE", "NONE") if state == "CLOSE" else (state,)
    out = {"sent": 0.0, "received": 0.0}
    for r in resets:
        if r["state"] in states:
            out[r["direction"]] += r["rate"] or 0.0
    return out


def resets_line(resets: list, state: str) -> str:
    r = node_resets(resets, state)
    return f"RST sent {r['sent']:.2f} · rcvd {r['received']:.2f} /s"


def resets_title(resets: list, state: str) -> str:
    states = ("CLOSE", "NONE") if state == "CLOSE" else (state,)
    lines = [f"{r['direction']} in {r['state']}, {r['reason']}: {r['total']} ({rate_text(r['rate'])})"
             for r in resets if r["state"] in states]
    return "\n".join([f"Resets in {state}:"] + lines) if lines else f"No resets in {state}"


def time_wait_lines(ns: dict | None) -> tuple:
    if ns is None:
        return "no poll yet", ""
    tw = ns["time_wait"]
    share = f" ({tw['sockets'] / tw['limit']:.1%})" if tw["limit"] else ""
    ports = " ".join(f"{p['side'][0]}:{p['port']}×{p['time_wait']}" for p in tw["top_ports"][:3])
    return f"limit {tw['limit']}{share}", f"top ports {ports}" if ports else "no ports"


def selected_namespace(summary: dict, label: str) -> dict | None:
    return next((ns for ns in summary["namespaces"] if ns["netns"] == label), None)


def render(summary: dict, netns: str = "", ready: bool = True) -> str:
    """The whole page as of the summary; netns: the namespace whose sockets the nodes show."""
    ns = selected_namespace(summary, netns)
    return "".join([
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>tcpstate {escape(summary['version'])}: live TCP state machine</title>",
        '<link rel="icon" href="data:,"><link rel="stylesheet" href="/static/page.css">'
        '<script src="/static/page.js" defer></script>',
        f'</head><body data-refresh="{REFRESH_SECONDS}" data-netns="{escape(netns)}">',
        _header(summary, ready), _banner(summary), _netns_nav(summary, netns),
        '<main><figure id="machine">', _svg(summary, ns), _legend(), "</figure>",
        '<aside id="side">', _side(summary, ns), "</aside></main>",
        "<footer>This is a snapshot as of the time above; with JavaScript it refreshes every "
        f"{REFRESH_SECONDS} s from <a href=\"/api/v1/summary\">/api/v1/summary</a>.</footer>",
        "</body></html>\n",
    ])


def window_text(summary: dict) -> str:
    w = summary["window"]
    if w["end"] is None:
        return "no counter read yet"
    return f"rates over the {w['seconds']:.1f} s to {datetime.fromtimestamp(w['end'], timezone.utc):%H:%M:%S} UTC"


def _header(summary: dict, ready: bool) -> str:
    return ("<header><h1>tcpstate <span class=\"version\">" + escape(summary["version"]) + "</span></h1>"
            f'<p id="asof" data-start="{summary["window"]["start"]}" data-end="{summary["window"]["end"]}">'
            f"{escape(window_text(summary))}</p>"
            '<nav class="links"><a href="/metrics">/metrics</a> <a href="/-/healthy">/-/healthy</a> '
            f'<a href="/-/ready">/-/ready</a> <span id="ready">({"ready" if ready else "not ready"})</span></nav>'
            "</header>")


def _banner(summary: dict) -> str:
    items = summary["anomalies"]
    if not items:
        return '<section id="banner" class="quiet"><p>No active anomalies.</p></section>'
    out = ['<section id="banner" class="firing"><h2>⚠ Active anomalies</h2><ul>']
    for a in items:
        offenders = a["top_offenders"] or []
        who = "; ".join(_offender(o) for o in offenders[:3])
        out.append(f'<li data-kind="{escape(a["kind"])}"><strong>{escape(a["severity"].upper())} '
                   f'{escape(a["kind"])}</strong>: {escape(a["summary"])}'
                   + (f'<br><span class="offenders">top offenders: {escape(who)}</span>' if who else "") + "</li>")
    out.append("</ul></section>")
    return "".join(out)


def _offender(o: dict) -> str:
    remote = o["remote"] or "?"
    if o["remote_port"]:
        remote += f":{o['remote_port']}"
    return f"{remote} ({o['count']} {o['kind'].replace('_', ' ')})"


def _netns_nav(summary: dict, netns: str) -> str:
    if len(summary["namespaces"]) < 2:
        return ""
    links = []
    for ns in summary["namespaces"]:
        label = ns["netns"]
        current = ' aria-current="page"' if label == netns else ""
        links.append(f'<a href="?netns={escape(label)}" data-netns="{escape(label)}"{current}>'
                     f'{escape(label or "host")}</a>')
    return '<nav id="netns">Sockets of namespace: ' + " ".join(links) + "</nav>"


def _svg(summary: dict, ns: dict | None) -> str:
    out = [f'<svg id="figure" viewBox="0 0 {VIEW_W} {VIEW_H}" role="img" aria-labelledby="figure-title">',
           '<title id="figure-title">TCP state machine: live transition rates, sockets per state, resets</title>',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="11" markerHeight="11" '
           'markerUnits="userSpaceOnUse" orient="auto"><path d="M0,0 L10,5 L0,10 z" class="arrowhead"/></marker></defs>']
    for state, (x, y) in TERMINALS.items():
        out.append(f'<g class="terminal" data-for="{state}"><rect x="{x - TERM_W / 2}" y="{y - TERM_H / 2}" '
                   f'width="{TERM_W}" height="{TERM_H}" rx="13"/><text x="{x}" y="{y + 4}">CLOSED</text></g>')
    by_pair = {(t["from"], t["to"]): t for t in summary["transitions"]}
    for a, b in FIGURE_TRANSITIONS:
        out.append(_edge(a, b, by_pair[(a, b)]))
    out.append(_timer_edge())
    out.append('<path class="untraced" d="M{:.0f},{:.0f} L{:.0f},{:.0f}"/>'.format(
        NODES["LISTEN"][0] + NODE_W / 2, NODES["LISTEN"][1] + 10, NODES["NEW_SYN_RECV"][0] - NODE_W / 2,
        NODES["NEW_SYN_RECV"][1] - 10))
    for state in STATE_ORDER:
        out.append(_node(state, summary, ns))
    out.append("</svg>")
    return "".join(out)


def _edge(a: str, b: str, t: dict) -> str:
    x1, y1, x2, y2, lx, ly, anchor = edge_geometry(a, b)
    rate = t["rate"]
    title = f"{a} → {b}: {rate_text(rate)}, {t['delta']} in the window, {t['total']} since start"
    return (f'<g class="edge {edge_class(rate)}" id="e-{a}-{b}" data-from="{a}" data-to="{b}">'
            f'<title>{escape(title)}</title>'
            f'<path d="M{x1:.1f},{y1:.1f} L{x2:.1f},{y2:.1f}" stroke-width="{stroke_width(rate):g}" '
            f'marker-end="url(#arrow)"/><text class="rate" x="{lx:.1f}" y="{ly:.1f}" text-anchor="{anchor}">'
            f"{rate_text(rate)}</text></g>")


def _timer_edge() -> str:
    # The timewait socket's end: no tracepoint sees it (README, Semantics), so no rate.
    (x, y), (w, _h) = NODES["TIME_WAIT"], TIME_WAIT_SIZE
    tx, ty = TERMINALS["LAST_ACK"]
    return (f'<g class="edge untraced" data-from="TIME_WAIT" data-to="CLOSE"><title>TIME_WAIT → CLOSED after '
            f'the 2MSL timer (60 s): not traced</title><path d="M{x + w / 2},{y} L{tx - TERM_W / 2},{ty}" '
            f'marker-end="url(#arrow)"/><text class="caption" x="{(x + w / 2 + tx - TERM_W / 2) / 2}" y="{y - 6}" '
            'text-anchor="middle">2MSL timer (not traced)</text></g>')


def _node(state: str, summary: dict, ns: dict | None) -> str:
    x, y = NODES[state]
    w, h = node_size(state)
    sockets = ns["sockets"].get(state, 0) if ns is not None else None
    resets = summary["resets"]
    lines = [f'<text class="name" x="{x}" y="{y - h / 2 + 18}">{state}</text>',
             f'<text class="sockets" x="{x}" y="{y - h / 2 + 36}">{_sockets_text(sockets)}</text>']
    if state == "NEW_SYN_RECV":
        lines.append(f'<text class="rst" x="{x}" y="{y - h / 2 + 54}">request sockets</text>')
    else:
        cls = "rst resetting" if any(node_resets(resets, state).values()) else "rst"
        lines.append(f'<text class="{cls}" x="{x}" y="{y - h / 2 + 54}">{escape(resets_line(resets, state))}</text>')
    if state == "TIME_WAIT":
        limit, ports = time_wait_lines(ns)
        lines.append(f'<text class="tw-limit" x="{x}" y="{y - h / 2 + 72}">{escape(limit)}</text>')
        lines.append(f'<text class="tw-ports" x="{x}" y="{y - h / 2 + 88}">{escape(ports)}</text>')
    return (f'<g class="node" id="n-{state}" data-state="{state}"><title>{escape(resets_title(resets, state))}'
            f'</title><rect x="{x - w / 2}" y="{y - h / 2}" width="{w}" height="{h}" rx="8"/>'
            + "".join(lines) + "</g>")


def _sockets_text(n) -> str:
    return "sockets: no poll yet" if n is None else f"{n} socket{'' if n == 1 else 's'}"


def _legend() -> str:
    return ('<figcaption>Edges: transitions per second over the window, thicker when busier; faint at 0/s, '
            f'bold red at {HOT_RATE:g}/s or more. Nodes: sockets in the state now (socket-table poll) and resets '
            "per second in that state (hover for the kernel's reasons). CLOSED boxes beside a state are "
            "aborts and resets ending the connection there.</figcaption>")


def _side(summary: dict, ns: dict | None) -> str:
    return "".join([_resets_table(summary["resets"]), _counters(summary["counters"]),
                    _other_transitions(summary["transitions"]), _time_wait(ns), _kernel(summary)])


def _table(section_id: str, title: str, head: tuple, rows: list, empty: str) -> str:
    out = [f'<section id="{section_id}"><h2>{escape(title)}</h2>']
    if not rows:
        return "".join(out) + f'<p class="empty">{escape(empty)}</p></section>'
    out.append("<table><thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>")
    return "".join(out) + "</tbody></table></section>"


def _resets_table(resets: list) -> str:
    rows = [(r["direction"], r["state"], r["reason"], rate_text(r["rate"]), r["total"]) for r in resets]
    return _table("resets", "Resets", ("dir", "state", "kernel reason", "rate", "total"), rows,
                  "No resets since start.")


COUNTER_TITLES = {"connect_failures": "Connect failures", "port_reuse": "Port reuse",
                  "resets_after_handshake": "Resets right after the handshake",
                  "syn_retransmits": "SYN retransmissions"}


def _counters(counters: dict) -> str:
    return "".join(_table(f"counter-{group}", COUNTER_TITLES.get(group, group), ("", "rate", "total"),
                          [(s["label"], rate_text(s["rate"]), s["total"]) for s in series], "none")
                   for group, series in counters.items())


def _other_transitions(transitions: list) -> str:
    drawn = set(FIGURE_TRANSITIONS)
    rows = [(f"{t['from']} → {t['to']}", rate_text(t["rate"]), t["total"]) for t in transitions
            if (t["from"], t["to"]) not in drawn]
    return _table("other-transitions", "Transitions not in the figure", ("", "rate", "total"), rows, "none")


def _time_wait(ns: dict | None) -> str:
    rows = [(p["side"], p["port"], p["time_wait"]) for p in ns["time_wait"]["top_ports"]] if ns else []
    return _table("time-wait", "TIME_WAIT by port", ("side", "port", "sockets"), rows, "none")


def _kernel(summary: dict) -> str:
    k, f = summary["kernel"], summary["filters"]
    rows = [(s["name"], "attached" if s["source"] else "DEGRADED", s["source"] or s["missing"])
            for s in k["signals"]]
    return (f'<section id="kernel"><h2>Kernel and filters</h2><p>Linux {escape(k["release"])}, tcp_send_reset '
            f'layout {escape(k["send_reset_layout"])}. Filters: <span id="filters">{escape(f["text"])}</span>.</p>'
            + _table("signals", "Tracepoints", ("signal", "status", "source or why missing"), rows, "none")
            + "</section>")


def asset(path: str) -> tuple | None:
    """(body, content type) of a static asset, or None."""
    if path not in ASSETS:
        return None
    name, ctype = ASSETS[path]
    return (resources.files("monitor.serve") / "web" / name).read_bytes(), ctype
