// page.js: keeps the state-machine page live: polls /api/v1/summary and redraws what page.py rendered.
"use strict";

const HOT_RATE = 10;
const TITLES = {connect_failures: "Connect failures", port_reuse: "Port reuse",
  resets_after_handshake: "Resets right after the handshake", syn_retransmits: "SYN retransmissions"};
let last = null;
let netns = document.body.dataset.netns || "";

// These mirror page.py's functions of the same names: the snapshot without JavaScript and the
// live page must read the same.
const rateText = (r) => (r === null ? "…/s" : r.toFixed(2) + "/s");
const edgeClass = (r) => (!r ? "idle" : r >= HOT_RATE ? "hot" : "busy");
const strokeWidth = (r) => Math.round((1.5 + Math.min(7, 2 * Math.log10(1 + 10 * (r || 0)))) * 100) / 100;
const resetStates = (state) => (state === "CLOSE" ? ["CLOSE", "NONE"] : [state]);

function nodeResets(resets, state) {
  const out = {sent: 0, received: 0};
  for (const r of resets) if (resetStates(state).includes(r.state)) out[r.direction] += r.rate || 0;
  return out;
}

function resetsTitle(resets, state) {
  const lines = resets.filter((r) => resetStates(state).includes(r.state))
    .map((r) => `${r.direction} in ${r.state}, ${r.reason}: ${r.total} (${rateText(r.rate)})`);
  return lines.length ? [`Resets in ${state}:`, ...lines].join("\n") : `No resets in ${state}`;
}

function el(tag, text, attrs) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

function table(id, title, head, rows, empty) {
  const section = el("section", undefined, {id});
  section.append(el("h2", title));
  if (!rows.length) {
    section.append(el("p", empty, {class: "empty"}));
    return section;
  }
  const t = el("table");
  const tr = el("tr");
  for (const h of head) tr.append(el("th", h));
  const thead = el("thead");
  thead.append(tr);
  const tbody = el("tbody");
  for (const row of rows) {
    const r = el("tr");
    for (const c of row) r.append(el("td", String(c)));
    tbody.append(r);
  }
  t.append(thead, tbody);
  section.append(t);
  return section;
}

function setTitle(g, text) {
  g.querySelector("title").textContent = text;
}

function drawEdges(s) {
  const byId = new Map(s.transitions.map((t) => [`e-${t.from}-${t.to}`, t]));
  for (const g of document.querySelectorAll("g.edge[id]")) {
    const t = byId.get(g.id);
    g.setAttribute("class", "edge " + edgeClass(t.rate));
    g.querySelector("path").setAttribute("stroke-width", String(strokeWidth(t.rate)));
    g.querySelector("text.rate").textContent = rateText(t.rate);
    setTitle(g, `${t.from} → ${t.to}: ${rateText(t.rate)}, ${t.delta} in the window, ${t.total} since start`);
  }
}

function timeWaitLines(ns) {
  if (!ns) return ["no poll yet", ""];
  const tw = ns.time_wait;
  const share = tw.limit ? ` (${((100 * tw.sockets) / tw.limit).toFixed(1)}%)` : "";
  const ports = tw.top_ports.slice(0, 3).map((p) => `${p.side[0]}:${p.port}×${p.time_wait}`).join(" ");
  return [`limit ${tw.limit}${share}`, ports ? `top ports ${ports}` : "no ports"];
}

function drawNodes(s, ns) {
  for (const g of document.querySelectorAll("g.node")) {
    const state = g.dataset.state;
    const n = ns ? ns.sockets[state] || 0 : null;
    g.querySelector("text.sockets").textContent =
      n === null ? "sockets: no poll yet" : `${n} socket${n === 1 ? "" : "s"}`;
    setTitle(g, resetsTitle(s.resets, state));
    if (state !== "NEW_SYN_RECV") {
      const r = nodeResets(s.resets, state);
      const rst = g.querySelector("text.rst");
      rst.textContent = `RST sent ${r.sent.toFixed(2)} · rcvd ${r.received.toFixed(2)} /s`;
      rst.setAttribute("class", r.sent || r.received ? "rst resetting" : "rst");
    }
    if (state === "TIME_WAIT") {
      const [limit, ports] = timeWaitLines(ns);
      g.querySelector("text.tw-limit").textContent = limit;
      g.querySelector("text.tw-ports").textContent = ports;
    }
  }
}

