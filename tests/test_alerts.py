"""The alert rules can fire: `promtool test rules` on synthetic series for every alert, each with a
case that pages and one that stays quiet, and the error-ratio rule counts exactly the outcomes the
service emits for 5xx answers."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from service.api.errors import _TYPES, error_type
from tests.deploy_tools import ROOT, required_tool

RULES_DIR = ROOT / "deploy" / "prometheus"
RULES = RULES_DIR / "alert_rules.yaml"
RULE_TESTS = RULES_DIR / "alert_rules_test.yaml"


def promtool(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([required_tool("promtool"), *map(str, args)], check=False, capture_output=True, text=True)


def alerts() -> dict[str, dict]:
    return {rule["alert"]: rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}


def test_rules_are_valid_and_their_unit_tests_pass() -> None:
    checked = promtool("check", "rules", RULES)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", RULE_TESTS)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    for name in alerts():
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in mine), f"{name} is never shown to fire"
        assert any(not case["exp_alerts"] for case in mine), f"{name} is never shown to stay quiet"
    assert {"SteerHighErrorRatio", "SteerHighP95Latency", "SteerSaeFvuDrift", "SteerNoReadyReplicas",
            "SteerVllmEngineDown"} <= set(alerts())


def test_unit_tests_catch_a_rule_that_cannot_fire(tmp_path: Path) -> None:
    """The old rule matched outcome="server_error", which the service never emits: promtool must fail it."""
    broken = RULES.read_text().replace('outcome=~"api_error|service_unavailable|timeout_error"',
                                       'outcome="server_error"')
    assert broken != RULES.read_text()
    (tmp_path / RULES.name).write_text(broken)
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    result = promtool("test", "rules", tmp_path / RULE_TESTS.name)
    assert result.returncode != 0 and "SteerHighErrorRatio" in result.stdout + result.stderr


def test_error_ratio_counts_exactly_the_5xx_outcomes() -> None:
    """`outcome` is errors.error_type(status) (service/api/guard.py); the rule's set is the 5xx ones,
    and no 4xx status the service maps shares a name with them."""
    expr = alerts()["SteerHighErrorRatio"]["expr"]
    (pattern,) = re.findall(r'outcome=~"([^"]+)"', expr)
    server = {error_type(status) for status in range(500, 600)}
    assert set(pattern.split("|")) == server
    assert not {error_type(status) for status in _TYPES if status < 500} & server
    dashboard = (ROOT / "deploy" / "grafana" / "vlm-steer-dashboard.json").read_text()
    assert f'outcome=~\\"{pattern}\\"' in dashboard, "the dashboard's error ratio must count the same outcomes"
