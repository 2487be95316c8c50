"""The Grafana dashboard deploy/grafana/tcpstate.json: layout, datasource, variables, and only documented metrics."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/tcpstate.json"
DS = {"type": "prometheus", "uid": "${datasource}"}

# Variables Grafana defines itself; anything else a query uses must be a template variable.
BUILTINS = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms", "__all",
            "__dashboard", "__from", "__to"}
# Prometheus makes `up` for every target; the README's alert rules scrape tcpstate as job="tcpstate".
NOT_FROM_TCPSTATE = {"up"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}
VAR_RE = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict) -> list[dict]:
    """Every panel, collapsed rows' children included."""
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def queries(dash: dict) -> list[tuple[str, str]]:
    """(where, expr) for every PromQL expression the dashboard sends: panel targets and annotations."""
    out = [(f"panel {p['id']} '{p['title']}' target {t['refId']}", t["expr"])
           for p in panels(dash) if p["type"] != "row" for t in p["targets"]]
    out += [(f"annotation '{a['name']}'", a["expr"]) for a in dash["annotations"]["list"] if "expr" in a]
    return out


def variable_query(var: dict) -> str:
    q = var["query"]
    return q["query"] if isinstance(q, dict) else q


def used_variables(text: str) -> set[str]:
    return {a or b or c for a, b, c in VAR_RE.findall(text)}


def substitute(expr: str, values: dict[str, str]) -> str:
    """The expression as Grafana sends it; values: variable name -> text. An unknown variable is an error."""
    def one(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return values[name]

    return VAR_RE.sub(one, expr)


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: what is left once strings, label matchers, ranges, grouping
    label lists, function names and keywords are taken out."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", s):
        if s[m.end():].lstrip().startswith("(") or m.group(0).lower() in PROMQL_WORDS:
            continue
        names.add(m.group(0))
    return names


def label_values_metric(query: str) -> str:
    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
    assert m, f"not a label_values(metric, label) query: {query}"
    return m.group(1)


def documented_metrics() -> dict[str, str]:
    """Metric name -> type, from the first column of the README's tables."""
    out = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if not line.startswith("|") or len(cells) < 3:
            continue
        for name in re.findall(r"`(tcpstate_[a-z0-9_]+)(?:\{[a-z_,]*\})?`", cells[1]):
            out[name] = cells[2]
    return out


def dashboard_metrics(dash: dict) -> set[str]:
    names = set()
    for _, expr in queries(dash):
        names |= metric_names(expr)
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            names |= metric_names(label_values_metric(variable_query(var)))
    return names


def test_metric_names_are_found_in_promql():
    expr = ('sum by (le, instance) (rate(tcpstate_a_bucket{x=~"$i", y="by(z)"}[$__rate_interval])) / on (netns) '
            'group_left (w) tcpstate_b > 1e-9 and histogram_quantile(0.5, c) or up{job="tcpstate"}')
    assert metric_names(expr) == {"tcpstate_a_bucket", "tcpstate_b", "c", "up"}


def test_panel_ids_are_unique_and_every_query_panel_uses_the_datasource_variable():
    dash = load()
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    query_panels = [p for p in panels(dash) if p["type"] != "row"]
    assert query_panels
    for p in query_panels:
        where = f"panel {p['id']} '{p['title']}'"
        assert p["datasource"] == DS, where
        assert p["targets"], f"{where} has no target"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), where
        for t in p["targets"]:
            assert t.get("datasource", DS) == DS, where
            assert t["expr"].strip(), f"{where} target {t['refId']} has no expr"


def test_every_panel_has_a_description_and_a_unit():
    for p in panels(load()):
        if p["type"] == "row":
            continue
        where = f"panel {p['id']} '{p['title']}'"
        assert len(p.get("description", "")) > 40, f"{where}: say what it means and what to do"
        if p["type"] in ("timeseries", "stat", "bargauge"):
            assert p["fieldConfig"]["defaults"].get("unit"), f"{where} has no unit"


def test_grid_is_24_columns_wide_and_nothing_overlaps():
    boxes = []
    for p in panels(load()):
        g = p["gridPos"]
        where = f"panel {p['id']} '{p['title']}'"
        assert g["x"] >= 0 and g["y"] >= 0 and g["w"] >= 1 and g["h"] >= 1, where
        assert g["x"] + g["w"] <= 24, f"{where} ends at column {g['x'] + g['w']}"
        boxes.append((where, g))
    for (a, ga), (b, gb) in itertools.combinations(boxes, 2):
        apart = (ga["x"] + ga["w"] <= gb["x"] or gb["x"] + gb["w"] <= ga["x"]
                 or ga["y"] + ga["h"] <= gb["y"] or gb["y"] + gb["h"] <= ga["y"])
        assert apart, f"{a} overlaps {b}"


