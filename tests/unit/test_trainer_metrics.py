"""Trainer metrics: metrics.jsonl records become series, the helpers, rank-0 serving, and the
contract: both registries expose exactly the names, types and labels of docs/METRICS.md."""

from __future__ import annotations

import json
import math
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import make_run
from rlhf_operator import api
from rlhf_operator.metrics import RunMetrics
from rlhf_trainer.runtime import metrics as prom
from rlhf_trainer.runtime.metrics import SERIES, TrainerMetrics, metrics_port
from rlhf_trainer.runtime.progress import ProgressReporter

pytestmark = pytest.mark.unit

METRICS_DOC = Path(__file__).resolve().parents[2] / "docs" / "METRICS.md"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: bytes) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def test_a_step_record_sets_every_mapped_series() -> None:
    metrics = TrainerMetrics()
    metrics.set_total_steps(100)
    record = {key: float(i + 1) for i, key in enumerate(SERIES)}
    metrics.observe_step({"step": 7, "epoch": 0.5, "learning_rate": 1e-3, **record}, now=1234.5)
    got = samples(metrics.exposition())
    assert got[("rlhf_trainer_step", ())] == 7
    assert got[("rlhf_trainer_total_steps", ())] == 100
    assert got[("rlhf_trainer_last_step_timestamp_seconds", ())] == 1234.5
    for key, (series, labels) in SERIES.items():
        if key in ("tokens_per_s", "train_tokens_per_s"):
            continue  # two keys for one series: the later one wins
        name = f"rlhf_trainer_{series}"
        assert got[(name, tuple(sorted(labels.items())))] == record[key], key
    assert got[("rlhf_trainer_tokens_per_second", (("phase", "train"),))] == max(
        record["tokens_per_s"], record["train_tokens_per_s"]
    )
    assert not any("learning_rate" in name or "epoch" in name for name, _ in got)


def test_missing_and_non_finite_values_leave_series_alone() -> None:
    metrics = TrainerMetrics()
    metrics.observe_step({"step": 1, "loss": 2.0, "kl": 0.1})
    metrics.observe_step({"step": 2, "loss": math.nan, "kl": None, "reward_mean": True})
    got = samples(metrics.exposition())
    assert got[("rlhf_trainer_step", ())] == 2
    assert got[("rlhf_trainer_loss", (("kind", "total"),))] == 2.0
    assert got[("rlhf_trainer_kl", ())] == 0.1
    assert not any(name == "rlhf_trainer_reward_mean" for name, _ in got)


