"""Plots of a local run: reward, KL and loss per stage, drawn from each stage's metrics.jsonl.

`rlhf run` writes `<run>/plots/<stage>.png` and, beside it, `<stage>.json` holding the exact
series drawn ({"stage", "series": {key: {"steps": [...], "values": [...]}}}), so the curves can
be checked or redrawn elsewhere. matplotlib (Agg backend) is imported only when drawing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, TypedDict, TypeGuard

METRICS_FILE = "metrics.jsonl"
PLOTS_DIR = "plots"
# One panel per quantity, each drawing the metrics.jsonl keys it finds (see docs/METRICS.md).
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward", ("reward_mean", "reward_scaled_mean")),
    ("KL", ("kl",)),
    ("loss", ("loss", "eval_loss")),
)


class Series(TypedDict):
    steps: list[int]
    values: list[float]


def read_records(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records with an integer step; a torn last line is skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def _finite(value: Any) -> TypeGuard[float]:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and math.isfinite(value)


def stage_series(records: list[dict[str, Any]]) -> dict[str, Series]:
    """The plotted keys present in `records`, each as (step, value) columns of finite numbers."""
    out: dict[str, Series] = {}
    for _title, keys in PANELS:
        for key in keys:
            series: Series = {"steps": [], "values": []}
            for record in records:
                value = record.get(key)
                if _finite(value):
                    series["steps"].append(record["step"])
                    series["values"].append(float(value))
            if series["steps"]:
                out[key] = series
    return out


def draw(stage: str, series: dict[str, Series], path: Path) -> None:
    """One PNG with a panel per quantity that has data."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    panels = [(title, [k for k in keys if k in series]) for title, keys in PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), squeeze=False)
    try:
        for ax, (title, keys) in zip(axes[:, 0], panels, strict=True):
            for key in keys:
                ax.plot(series[key]["steps"], series[key]["values"], label=key)
            ax.set_ylabel(title)
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize="small")
        axes[-1, 0].set_xlabel("step")
        fig.suptitle(f"stage {stage}")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def write_plots(run_dir: Path, stages: list[str]) -> list[Path]:
    """Write `plots/<stage>.{json,png}` for every stage with metrics; returns the PNG paths."""
    written = []
    for stage in stages:
        series = stage_series(read_records(run_dir / stage / METRICS_FILE))
        if not series:
            continue
        folder = run_dir / PLOTS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        data = {"stage": stage, "series": series}
        (folder / f"{stage}.json").write_text(json.dumps(data, indent=1) + "\n")
        draw(stage, series, folder / f"{stage}.png")
        written.append(folder / f"{stage}.png")
    return written
