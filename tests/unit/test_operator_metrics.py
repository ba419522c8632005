"""Operator metrics: exact exposition, bounded cardinality, reconcile timing, the HTTP endpoint,
and how the local executor and builders wire them up."""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import make_run
from rlhf_operator import api, builders
from rlhf_operator.local import LocalExecutor
from rlhf_operator.metrics import PHASES, RunMetrics, port_from_env

pytestmark = pytest.mark.unit

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(metrics: RunMetrics) -> Samples:
    """Every sample of a scrape, keyed by (name, sorted labels)."""
    out: Samples = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def running_status() -> api.RunStatus:
    return api.RunStatus(
        phase="Running",
        current_stage="sft2",
        stages=[
            api.StageStatus(
                name="sft",
                type="sft",
                phase="Succeeded",
                metrics=api.StageMetrics(step=60, total_steps=60, loss=0.3),
            ),
            api.StageStatus(
                name="sft2",
                type="sft",
                phase="Running",
                metrics=api.StageMetrics(step=7, total_steps=60, reward=0.25),
            ),
        ],
    )


def test_exposition_is_exactly_the_runs_state() -> None:
    metrics = RunMetrics()
    metrics.observe_run(make_run(), running_status())
    got = samples(metrics)
    run = (("namespace", "team-a"), ("run", "demo"))
    expected: Samples = {
        ("rlhf_runs", (("phase", p),)): 1.0 if p == "Running" else 0.0 for p in PHASES
    }
    expected[("rlhf_run_info", (("model", "models/tiny-llama"), *run))] = 1.0
    for stage, current in (("sft", "Succeeded"), ("sft2", "Running")):
        for p in PHASES:
            key = tuple(sorted((*run, ("stage", stage), ("phase", p))))
            expected[("rlhf_run_stage_phase", key)] = 1.0 if p == current else 0.0
    expected[("rlhf_run_stage_step", (*run, ("stage", "sft")))] = 60.0
    expected[("rlhf_run_stage_step", (*run, ("stage", "sft2")))] = 7.0
    expected[("rlhf_run_stage_reward", (*run, ("stage", "sft2")))] = 0.25
    expected[("rlhf_reconcile_errors_total", ())] = 0.0
    reconcile = {k: v for k, v in got.items() if k[0].startswith("rlhf_reconcile_duration")}
    assert {k: v for k, v in got.items() if k not in reconcile} == expected
    assert reconcile[("rlhf_reconcile_duration_seconds_count", ())] == 0.0


def test_forget_run_removes_every_series_of_the_run() -> None:
    metrics = RunMetrics()
    other = make_run()
    other_doc = other.model_dump(by_alias=True)
    other_doc["metadata"]["name"] = "other"
    metrics.observe_run(make_run(), running_status())
    metrics.observe_run(api.parse_run(other_doc), api.RunStatus(phase="Pending"))
    before = samples(metrics)
    assert any(dict(labels).get("run") == "demo" for _, labels in before)
    metrics.forget_run("team-a", "demo")
    after = samples(metrics)
    assert not any(dict(labels).get("run") == "demo" for _, labels in after)
    assert after[("rlhf_run_info", (("model", "models/tiny-llama"), ("namespace", "team-a"),
                                    ("run", "other")))] == 1.0
    assert after[("rlhf_runs", (("phase", "Running"),))] == 0.0
    assert after[("rlhf_runs", (("phase", "Pending"),))] == 1.0
    metrics.forget_run("team-a", "never-seen")  # deleting an unknown run is fine


def test_a_new_status_replaces_the_old_one_without_stale_series() -> None:
    metrics = RunMetrics()
    metrics.observe_run(make_run(), running_status())
    metrics.observe_run(make_run(), api.RunStatus(phase="Pending"))  # e.g. status reset
    got = samples(metrics)
    assert not any(name.startswith("rlhf_run_stage") for name, _ in got)
    assert got[("rlhf_runs", (("phase", "Pending"),))] == 1.0
    assert got[("rlhf_runs", (("phase", "Running"),))] == 0.0


def test_reconcile_timer_records_duration_and_errors() -> None:
    metrics = RunMetrics()
    with metrics.reconcile_timer():
        pass
    with pytest.raises(RuntimeError), metrics.reconcile_timer():
        raise RuntimeError("API server unavailable")
    got = samples(metrics)
    assert got[("rlhf_reconcile_duration_seconds_count", ())] == 2.0
    assert got[("rlhf_reconcile_errors_total", ())] == 1.0
    assert got[("rlhf_reconcile_duration_seconds_sum", ())] >= 0.0


def test_naming_conventions() -> None:
    metrics = RunMetrics()
    metrics.observe_run(make_run(), running_status())
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        assert family.name.startswith("rlhf_"), family.name
        for s in family.samples:
            assert s.name.endswith("_total") == (family.type == "counter"), s.name
            if "duration" in s.name or family.type == "histogram":
                assert s.name.split("_seconds")[0] != s.name, f"{s.name}: no unit"
            assert not set(s.labels) & {"pod", "step", "uid", "job"}, "unbounded label"


def test_serve_answers_a_scrape_over_http() -> None:
    metrics = RunMetrics()
    metrics.observe_run(make_run(), running_status())
    server = metrics.serve(0, addr="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'rlhf_run_stage_step{namespace="team-a",run="demo",stage="sft2"} 7.0' in body


def test_local_reconcile_feeds_the_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = RunMetrics()
    executor = LocalExecutor(make_run(), tmp_path, metrics=metrics)
    monkeypatch.setattr(executor, "apply", lambda desired: None)  # plan, but start nothing
    executor.reconcile()
    got = samples(metrics)
    assert got[("rlhf_reconcile_duration_seconds_count", ())] == 1.0
    assert sum(v for (name, _), v in got.items() if name == "rlhf_runs") == 1.0
    assert ("rlhf_run_info", (("model", "models/tiny-llama"), ("namespace", "team-a"),
                              ("run", "demo"))) in got


def test_trainer_pods_declare_the_metrics_port() -> None:
    run = make_run()
    pod = builders.trainer_pod_template(run, run.spec.stages[0])["spec"]
    [container] = pod["containers"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    assert {"name": "RLHF_METRICS_PORT", "value": "9400"} in container["env"]


def test_local_executor_moves_the_trainer_metrics_port(tmp_path: Path) -> None:
    """Processes share one host, so `rlhf run --trainer-metrics-port` overrides the pod's 9400."""
    executor = LocalExecutor(make_run(), tmp_path, trainer_metrics_port=19401)
    script = "import os; print(os.environ['RLHF_METRICS_PORT'])"
    pod = {"containers": [{
        "command": [sys.executable, "-c", script],
        "env": [{"name": "RLHF_METRICS_PORT", "value": "9400"}],
    }]}
    log = tmp_path / "out.log"
    proc = executor._spawn(pod, {}, log)
    assert proc.wait(timeout=30) == 0
    assert log.read_text().strip() == "19401"
    default = LocalExecutor(make_run(), tmp_path)._spawn(pod, {}, tmp_path / "default.log")
    assert default.wait(timeout=30) == 0
    assert (tmp_path / "default.log").read_text().strip() == "9400"


def test_operator_port_from_env() -> None:
    assert port_from_env({}) == 8080
    assert port_from_env({"RLHF_METRICS_PORT": "9090"}) == 9090
    with pytest.raises(ValueError, match="RLHF_METRICS_PORT"):
        port_from_env({"RLHF_METRICS_PORT": "eighty"})
