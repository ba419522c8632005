"""The feedback stage through its CLI against a faulty judge server (a real HTTP server with
scripted faults, tests/fake_judge.py): garbage, slow and failing replies drop their pairs and
are counted, the stage completes, and a reward stage trains on its output with the margins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

from fake_judge import FakeJudge, fake_judge
from rlhf_trainer.config import DatasetSpec, JudgeTarget, ModelSource, StageConfig
from rlhf_trainer.data.chat_format import ChatFormat
from rlhf_trainer.data.readers import load_preference_rows
from rlhf_trainer.rewards.judge import JudgeRewardSource
from rlhf_trainer.rollout.client import Sample

pytestmark = pytest.mark.integration

# (responses, how many rows like it, the outcome their pair must get)
ROWS: list[tuple[list[str], int, str]] = [
    (["a good answer", "a poor answer"], 4, "kept"),
    (["a poor answer", "a good answer"], 2, "kept"),
    (["one poor answer", "another poor answer"], 2, "disagreed"),
    (["a good answer [garbage]", "a poor answer"], 2, "unparseable"),
    (["a good answer [slow]", "a poor answer"], 2, "timeout"),
    (["a good answer [error]", "a poor answer"], 2, "error"),
]
EXPECTED: Counter[str] = Counter()
for _, count, outcome in ROWS:
    EXPECTED[outcome] += count


def write_workspace(root: Path) -> None:
    lines = []
    for responses, count, _ in ROWS:
        for i in range(count):
            row = {"prompt": f"Question {len(lines)} {i}?", "responses": responses}
            lines.append(json.dumps(row))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    (root / "judge-model").mkdir()
    (root / "judge-model" / "tokenizer_config.json").write_text("{}")  # no chat template


def run_cli(stage: str, config: dict[str, Any], root: Path) -> subprocess.CompletedProcess[str]:
    path = root / f"{config['stage']}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RLHF_WORKSPACE": str(root), "RLHF_METRICS_PORT": "0"}
    return subprocess.run(
        [sys.executable, "-m", "rlhf_trainer", stage, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.fixture(scope="module")
def feedback_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, FakeJudge]]:
    root = tmp_path_factory.mktemp("feedback")
    write_workspace(root)
    with fake_judge(slow_seconds=2.0) as server:
        config = {
            "run": "t",
            "stage": "feedback",
            "type": "feedback",
            "model": {"path": "judge-model"},
            "dataset": {"path": "pairs.jsonl", "format": "ranked"},
            "outputDir": "t/feedback",
            "feedback": {"concurrency": 4, "timeoutSeconds": 0.5, "maxRetries": 1},
            "judge": {
                "engine": "vllm",
                "urls": [server.url],
                "servedModel": "judge",
                "model": {"path": "judge-model"},
                "maxNewTokens": 8,
            },
        }
        result = run_cli("feedback", config, root)
        assert result.returncode == 0, result.stderr[-3000:]
        yield root, server


def test_faulty_replies_drop_their_pairs_and_the_stage_completes(
    feedback_run: tuple[Path, FakeJudge],
) -> None:
    root, _ = feedback_run
    final = root / "t" / "feedback" / "final"
    kept = [json.loads(line) for line in (final / "preference.jsonl").read_text().splitlines()]
    dropped = [json.loads(line) for line in (final / "dropped.jsonl").read_text().splitlines()]
    assert len(kept) == EXPECTED["kept"]
    assert Counter(d["outcome"] for d in dropped) == EXPECTED - Counter(kept=6)
    assert all("good" in r["chosen"] and "poor" in r["rejected"] for r in kept)
    assert all(r["margin"] == pytest.approx(0.8) for r in kept)  # 0.9 - 0.1, both orders
    assert all(r["judge"]["protocol"] == "self-reference" for r in kept)
    summary = json.loads((final / "feedback.json").read_text())
    for outcome, n in EXPECTED.items():
        assert summary[f"{outcome}_pairs"] == n, outcome
    assert summary["agreement_rate"] == pytest.approx(6 / 8)
    last = json.loads((root / "t" / "feedback" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["judged_pairs"] == sum(EXPECTED.values()) and last["kept_pairs"] == 6
    progress = json.loads((root / "t" / "feedback" / "progress.json").read_text())
    assert progress["step"] == progress["totalSteps"]
    assert progress["metrics"]["agreementRate"] == pytest.approx(0.75)


def test_requests_follow_the_protocol(feedback_run: tuple[Path, FakeJudge]) -> None:
    _, server = feedback_run
    verdicts = [r for r in server.requests if r["max_tokens"] == 1]
    assert verdicts and all(r["structured_outputs"] == {"choice": ["A", "B"]} for r in verdicts)
    # One reference per prompt: 14 prompts, each answered once whatever its pair did.
    references = [r for r in server.requests if "A: " not in r["prompt"]]
    assert len(references) == sum(n for _, n, _ in ROWS)
    # A timeout or a 500 is retried once (maxRetries: 1); garbage is not retried.
    slow = [r for r in server.requests if "[slow]" in r["prompt"]]
    assert len(slow) == 2 * 2 * 2  # 2 prompts x 2 orders x 2 attempts (the critique fails)


def reward_config(name: str, use_margin: bool) -> dict[str, Any]:
    return {
        "run": "t",
        "stage": name,
        "type": "reward",
        "model": {"path": "tiny"},
        "dataset": {"path": "t/feedback/final/preference.jsonl", "format": "preference"},
        "outputDir": f"t/{name}",
        "hyperparameters": {"maxSteps": 1, "batchSize": 2, "learningRate": 1e-4, "saveEvery": 10},
        "rewardModel": {"useMargin": use_margin},
    }


def test_reward_stage_trains_on_the_feedback_with_its_margins(
    feedback_run: tuple[Path, FakeJudge], tiny_model_dir: Path
) -> None:
    root, _ = feedback_run
    (root / "tiny").symlink_to(tiny_model_dir)
    spec = DatasetSpec(path=str(root / "t/feedback/final/preference.jsonl"), format="preference")
    assert [r.margin for r in load_preference_rows(spec)] == [pytest.approx(0.8)] * 6
    losses = {}
    for name, use_margin in (("rm-margin", True), ("rm-plain", False)):
        config = reward_config(name, use_margin)
        StageConfig.model_validate(config)
        result = run_cli("reward", config, root)
        assert result.returncode == 0, result.stderr[-3000:]
        lines = (root / "t" / name / "metrics.jsonl").read_text().splitlines()
        losses[name] = next(r["loss"] for r in map(json.loads, lines) if "loss" in r)
        assert (root / "t" / name / "final" / "config.json").is_file()
    # Same init, same batch: -log σ(d - m) > -log σ(d) for the margin m = 0.8.
    assert losses["rm-margin"] > losses["rm-plain"] + 0.1


class Tokenizer:
    """Decodes the ids of `RESPONSES` back to their text, as a real tokenizer would."""

    def batch_decode(self, ids: list[list[int]], skip_special_tokens: bool) -> list[str]:
        return [RESPONSES[row[0]] for row in ids]


RESPONSES = ["a good answer", "a poor answer", "a good answer [error]"]


def test_online_judge_rewards(feedback_run: tuple[Path, FakeJudge]) -> None:
    _, server = feedback_run
    prompts = ["Q1?", "Q2?"]
    samples = [
        Sample(0, (1,), (0,), (0.0,), "stop"),  # good vs the reference: 0.9
        Sample(1, (1,), (1,), (0.0,), "stop"),  # poor vs the judge's own answer: 0.5 (a tie)
        Sample(0, (1,), (2,), (0.0,), "stop"),  # the judge fails: the batch's mean
    ]
    target = JudgeTarget(
        urls=[server.url],
        served_model="judge",
        model=ModelSource(path="/x"),
        mode="pairwise",
        requests={"timeoutSeconds": 5, "maxRetries": 0},
    )
    chat = ChatFormat()
    with mock.patch("rlhf_trainer.rewards.judge.load_chat_format", return_value=chat):
        source = JudgeRewardSource(target, Tokenizer(), references={"Q1?": "a poor answer"})
        scores = source.score(samples, prompts).tolist()
        pointwise = JudgeRewardSource(target.model_copy(update={"mode": "pointwise"}), Tokenizer())
        points = pointwise.score(samples[:1], prompts).tolist()
    assert scores == pytest.approx([0.9, 0.5, 0.7])
    assert points == [pytest.approx(8 / 9)]