def test_rows_hold_the_panels_that_follow_them():
    """Grafana puts an expanded row's panels after it in the list, below it and above the next row."""
    top = load()["panels"]
    rows = [i for i, p in enumerate(top) if p["type"] == "row"]
    assert rows and rows[0] == 0, "the dashboard starts with a row"
    for n, i in enumerate(rows):
        end = rows[n + 1] if n + 1 < len(rows) else len(top)
        row = top[i]
        assert not row["collapsed"] and row["panels"] == [] and end - i > 1, row["title"]
        ceiling = top[end]["gridPos"]["y"] if end < len(top) else float("inf")
        for p in top[i + 1:end]:
            assert row["gridPos"]["y"] < p["gridPos"]["y"] and p["gridPos"]["y"] + p["gridPos"]["h"] <= ceiling, \
                f"panel {p['id']} '{p['title']}' is not inside row '{row['title']}'"


def test_variables():
    dash = load()
    assert 38 <= dash["schemaVersion"] <= 41  # Grafana 10.0 to 11.x
    assert dash["id"] is None and dash["uid"]
    by_name = {v["name"]: v for v in dash["templating"]["list"]}
    assert by_name["datasource"]["type"] == "datasource" and by_name["datasource"]["query"] == "prometheus"
    assert variable_query(by_name["instance"]) == "label_values(tcpstate_build_info, instance)"
    assert label_values_metric(variable_query(by_name["netns"])).startswith("tcpstate_sockets")
    for name in ("instance", "netns"):
        v = by_name[name]
        assert v["type"] == "query" and v["datasource"] == DS and v["multi"] and v["includeAll"], name
        # "All" sends this regex, which also matches the daemon's own namespace (netns="", not a listed value).
        assert v["allValue"] == ".*", name


def test_every_variable_used_is_defined():
    dash = load()
    defined = {v["name"] for v in dash["templating"]["list"]} | BUILTINS
    texts = [expr for _, expr in queries(dash)]
    texts += [variable_query(v) for v in dash["templating"]["list"] if v["type"] == "query"]
    texts += [json.dumps(p.get("datasource")) for p in panels(dash)]
    texts += [t.get("legendFormat", "") for p in panels(dash) for t in p.get("targets", [])]
    used = set().union(*(used_variables(t) for t in texts))
    assert {"datasource", "instance", "netns", "__rate_interval"} <= used
    assert used <= defined, used - defined


def test_rates_use_grafana_windows():
    """A fixed window is too short at long time ranges or shorter than two scrapes at short ones."""
    for where, expr in queries(load()):
        for window in re.findall(r"\b(?:rate|increase|irate|changes)\([^\[]*\[([^\]]+)\]", expr):
            assert window in ("$__rate_interval", "$__range"), f"{where}: [{window}]"


def test_heatmaps_read_histogram_buckets():
    heatmaps = [p for p in panels(load()) if p["type"] == "heatmap"]
    assert {p["title"] for p in heatmaps} == {"Handshake duration", "Connection lifetime"}
    for p in heatmaps:
        (t,) = p["targets"]
        assert t["format"] == "heatmap" and t["legendFormat"] == "{{le}}" and "by (le)" in t["expr"]
        assert all(n.endswith("_bucket") for n in metric_names(t["expr"]))
        assert p["options"]["calculate"] is False


def test_every_metric_is_documented():
    documented = documented_metrics()
    assert "tcpstate_anomaly_active" in documented and "tcpstate_kernel_tcp_listen_drops_total" in documented
    used = dashboard_metrics(load())
    assert used
    for name in sorted(used - NOT_FROM_TCPSTATE):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        ok = name in documented or (base != name and documented.get(base) == "histogram")
        assert ok, f"{name} is not in the README's metric tables"


@pytest.mark.parametrize("section", ["Anomalies", "Resets", "Sockets now", "Ephemeral ports", "tcpstate health"])
def test_rows_exist(section):
    assert section in {p["title"] for p in load()["panels"] if p["type"] == "row"}
