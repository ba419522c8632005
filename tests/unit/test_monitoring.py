"""Alerts and dashboard: promtool checks them, synthetic series fire them, METRICS.md bounds them.

promtool comes from the Debian `prometheus` package (`make` installs it); without it these
tests fail, never skip.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import load_generate

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
FILES = ROOT / "charts" / "rlhf-operator" / "files"
RULES = FILES / "prometheus-rules.yaml"
DASHBOARD = FILES / "dashboard.json"
ENGINE_METRICS = FILES / "engine-metrics.txt"
METRICS_DOC = ROOT / "docs" / "METRICS.md"
ALERTS = {
    "RLHFRunStalled",
    "RLHFStageFailed",
    "RLHFKLTooHigh",
    "RLHFRewardCollapse",
    "RLHFRolloutServerDown",
    "RLHFEnvironmentDown",
    "RLHFWeightSyncParityFailure",
}
Obj = dict[str, Any]


generate = load_generate()


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install the Debian package `prometheus` (make does)")
    return path


def run_promtool(promtool: str, *args: str, cwd: Path) -> str:
    proc = subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def rendered_groups(prometheus_rule: Obj | None = None) -> list[Obj]:
    values = {"monitoring": {"prometheusRule": {"enabled": True, **(prometheus_rule or {})}}}
    [rule] = generate.render_chart(values)["prometheusrule.yaml"]
    groups: list[Obj] = rule["spec"]["groups"]
    return groups


def alerts(groups: list[Obj]) -> dict[str, Obj]:
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


# --- the metrics contract ------------------------------------------------------------------

def contract_names() -> set[str]:
    """Series names allowed in PromQL: docs/METRICS.md tables plus engine-metrics.txt.

    Counters are listed with their _total suffix; histograms by family, so their
    _bucket, _sum and _count series are allowed.
    """
    families: dict[str, str] = {}
    for line in METRICS_DOC.read_text().splitlines():
        match = re.match(r"^\|\s*`([a-zA-Z_:][\w:]*)`\s*\|\s*(\w+)", line)
        if match:
            families[match.group(1)] = match.group(2)
    assert len(families) >= 15, "METRICS.md tables not found"
    for line in ENGINE_METRICS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, kind = line.split()
            families[name] = kind
    names = set()
    for name, kind in families.items():
        names.add(name)
        if kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
    return names


_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.:$])[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without", "on",
             "ignoring", "group_left", "group_right"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (identifiers that are not functions)."""
    text = _STRINGS.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        if match.group().lower() in _KEYWORDS or text[match.end():].lstrip().startswith("("):
            continue
        names.add(match.group())
    return names


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, run) (rate(vllm:e2e_request_latency_seconds_bucket'
        '{run=~"$run", a="b{c}"}[5m] offset 15m))) / on (run) group_left max(up) > 1e-3'
    )
    assert metric_names(expr) == {"vllm:e2e_request_latency_seconds_bucket", "up"}
    assert metric_names("time() - max by (a) (x_seconds) > bool 900") == {"x_seconds"}


def test_engine_metrics_file_covers_the_contract() -> None:
    listed = contract_names()
    serving = METRICS_DOC.read_text().split("## Serving", 1)[1]
    for name in re.findall(r"`((?:vllm|lmdeploy):[\w:]+)`", serving):
        assert name in listed, f"{name} (METRICS.md) is missing from engine-metrics.txt"
    for line in ENGINE_METRICS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, kind = line.split()
            assert kind in ("gauge", "counter", "histogram"), line
            assert kind != "counter" or name.endswith("_total"), line


# --- alerts --------------------------------------------------------------------------------

def test_rules_file_passes_promtool_check(promtool: str) -> None:
    out = run_promtool(promtool, "check", "rules", str(RULES), cwd=ROOT)
    assert f"{len(ALERTS)} rules found" in out


def test_rules_file_has_every_alert_with_labels_and_text() -> None:
    found = alerts(yaml.safe_load(RULES.read_text())["groups"])
    assert set(found) == ALERTS
    for name, rule in found.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert metric_names(rule["expr"]) <= contract_names(), name


def test_default_values_render_the_rules_file() -> None:
    assert rendered_groups() == yaml.safe_load(RULES.read_text())["groups"]


def test_thresholds_and_durations_come_from_values(promtool: str, tmp_path: Path) -> None:
    groups = rendered_groups(
        {"stalledMinutes": 30, "stalledFor": "15m", "klThreshold": 2.5, "klFor": "1h",
         "rewardDropStddevs": 1.5, "serverDownFor": "20m", "environmentDownFor": "2m"}
    )
    found = alerts(groups)
    assert found["RLHFRunStalled"]["expr"].endswith("> 1800")
    assert found["RLHFRunStalled"]["for"] == "15m"
    assert found["RLHFKLTooHigh"]["expr"].endswith("> 2.5")
    assert found["RLHFKLTooHigh"]["for"] == "1h"
    assert found["RLHFRewardCollapse"]["expr"].endswith("> 1.5")
    assert found["RLHFRolloutServerDown"]["for"] == "20m"
    assert found["RLHFEnvironmentDown"]["for"] == "2m"
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    run_promtool(promtool, "check", "rules", str(path), cwd=tmp_path)


def fill(template: str, labels: dict[str, str], value: str) -> str:
    """Expand the annotation templates the rules use, to state what promtool must produce."""
    out = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], template)
    out = re.sub(r"\{\{ \$value \| [^}]+ \}\}", value, out)
    assert "{{" not in out, f"annotation uses a template construct this test does not expand: {out}"
    return out


