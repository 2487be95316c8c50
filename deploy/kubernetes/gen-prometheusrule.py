#!/usr/bin/env python3
"""gen-prometheusrule.py: write deploy/kubernetes/prometheusrule.yaml from deploy/prometheus/alerts.yml, so both carry the same rules."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
OUTPUT = HERE / "prometheusrule.yaml"

HEADER = ("# prometheusrule.yaml: generated from deploy/prometheus/alerts.yml by "
          "deploy/kubernetes/gen-prometheusrule.py; do not edit.\n")

METADATA = {
    "name": "tcpstate",
    "namespace": "tcpstate",
    "labels": {
        "app.kubernetes.io/name": "tcpstate",
        "app.kubernetes.io/part-of": "tcpstate",
        # Like the ServiceMonitor's: the label a Prometheus' ruleSelector looks for (adapt it).
        "release": "kube-prometheus-stack",
    },
}


class Dumper(yaml.SafeDumper):
    """Multi-line strings (the longer PromQL expressions) as literal blocks, as alerts.yml has them."""


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


Dumper.add_representer(str, _str)


def render(alerts_text: str) -> str:
    doc = yaml.safe_load(alerts_text)
    if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list):
        raise ValueError("no top-level 'groups' list")
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": METADATA,
        "spec": {"groups": doc["groups"]},
    }
    body = yaml.dump(rule, Dumper=Dumper, sort_keys=False, default_flow_style=False, width=120,
                     allow_unicode=True)
    # The groups must come back unchanged, or the two files would alert differently.
    if yaml.safe_load(body)["spec"]["groups"] != doc["groups"]:
        raise ValueError("the rules did not survive the round trip through YAML")
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split(": ", 1)[1])
    parser.add_argument("--alerts", type=Path, default=ALERTS, help=f"rules to read (default {ALERTS.relative_to(ROOT)})")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"file to write (default {OUTPUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    try:
        text = render(args.alerts.read_text())
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"gen-prometheusrule: {args.alerts}: {exc}".replace("\n", " "), file=sys.stderr)
        return 1
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