function offender(o) {
  const remote = (o.remote || "?") + (o.remote_port ? `:${o.remote_port}` : "");
  return `${remote} (${o.count} ${o.kind.replace(/_/g, " ")})`;
}

function drawBanner(s) {
  const banner = el("section", undefined, {id: "banner", class: s.anomalies.length ? "firing" : "quiet"});
  if (!s.anomalies.length) {
    banner.append(el("p", "No active anomalies."));
  } else {
    banner.append(el("h2", "⚠ Active anomalies"));
    const ul = el("ul");
    for (const a of s.anomalies) {
      const li = el("li", undefined, {"data-kind": a.kind});
      li.append(el("strong", `${a.severity.toUpperCase()} ${a.kind}`), `: ${a.summary}`);
      const who = (a.top_offenders || []).slice(0, 3).map(offender).join("; ");
      if (who) li.append(el("br"), el("span", `top offenders: ${who}`, {class: "offenders"}));
      ul.append(li);
    }
    banner.append(ul);
  }
  document.getElementById("banner").replaceWith(banner);
}

function drawSide(s, ns) {
  const side = document.getElementById("side");
  const parts = [table("resets", "Resets", ["dir", "state", "kernel reason", "rate", "total"],
    s.resets.map((r) => [r.direction, r.state, r.reason, rateText(r.rate), r.total]), "No resets since start.")];
  for (const [group, series] of Object.entries(s.counters)) {
    parts.push(table(`counter-${group}`, TITLES[group] || group, ["", "rate", "total"],
      series.map((c) => [c.label, rateText(c.rate), c.total]), "none"));
  }
  const drawn = new Set([...document.querySelectorAll("g.edge[id]")].map((g) => g.id));
  parts.push(table("other-transitions", "Transitions not in the figure", ["", "rate", "total"],
    s.transitions.filter((t) => !drawn.has(`e-${t.from}-${t.to}`))
      .map((t) => [`${t.from} → ${t.to}`, rateText(t.rate), t.total]), "none"));
  parts.push(table("time-wait", "TIME_WAIT by port", ["side", "port", "sockets"],
    ns ? ns.time_wait.top_ports.map((p) => [p.side, p.port, p.time_wait]) : [], "none"));
  const kernel = el("section", undefined, {id: "kernel"});
  const p = el("p", `Linux ${s.kernel.release}, tcp_send_reset layout ${s.kernel.send_reset_layout}. Filters: `);
  p.append(el("span", s.filters.text, {id: "filters"}), ".");
  kernel.append(el("h2", "Kernel and filters"), p, table("signals", "Tracepoints",
    ["signal", "status", "source or why missing"],
    s.kernel.signals.map((g) => [g.name, g.source ? "attached" : "DEGRADED", g.source || g.missing]), "none"));
  parts.push(kernel);
  side.replaceChildren(...parts);
}

function drawNetns(s) {
  for (const a of document.querySelectorAll("#netns a")) {
    if (a.dataset.netns === netns) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

function draw(s) {
  const ns = s.namespaces.find((n) => n.netns === netns) || null;
  const asof = document.getElementById("asof");
  asof.textContent = s.window.end === null ? "no counter read yet"
    : `rates over the ${s.window.seconds.toFixed(1)} s to ${new Date(s.window.end * 1000).toISOString().slice(11, 19)} UTC`;
  asof.dataset.start = String(s.window.start);
  asof.dataset.end = String(s.window.end);
  drawEdges(s);
  drawNodes(s, ns);
  drawBanner(s);
  drawSide(s, ns);
  drawNetns(s);
  document.body.dataset.updated = String(s.time);
}

async function poll() {
  try {
    const resp = await fetch("/api/v1/summary", {cache: "no-store", credentials: "same-origin"});
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    last = await resp.json();
    draw(last);
    document.body.classList.remove("stale");
  } catch (err) {
    // The daemon restarting is no page error: show the numbers as stale and try again.
    document.body.classList.add("stale");
  }
}

document.addEventListener("click", (ev) => {
  const a = ev.target.closest("#netns a");
  if (!a) return;
  ev.preventDefault();
  netns = a.dataset.netns;
  history.replaceState(null, "", a.getAttribute("href"));
  if (last) draw(last);
});

poll();
setInterval(poll, 1000 * Number(document.body.dataset.refresh || 2));
