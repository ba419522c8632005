"""Progress reporting: `progress.json` (read by the executors into the run status) and
`metrics.jsonl` (one JSON object per logged step). Only rank 0 writes."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

from rlhf_trainer.runtime import kube_progress
from rlhf_trainer.runtime import metrics as prom

PROGRESS_FILE = "progress.json"
METRICS_FILE = "metrics.jsonl"


def write_json_atomic(path: Path, obj: object) -> None:
    """Write to a sibling temp file, then rename over `path`: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The metrics lines that parse; a line cut short by a kill is dropped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            out.append(rec)
    return out


class ProgressReporter:
    """Writes progress and metrics under `output_dir` when `enabled` (rank 0)."""

    def __init__(self, output_dir: Path, total_steps: int, enabled: bool) -> None:
        self.progress_path = output_dir / PROGRESS_FILE
        self.metrics_path = output_dir / METRICS_FILE
        self.total_steps = total_steps
        self.enabled = enabled
        if enabled:
            prom.METRICS.set_total_steps(total_steps)

    def truncate_after(self, step: int) -> None:
        """On resume from `step`: drop lines of steps that will run again, so none repeats."""
        if not self.enabled or not self.metrics_path.exists():
            return
        kept = [r for r in read_metrics(self.metrics_path) if r["step"] <= step]
        tmp = self.metrics_path.with_name(f".{self.metrics_path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.metrics_path)

    def log(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        """Append a metrics line (snake_case keys) and rewrite progress.json (camelCase)."""
        if not self.enabled:
            return
        record = {"step": step, "epoch": round(epoch, 6), **metrics}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        prom.METRICS.observe_step(record)  # the same values to /metrics (rank 0 serves it)
        self.write_progress(step, epoch, metrics)

    def write_progress(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        wire = {
            "loss": metrics.get("loss"),
            "learningRate": metrics.get("learning_rate"),
            "tokensPerSecond": metrics.get("tokens_per_s"),
            "reward": metrics.get("reward_mean"),
            "kl": metrics.get("kl"),
            "agreementRate": metrics.get("agreement_rate"),  # feedback stages
            "episodeTurns": metrics.get("episode_turns"),  # stages with an environment
            "episodesDropped": _dropped(metrics),
        }
        write_json_atomic(
            self.progress_path,
            {
                "step": step,
                "totalSteps": self.total_steps,
                "epoch": round(epoch, 6),
                "metrics": {k: v for k, v in wire.items() if v is not None},
                "updatedAt": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            },
        )
        # In a pod, the same document reaches the operator as an annotation on this pod.
        kube_progress.publish_file(self.progress_path)


def _dropped(metrics: dict[str, float]) -> float | None:
    """A step's episodes dropped for any reason (`episodes_dropped_<reason>`), None without."""
    counts = [v for k, v in metrics.items() if k.startswith("episodes_dropped_")]
    return float(sum(counts)) if counts else None
