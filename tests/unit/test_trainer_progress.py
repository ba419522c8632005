"""progress.json and metrics.jsonl: shapes, atomic writes, truncation on resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_trainer.runtime.progress import ProgressReporter, read_metrics, write_json_atomic

pytestmark = pytest.mark.unit


def test_log_writes_both_files(tmp_path: Path) -> None:
    reporter = ProgressReporter(tmp_path, total_steps=10, enabled=True)
    metrics = {"loss": 1.5, "learning_rate": 1e-3, "tokens_per_s": 900.0, "grad_norm": 0.5}
    reporter.log(2, 0.25, metrics)
    reporter.log(4, 0.5, {**metrics, "loss": 1.0})
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["step"] == 4 and progress["totalSteps"] == 10 and progress["epoch"] == 0.5
    assert progress["metrics"] == {"loss": 1.0, "learningRate": 1e-3, "tokensPerSecond": 900.0}
    assert progress["updatedAt"].endswith("+00:00")
    lines = read_metrics(tmp_path / "metrics.jsonl")
    assert [line["step"] for line in lines] == [2, 4]
    assert lines[0] == {"step": 2, "epoch": 0.25, **metrics}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "progress.json"]


def test_truncate_after_resume_drops_later_and_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)))
    with path.open("a") as f:
        f.write('{"step": 5, "lo')  # the kill landed mid-line
    ProgressReporter(tmp_path, 10, enabled=True).truncate_after(2)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert path.read_text().endswith("}\n")


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    reporter = ProgressReporter(tmp_path, 10, enabled=False)
    reporter.log(1, 0.1, {"loss": 1.0})
    reporter.truncate_after(0)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_replaces(tmp_path: Path) -> None:
    target = tmp_path / "p.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]


def test_episode_metrics_reach_the_run_status(tmp_path: Path) -> None:
    """A stage with an environment: its step's turns and dropped episodes (all reasons) go to
    progress.json, which the operator and the local executor read into the stage's status."""
    from rlhf_operator import api

    reporter = ProgressReporter(tmp_path, total_steps=8, enabled=True)
    reporter.log(3, 0.1, {"reward_mean": 0.4, "episode_turns": 2.5, "episode_reward": 0.4,
                          "episodes_dropped_timeout": 1.0, "episodes_dropped_malformed": 2.0,
                          "episodes_dropped_http_status": 0.0})  # fmt: skip
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["metrics"]["episodeTurns"] == 2.5
    assert progress["metrics"]["episodesDropped"] == 3.0
    status = api.StageMetrics.from_progress(progress)
    assert status is not None
    assert (status.reward, status.episode_turns, status.episodes_dropped) == (0.4, 2.5, 3.0)
    wire = status.model_dump(by_alias=True, exclude_none=True)
    assert wire["episodeTurns"] == 2.5 and wire["episodesDropped"] == 3.0
