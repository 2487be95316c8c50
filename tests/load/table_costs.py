#!/usr/bin/env python3
"""table_costs.py: what each in-kernel table costs per program run, by running tests/load/overhead.sh with it turned off.

Usage: sudo make bench-tables [TABLES_ARGS="--seconds 4 --rounds 3"], or
sudo .venv/bin/python tests/load/table_costs.py (root; click comes from the project's .venv)

Each round runs overhead.sh once per variant, in turn (the machine's noise drifts within a run, so
the variants alternate rather than run one after another). A table's cost is the default's mean
ns per run over all programs minus that of the variant without it; the socket table cannot be
turned off (the histograms, early resets and failure causes need it), so it is measured by size.
Traffic and namespaces are overhead.sh's own (198.19.0.0/24, bounded in time).
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[2]
OVERHEAD = ROOT / "tests" / "load" / "overhead.sh"
# (label, tcpstate run flags): the default first, then one table off (or resized) at a time.
VARIANTS = (
    ("default", ""),
    ("no port-reuse table (--recent-closes 0)", "--recent-closes 0"),
    ("no offenders table (--max-offenders 0)", "--max-offenders 0"),
    ("neither", "--recent-closes 0 --max-offenders 0"),
    ("socket table at 1024 (--max-sockets 1024)", "--max-sockets 1024"),
    # Not a table: the tracepoints' records instead of raw tracepoints. Its ns/run leaves out what the
    # kernel spends filling each record, which the raw programs' own reads of the socket replace: its
    # ratio to no monitor is the comparable number.
    ("tracepoint records, not raw tracepoints (--no-raw-tracepoints)", "--no-raw-tracepoints"),
)
PROGRAM_LINE = re.compile(r"^\s+(\S.*?)\s+(\d+) ns/run\s+([\d.]+) runs/conn$", re.M)
ROUND_LINE = re.compile(r"^round \d+: no monitor ([\d.]+)/s, tcpstate ([\d.]+)/s", re.M)


def parse_overhead(out: str) -> dict:
    """One overhead.sh round: {"programs": {name: (ns_per_run, runs_per_conn)}, "ratio": tcpstate / none}."""
    programs = {m[1]: (float(m[2]), float(m[3])) for m in PROGRAM_LINE.finditer(out)}
    m = ROUND_LINE.search(out)
    if not programs or not m:
        raise ValueError(f"no overhead.sh round in {out[-300:]!r}")
    return {"programs": programs, "ratio": float(m[2]) / float(m[1])}


def summarize(results: dict) -> list[tuple]:
    """Per variant: (label, median ns/run over all programs, its difference to the default's, the
    difference per connection in ns, median ratio to no monitor)."""
    def med(rounds, key):
        return statistics.median(r["programs"]["all programs"][key] for r in rounds)

    base = med(results["default"], 0)
    rows = []
    for label, _ in VARIANTS:
        rounds = results.get(label)
        if not rounds:
            continue
        ns, per_conn = med(rounds, 0), med(rounds, 1)
        rows.append((label, ns, ns - base, (ns - base) * per_conn,
                     statistics.median(r["ratio"] for r in rounds)))
    return rows


def render(rows: list[tuple]) -> str:
    lines = ["| variant | ns/run, all programs | vs default | per connection | ratio to no monitor |",
             "|---|---:|---:|---:|---:|"]
    for label, ns, diff, per_conn, ratio in rows:
        lines.append(f"| {label} | {ns:.0f} | {diff:+.0f} | {per_conn:+.0f} ns | {ratio:.3f} |")
    return "\n".join(lines)


@click.command(epilog="Example: sudo .venv/bin/python tests/load/table_costs.py --seconds 4 --rounds 2")
@click.option("--seconds", default=4, show_default=True, help="Churn per run.")
@click.option("--rounds", default=3, show_default=True, help="Rounds; each runs every variant once.")
def main(seconds: int, rounds: int) -> None:
    """Measure what each in-kernel table costs per program run (see the module's docstring)."""
    if os.geteuid() != 0:
        raise click.ClickException("needs root (namespaces, bpf_stats)")
    results: dict[str, list] = {}
    for rnd in range(1, rounds + 1):
        for label, flags in VARIANTS:
            proc = subprocess.run(["bash", str(OVERHEAD), str(seconds), "1"], capture_output=True, text=True,
                                  env=dict(os.environ, TCPSTATE_ARGS=flags), cwd=ROOT, timeout=300)
            if proc.returncode != 0:
                raise click.ClickException(f"overhead.sh {flags or '(defaults)'} failed: {proc.stderr.strip()[-300:]}")
            r = parse_overhead(proc.stdout)
            results.setdefault(label, []).append(r)
            click.echo(f"round {rnd} {label}: {r['programs']['all programs'][0]:.0f} ns/run, "
                       f"ratio {r['ratio']:.3f}", err=True)
    click.echo(render(summarize(results)))


if __name__ == "__main__":
    sys.exit(main())
