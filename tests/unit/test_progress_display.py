"""What `rlhf run` shows: a bar per stage with step/total, loss, reward, KL and ETA; a summary."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from helpers import make_run
from rlhf_operator import api
from rlhf_operator.progress import RunDisplay

pytestmark = pytest.mark.unit


def status(step: int) -> api.RunStatus:
    metrics = api.StageMetrics(step=step, total_steps=40, loss=0.5, reward=0.25, kl=0.0125)
    return api.RunStatus(
        phase="Running",
        stages=[
            api.StageStatus(name="sft", type="sft", phase="Running", metrics=metrics),
            api.StageStatus(name="sft2", type="sft", phase="Pending"),
        ],
    )


def test_bars_show_reward_kl_and_eta_and_the_summary_adds_them() -> None:
    out = io.StringIO()
    console = Console(file=out, width=160, force_terminal=False, color_system=None)
    display = RunDisplay(make_run(), console=console)
    with display:
        display.status(status(10))
        display.status(status(20))
    display.summary(status(20), Path("status.json"), [Path("plots/sft.png")])
    text = out.getvalue()
    bar = next(line for line in text.splitlines() if line.startswith("sft ") and "ETA" in line)
    assert "20/40" in bar and "loss 0.5000" in bar and "reward 0.250" in bar
    assert "kl 0.0125" in bar
    assert "sft2" not in bar
    header = next(line for line in text.splitlines() if "stage" in line and "reward" in line)
    assert header.split() == ["┃", "stage", "┃", "type", "┃", "phase", "┃", "step", "┃", "loss",
                              "┃", "reward", "┃", "kl", "┃", "output", "┃"]
    assert "0.250" in text and "0.0125" in text
    assert "Plot: plots/sft.png" in text
