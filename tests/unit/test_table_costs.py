"""tests/load/table_costs.py without a machine: overhead.sh's output parsed, each table's cost worked out."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "load"))
import table_costs  # noqa: E402


def overhead_out(set_state, destroy, all_ns, none=40000, mon=36000):
    """One round of overhead.sh, as its printf and awk write it."""
    return (f"round 1: no monitor {none}/s, tcpstate {mon}/s; made 180000, counted active opens 180000, "
            "events lost 0\n"
            f"  {'sock:inet_sock_set_state':<28} {set_state:7d} ns/run  10.00 runs/conn\n"
            f"  {'tcp:tcp_destroy_sock':<28} {destroy:7d} ns/run   2.00 runs/conn\n"
            f"  {'all programs':<28} {all_ns:7d} ns/run  12.00 runs/conn\n"
            f"median: no monitor {none}/s, tcpstate {mon}/s, ratio {mon / none:.3f}\n")


def test_one_round_of_overhead_sh():
    r = table_costs.parse_overhead(overhead_out(480, 350, 458))
    assert r["programs"] == {"sock:inet_sock_set_state": (480.0, 10.0), "tcp:tcp_destroy_sock": (350.0, 2.0),
                             "all programs": (458.0, 12.0)}
    assert r["ratio"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="no overhead.sh round"):
        table_costs.parse_overhead("setup-host: ready\n")


def test_a_tables_cost_is_the_default_minus_the_variant_without_it():
    results = {
        "default": [table_costs.parse_overhead(overhead_out(480, 350, n)) for n in (450, 470, 460)],
        "no port-reuse table (--recent-closes 0)": [
            table_costs.parse_overhead(overhead_out(400, 350, n, mon=37000)) for n in (400, 390, 420)],
    }
    rows = table_costs.summarize(results)
    assert [r[0] for r in rows] == ["default", "no port-reuse table (--recent-closes 0)"]
    label, ns, diff, per_conn, ratio = rows[1]
    assert (ns, diff, per_conn) == (400, -60, -720)  # medians 400 and 460; 12 runs per connection
    assert ratio == pytest.approx(0.925)
    text = table_costs.render(rows)
    assert "| no port-reuse table (--recent-closes 0) | 400 | -60 | -720 ns | 0.925 |" in text
    assert "| default | 460 | +0 | +0 ns | 0.900 |" in text
