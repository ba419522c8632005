"""End to end: examples/dpo.yaml (sft -> reward -> dpo) and examples/rrhf.yaml (sft -> reward ->
rrhf scored by that reward model -> evaluate) through `rlhf run`, then `rlhf eval`, exactly as
their header comments tell a user to run them, on the tiny model and the bundled data.

Measured on the shared 2-core machine: each pipeline finished Succeeded in 50-90 s and each
`rlhf eval` in 7-12 s. On 100 held-out prompts (greedy, 8 tokens) the tables read, e.g.:

    policy    RM score   fn reward  perplexity   KL to ref      tokens
    sft        -1.5868      0.0800      2.8590      0.0000      5.0500
    dpo        -0.8947      0.0800      3.9733      0.6728      4.9400

    sft        -1.5868      0.0800      2.8590      0.0000      5.0500
    rrhf        0.4685      0.2700      2.5072      0.7620      4.9600
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
import yaml

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "manifests" / "examples"
RLHF = [sys.executable, "-m", "rlhf_operator.cli"]
# One thread per process (torchrun does the same for its workers); see the integration tests.
ENV = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("preference-examples")
    (root / "data").mkdir()
    for path in (ROOT / "tests" / "fixtures").glob("*.jsonl"):
        shutil.copy(path, root / "data" / path.name)
    shutil.copytree(tiny_model_dir, root / "models" / "tiny-llama")
    return root


def rlhf(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RLHF, *args], capture_output=True, text=True, timeout=600, env=ENV)


def run_example(name: str, workdir: Path) -> dict[str, Any]:
    result = rlhf("run", str(EXAMPLES / name), "--workdir", str(workdir),
                  "--trainer-metrics-port", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = yaml.safe_load((EXAMPLES / name).read_text())["metadata"]["name"]
    status: dict[str, Any] = json.loads((workdir / run / "status.json").read_text())
    assert status["phase"] == "Succeeded"
    for stage in status["stages"]:
        assert stage["phase"] == "Succeeded", stage
        produced = "eval.json" if stage["type"] == "evaluate" else "config.json"
        assert (Path(stage["output"]) / produced).is_file(), stage
    return status


def metric_keys(workdir: Path, run: str, stage: str) -> set[str]:
    lines = (workdir / run / stage / "metrics.jsonl").read_text().splitlines()
    return set(json.loads(lines[-1]))


def test_dpo_example_then_rlhf_eval_compares_sft_and_dpo(workdir: Path) -> None:
    status = run_example("dpo.yaml", workdir)
    assert [s["type"] for s in status["stages"]] == ["sft", "reward", "dpo"]
    assert {"accuracy", "eval_accuracy"} <= metric_keys(workdir, "dpo", "rm")
    assert {"reward_accuracy", "chosen_reward", "rejected_reward", "margin"} <= metric_keys(
        workdir, "dpo", "dpo"
    )
    data = workdir / "data"
    result = rlhf(
        "eval", str(EXAMPLES / "dpo.yaml"), "--workdir", str(workdir),
        "--prompts", str(data / "prompts.jsonl"), "--reference-data", str(data / "sft_eval.jsonl"),
        "--reward-function", "animal_sounds", "--pairs", str(data / "preference_eval.jsonl"),
        "--max-new-tokens", "8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stderr.splitlines() if "INFO" not in line]
    print("\n".join(table))
    header = next(line for line in table if line.startswith("policy"))
    assert header.split() == ["policy", "RM", "score", "fn", "reward", "perplexity", "KL", "to",
                              "ref", "tokens"]  # fmt: skip
    assert [line.split()[0] for line in table[table.index(header) + 1 :][:2]] == ["sft", "dpo"]
    report = json.loads(result.stdout)
    assert report["prompts"] == 100 and list(report["policies"]) == ["sft", "dpo"]
    sft, dpo = report["policies"]["sft"], report["policies"]["dpo"]
    assert sft["kl"] == 0.0 and dpo["kl"] > 0.0  # KL to the SFT policy, the default reference
    for policy in (sft, dpo):
        assert {"reward_model_score", "reward_function_score", "perplexity"} <= set(policy)
        assert policy["perplexity"] > 1.0
    assert 0.5 <= report["reward_model"]["pairwise_accuracy"] <= 1.0


def test_rrhf_example_scores_with_its_reward_model_and_evaluates(workdir: Path) -> None:
    status = run_example("rrhf.yaml", workdir)
    assert [s["type"] for s in status["stages"]] == ["sft", "reward", "rrhf", "evaluate"]
    log = (workdir / "rrhf" / "logs" / "rrhf-rrhf-0.log").read_text()
    assert "Scored 360 responses with the reward model" in log
    assert {"rank_loss", "sft_loss"} <= metric_keys(workdir, "rrhf", "rrhf")
    evaluate = status["stages"][-1]
    report = json.loads((Path(evaluate["output"]) / "eval.json").read_text())
    rrhf = report["policies"]["rrhf"]
    # status.stages[].metrics carries the last policy's reward-model score and KL.
    assert evaluate["metrics"]["reward"] == pytest.approx(rrhf["reward_model_score"])
    assert evaluate["metrics"]["kl"] == pytest.approx(rrhf["kl"])
    print((Path(evaluate["output"]) / "eval.txt").read_text())
    assert report["policies"]["sft"]["kl"] == 0.0 and "perplexity" in rrhf
    assert "pairwise_accuracy" in report["reward_model"]
