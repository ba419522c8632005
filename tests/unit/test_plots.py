"""Plots of a local run: the data behind each PNG is exactly the stage's metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlhf_operator.plots import stage_series, write_plots

pytestmark = pytest.mark.unit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(path: Path, records: list[dict[str, object]], torn: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn)


def test_ppo_like_stage_gets_reward_kl_and_loss(tmp_path: Path) -> None:
    records: list[dict[str, object]] = [
        {"step": s, "loss": 2.0 / s, "reward_mean": 0.1 * s, "kl": 0.01 * s, "learning_rate": 1e-5}
        for s in range(1, 21)
    ]
    write_metrics(tmp_path / "ppo" / "metrics.jsonl", records, torn='{"step": 21, "lo')
    [png] = write_plots(tmp_path, ["ppo"])
    assert png == tmp_path / "plots" / "ppo.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
    data = json.loads((tmp_path / "plots" / "ppo.json").read_text())
    assert data["stage"] == "ppo"
    assert set(data["series"]) == {"loss", "reward_mean", "kl"}
    for key, series in data["series"].items():
        assert series["steps"] == list(range(1, 21))
        assert series["values"] == [r[key] for r in records], key


def test_sparse_and_odd_values_keep_their_own_steps(tmp_path: Path) -> None:
    records: list[dict[str, object]] = [
        {"step": 1, "loss": 3.0},
        {"step": 2, "loss": math.nan, "eval_loss": 2.5},
        {"step": 3, "loss": 1.0, "kl": "n/a"},
    ]
    assert stage_series(records) == {
        "loss": {"steps": [1, 3], "values": [3.0, 1.0]},
        "eval_loss": {"steps": [2], "values": [2.5]},
    }


def test_stages_without_metrics_get_no_plot(tmp_path: Path) -> None:
    write_metrics(tmp_path / "sft" / "metrics.jsonl", [{"step": 1, "epoch": 0.1}])
    assert write_plots(tmp_path, ["sft", "never-ran"]) == []
    assert not (tmp_path / "plots").exists()