def test_helpers_for_weight_sync_parity_and_judge() -> None:
    metrics = TrainerMetrics()
    metrics.observe_weight_sync("disk", 0.3)
    metrics.observe_weight_sync("disk", 4.0)
    metrics.observe_parity(0.02, failed=False)
    metrics.observe_parity(0.9, failed=True)
    metrics.count_judge_outcome("kept", 3)
    metrics.count_judge_outcome("unparseable")
    got = samples(metrics.exposition())
    sync = (("backend", "disk"),)
    assert got[("rlhf_trainer_weight_sync_seconds_count", sync)] == 2
    assert got[("rlhf_trainer_weight_sync_seconds_sum", sync)] == pytest.approx(4.3)
    assert got[("rlhf_trainer_weight_sync_seconds_bucket", (*sync, ("le", "0.5")))] == 1
    assert got[("rlhf_trainer_logprob_mismatch", ())] == 0.9
    assert got[("rlhf_trainer_weight_sync_parity_failures_total", ())] == 1
    assert got[("rlhf_trainer_judge_outcomes_total", (("outcome", "kept"),))] == 3
    assert got[("rlhf_trainer_judge_outcomes_total", (("outcome", "unparseable"),))] == 1
    assert got[("rlhf_trainer_judge_outcomes_total", (("outcome", "timeout"),))] == 0
    with pytest.raises(ValueError, match="judge outcome"):
        metrics.count_judge_outcome("maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        metrics.observe_weight_sync("rdma", 1.0)  # type: ignore[arg-type]


def test_weight_sync_timer_observes_only_completed_syncs() -> None:
    before = samples(prom.METRICS.exposition()).get(
        ("rlhf_trainer_weight_sync_seconds_count", (("backend", "nccl"),)), 0.0
    )
    with prom.weight_sync_timer("nccl"):
        pass
    with pytest.raises(OSError), prom.weight_sync_timer("nccl"):
        raise OSError("server gone")
    after = samples(prom.METRICS.exposition())
    assert after[("rlhf_trainer_weight_sync_seconds_count", (("backend", "nccl"),))] == before + 1


def test_progress_reporter_feeds_the_same_values_as_metrics_jsonl(tmp_path: Path) -> None:
    reporter = ProgressReporter(tmp_path, total_steps=40, enabled=True)
    reporter.log(3, 0.1, {"loss": 1.5, "reward_mean": 0.25, "kl": 0.01, "tokens_per_s": 900.0})
    [line] = (tmp_path / "metrics.jsonl").read_text().splitlines()
    record = json.loads(line)
    got = samples(prom.METRICS.exposition())
    assert got[("rlhf_trainer_step", ())] == record["step"] == 3
    assert got[("rlhf_trainer_total_steps", ())] == 40
    assert got[("rlhf_trainer_loss", (("kind", "total"),))] == record["loss"]
    assert got[("rlhf_trainer_reward_mean", (("kind", "raw"),))] == record["reward_mean"]
    assert got[("rlhf_trainer_kl", ())] == record["kl"]
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["metrics"]["reward"] == 0.25 and progress["metrics"]["kl"] == 0.01
    stage = api.StageMetrics.from_progress(progress)
    assert stage is not None and stage.reward == 0.25  # what rlhf_run_stage_reward shows


def test_metrics_port_from_env() -> None:
    assert metrics_port({}) == 9400
    assert metrics_port({"RLHF_METRICS_PORT": "0"}) == 0
    assert metrics_port({"RLHF_METRICS_PORT": " 19400 "}) == 19400
    for bad in ("http", "70000", "-1"):
        with pytest.raises(ValueError, match="RLHF_METRICS_PORT"):
            metrics_port({"RLHF_METRICS_PORT": bad})


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(prom, "_server", None)
    yield
    if prom._server is not None:
        prom._server.shutdown()
        prom._server.server_close()


def test_start_server_serves_once_and_never_fails_training(
    no_server: None, caplog: pytest.LogCaptureFixture
) -> None:
    assert prom.start_server({"RLHF_METRICS_PORT": "0"}) is None
    assert prom.start_server({"RLHF_METRICS_PORT": "nope"}) is None
    assert "RLHF_METRICS_PORT" in caplog.text
    with socket_in_use() as taken:
        assert prom.start_server({"RLHF_METRICS_PORT": str(taken)}, addr="127.0.0.1") is None
    assert "Failed to serve trainer metrics" in caplog.text
    with socket_in_use() as free:
        pass  # a port that was free a moment ago
    port = prom.start_server({"RLHF_METRICS_PORT": str(free)}, addr="127.0.0.1")
    assert port == free
    assert prom.start_server({"RLHF_METRICS_PORT": "1"}) == free, "one server per process"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert "rlhf_trainer_total_steps" in response.read().decode()


class socket_in_use:
    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


# --- the contract: docs/METRICS.md -----------------------------------------------------------

def documented(section: str) -> dict[str, tuple[str, set[str]]]:
    """{name: (type, label names)} from one table of METRICS.md."""
    text = METRICS_DOC.read_text().split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`rlhf_\w+`", cells[0]):
            kind = cells[1].split()[0]
            out[cells[0].strip("`")] = (kind, set(re.findall(r"`(\w+)`", cells[2])))
    return out


def exposed(text: bytes) -> dict[str, tuple[str, set[str]]]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {k for s in family.samples for k in s.labels if k != "le"}
        out[name] = (family.type, labels)
    return out


def test_operator_metrics_match_the_contract() -> None:
    metrics = RunMetrics()
    status = api.RunStatus(
        phase="Running",
        stages=[api.StageStatus(name="sft", type="sft", phase="Running",
                                metrics=api.StageMetrics(step=1, reward=0.5))],
    )
    metrics.observe_run(make_run(), status)
    with metrics.reconcile_timer():
        pass
    doc = documented("Operator")
    assert len(doc) == 7
    assert exposed(metrics.exposition()) == doc


def test_trainer_metrics_match_the_contract() -> None:
    metrics = TrainerMetrics()
    metrics.observe_step({"step": 1, **{key: 1.0 for key in SERIES}})
    metrics.observe_weight_sync("disk", 1.0)
    doc = documented("Trainer")
    assert len(doc) == 18
    assert exposed(metrics.exposition()) == doc
    # Label values used by SERIES are the ones the doc lists for that label.
    text = METRICS_DOC.read_text()
    for series, labels in SERIES.values():
        for label, value in labels.items():
            row = re.search(rf"`rlhf_trainer_{series}` \|[^|]*\| `{label}` \(([^)]*)\)", text)
            assert row is not None and value in row.group(1).split(", "), (series, value)