def expect(rule: Obj, labels: dict[str, str], value: str = "") -> Obj:
    """promtool's exp_alerts entry: the rule's own labels, and its annotations filled in."""
    return {
        "exp_labels": {**rule["labels"], **labels},
        "exp_annotations": {k: fill(v, labels, value) for k, v in rule["annotations"].items()},
    }


def alert_cases(rules: dict[str, Obj]) -> list[Obj]:
    """One promtool test group per alert: an unhealthy series that fires it and a healthy
    one that must not, checked before the alert is due, while it fires, and (where the
    trouble ends) after."""

    def case(alert: str, series: list[tuple[str, str]], evals: list[tuple[str, list[Obj]]]) -> Obj:
        return {
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in series],
            "alert_rule_test": [
                {"eval_time": t, "alertname": alert, "exp_alerts": exp} for t, exp in evals
            ],
        }

    ml = {"namespace": "ml"}
    stalled = {**ml, "run": "stalled", "stage": "ppo"}
    failed = {**ml, "run": "broken", "stage": "rm"}
    drifting = {**ml, "run": "drifting", "stage": "ppo"}
    collapsing = {**ml, "run": "collapsing", "stage": "grpo"}
    down = {**ml, "run": "r1", "component": "rollout", "pod": "r1-ppo-rollout-0"}
    desynced = {**ml, "run": "desynced", "stage": "ppo"}
    env_down = {**ml, "run": "r2", "stage": "grpo", "pod": "r2-grpo-env-0-abc"}
    return [
        case(
            "RLHFRunStalled",
            [
                # The last step happened at t=0; the healthy run steps every minute.
                ('rlhf_trainer_last_step_timestamp_seconds{namespace="ml", pod="stalled-0", '
                 'run="stalled", stage="ppo"}', "0x40"),
                ('rlhf_trainer_last_step_timestamp_seconds{namespace="ml", pod="healthy-0", '
                 'run="healthy", stage="ppo"}', "0+60x40"),
            ],
            [("10m", []), ("19m", []),
             ("25m", [expect(rules["RLHFRunStalled"], stalled, "25m 0s")])],
        ),
        case(
            "RLHFStageFailed",
            [
                ('rlhf_run_stage_phase{namespace="ml", run="broken", stage="rm", '
                 'phase="Failed", pod="operator"}', "0x5 1x30"),
                ('rlhf_run_stage_phase{namespace="ml", run="broken", stage="rm", '
                 'phase="Running", pod="operator"}', "1x5 0x30"),
                ('rlhf_run_stage_phase{namespace="ml", run="fine", stage="rm", '
                 'phase="Failed", pod="operator"}', "0x35"),
                ('rlhf_run_stage_phase{namespace="ml", run="fine", stage="rm", '
                 'phase="Running", pod="operator"}', "1x35"),
            ],
            [("3m", []), ("15m", [expect(rules["RLHFStageFailed"], failed)])],
        ),
        case(
            "RLHFKLTooHigh",
            [
                ('rlhf_trainer_kl{namespace="ml", pod="drifting-0", run="drifting", '
                 'stage="ppo"}', "0.1+0.1x30"),
                ('rlhf_trainer_kl{namespace="ml", pod="steady-0", run="steady", stage="ppo"}',
                 "0.05x30"),
            ],
            [("5m", []), ("15m", []),
             ("25m", [expect(rules["RLHFKLTooHigh"], drifting, "2.6")])],
        ),
        case(
            "RLHFRewardCollapse",
            [
                # Mean reward 1 for an hour, a gap, then -1: a drop of 2 at a std of 0.5.
                ('rlhf_trainer_reward_mean{namespace="ml", pod="c-0", run="collapsing", '
                 'stage="grpo", kind="raw"}', "1x60 _x14 -1x45"),
                ('rlhf_trainer_reward_std{namespace="ml", pod="c-0", run="collapsing", '
                 'stage="grpo", kind="raw"}', "0.5x120"),
                # A slowly improving run, and a scaled series that must be ignored.
                ('rlhf_trainer_reward_mean{namespace="ml", pod="i-0", run="improving", '
                 'stage="grpo", kind="raw"}', "0+0.01x120"),
                ('rlhf_trainer_reward_std{namespace="ml", pod="i-0", run="improving", '
                 'stage="grpo", kind="raw"}', "0.5x120"),
                ('rlhf_trainer_reward_mean{namespace="ml", pod="i-0", run="improving", '
                 'stage="grpo", kind="scaled"}', "5-0.1x120"),
            ],
            [("60m", []), ("89m", [expect(rules["RLHFRewardCollapse"], collapsing, "4")])],
        ),
        case(
            "RLHFRolloutServerDown",
            [
                ('up{namespace="ml", run="r1", component="rollout", pod="r1-ppo-rollout-0"}',
                 "1x5 0x20 1x20"),
                ('up{namespace="ml", run="r1", component="judge", pod="r1-judge-0"}', "1x45"),
                # Trainers failing a scrape are RLHFRunStalled's business, not this alert's.
                ('up{namespace="ml", run="r1", stage="ppo", component="trainer", '
                 'pod="r1-ppo-master-0"}', "0x45"),
            ],
            [("10m", []), ("20m", [expect(rules["RLHFRolloutServerDown"], down)]),
             ("40m", [])],
        ),
        case(
            "RLHFEnvironmentDown",
            [
                ('up{namespace="ml", run="r2", stage="grpo", component="environment", '
                 'pod="r2-grpo-env-0-abc"}', "1x5 0x10 1x20"),
                ('up{namespace="ml", run="r2", stage="grpo", component="environment", '
                 'pod="r2-grpo-env-1-def"}', "1x35"),
                # A rollout server down is RLHFRolloutServerDown's business.
                ('up{namespace="ml", run="r2", stage="grpo", component="rollout", '
                 'pod="r2-grpo-rollout-0-ghi"}', "0x35"),
            ],
            [("7m", []), ("13m", [expect(rules["RLHFEnvironmentDown"], env_down)]),
             ("30m", [])],
        ),
        case(
            "RLHFWeightSyncParityFailure",
            [
                ('rlhf_trainer_weight_sync_parity_failures_total{namespace="ml", pod="d-0", '
                 'run="desynced", stage="ppo"}', "0x10 1x30"),
                ('rlhf_trainer_weight_sync_parity_failures_total{namespace="ml", pod="s-0", '
                 'run="synced", stage="ppo"}', "0x40"),
            ],
            [("5m", []),
             ("15m", [expect(rules["RLHFWeightSyncParityFailure"], desynced)]),
             ("40m", [])],
        ),
    ]


