"""The alert rules of deploy/prometheus/alerts.yml, checked and unit-tested by Debian's promtool."""

import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy/prometheus/alerts.yml"
TESTS = ROOT / "tests/prometheus/alerts_test.yml"


def promtool():
    path = shutil.which("promtool")
    assert path, "promtool missing: make setup installs Debian's prometheus package"
    return path


def test_rules_are_valid():
    res = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_rules_pass_their_unit_tests():
    res = subprocess.run([promtool(), "test", "rules", TESTS.name], cwd=TESTS.parent, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_every_alert_is_tested_and_documented():
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    tested = {t["alertname"] for case in yaml.safe_load(TESTS.read_text())["tests"] for t in case["alert_rule_test"]}
    readme = (ROOT / "README.md").read_text()
    for rule in rules:
        name = rule["alert"]
        assert name in tested, f"{name} has no promtool test"
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), name
        anchor = rule["annotations"]["runbook"].split("#")[1]
        headings = {line[5:].strip().lower() for line in readme.splitlines() if line.startswith("#### ")}
        assert anchor in headings, f"README has no runbook heading for {name} (#{anchor})"
        assert rule["labels"]["severity"] in ("warning", "critical")