def test_each_alert_fires_on_trouble_and_stays_quiet_otherwise(
    promtool: str, tmp_path: Path
) -> None:
    groups = rendered_groups()
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    cases = alert_cases(alerts(groups))
    tested = {t["alertname"] for c in cases for t in c["alert_rule_test"]}
    assert tested == ALERTS
    for c in cases:
        results = [t["exp_alerts"] for t in c["alert_rule_test"]]
        assert any(results) and [] in results, "each alert needs a firing and a silent check"
    spec = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": cases}
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    out = run_promtool(promtool, "test", "rules", "tests.yaml", cwd=tmp_path)
    assert "SUCCESS" in out


def test_a_wrong_expectation_fails(promtool: str, tmp_path: Path) -> None:
    """The harness itself: promtool must reject an alert expected where none fires."""
    groups = rendered_groups()
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    [stalled, *_] = alert_cases(alerts(groups))
    wrong = copy.deepcopy(stalled)
    wrong["alert_rule_test"][0]["exp_alerts"] = wrong["alert_rule_test"][-1]["exp_alerts"]
    spec = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [wrong]}
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = subprocess.run([promtool, "test", "rules", "tests.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "FAILED" in proc.stdout + proc.stderr


# --- dashboard -----------------------------------------------------------------------------

GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$namespace": ".*",
    "$run": ".*",
}


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable's selector."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert match, f"variable {variable['name']}: unexpected query {query}"
            out.append((f"variable {variable['name']}", match.group(1)))
    return out


def substitute(expr: str) -> str:
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("runs", "stage", "reward", "kl", "loss", "throughput", "vllm", "lmdeploy"):
        assert topic in titles, f"no panel about {topic}"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    exprs = dashboard_exprs()
    rules = [{"record": f"dashboard:query_{i}:check", "expr": substitute(expr)}
             for i, (_, expr) in enumerate(exprs)]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run_promtool(promtool, "check", "rules", str(path), cwd=tmp_path)
    assert f"{len(rules)} rules found" in out


def test_dashboard_uses_only_contract_metrics() -> None:
    allowed = contract_names()
    used: set[str] = set()
    for where, expr in dashboard_exprs():
        names = metric_names(substitute(expr))
        assert names, f"{where}: no metric in {expr}"
        assert names <= allowed, f"{where}: {sorted(names - allowed)} not in docs/METRICS.md"
        used |= names
    for family in ("rlhf_trainer_reward_mean", "rlhf_trainer_kl", "rlhf_trainer_loss",
                   "rlhf_trainer_tokens_per_second", "rlhf_run_stage_phase", "rlhf_runs"):
        assert family in used, f"the dashboard does not show {family}"
    assert any(n.startswith("vllm:") for n in used)
    assert any(n.startswith("lmdeploy:") for n in used)
