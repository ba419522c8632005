"""What `python -m rlhf_trainer ppo|grpo --validate-only` checks before any process group
forms: the rollout servers, exactly one reward source, reward functions and their allow-list,
batch shapes and the step count."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from rlhf_trainer import preflight
from rlhf_trainer.config import WORKSPACE_ENV, StageConfig, format_validation_error
from rlhf_trainer.errors import UserError
from rlhf_trainer.rewards import functions as reward_functions

pytestmark = pytest.mark.unit


def config(stage_type: str = "grpo", **changes: Any) -> StageConfig:
    base: dict[str, Any] = {
        "run": "r",
        "stage": stage_type,
        "type": stage_type,
        "model": {"path": "model"},
        "dataset": {"path": "prompts.jsonl", "format": "prompts"},
        "outputDir": f"r/{stage_type}",
        "hyperparameters": {"batchSize": 16, "maxLength": 64, "epochs": 2},
        "rewardFunction": "animal_sounds",
        "rollout": {"urls": ["http://server:8000"], "servedModel": "policy"},
        stage_type: {"rolloutBatchSize": 8, "maxNewTokens": 8}
        | ({"numGenerations": 4} if stage_type == "grpo" else {}),
    }
    return StageConfig.model_validate(base | changes)


@pytest.fixture(autouse=True)
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixtures_dir: Path) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "prompts.jsonl").write_text((fixtures_dir / "prompts.jsonl").read_text())
    monkeypatch.setenv(WORKSPACE_ENV, str(tmp_path))
    return tmp_path


JUDGE: dict[str, Any] = {"urls": ["http://judge:8000"], "servedModel": "judge",
                         "model": {"path": "model"}}  # fmt: skip
BROKEN_TEMPLATE = JUDGE | {"mode": "pointwise", "chatTemplate": "{% for m in messages %}"}
IN_TRAINER: dict[str, Any] = {"engine": "trainer", "servedModel": "policy"}


@pytest.mark.parametrize("stage_type", ["ppo", "grpo"])
def test_the_judge_is_a_reward_source(stage_type: str) -> None:
    changes: dict[str, Any] = {"rewardFunction": None, "judge": JUDGE | {"mode": "pairwise"}}
    if stage_type == "ppo":
        changes["ppo"] = {"rolloutBatchSize": 16, "maxNewTokens": 8}
    check = preflight.check_grpo if stage_type == "grpo" else preflight.check_ppo
    inputs = check(config(stage_type, **changes), world_size=2)
    assert inputs.reward_model_ref is None and inputs.config.judge is not None


def test_pair_data_gives_the_chosen_response_as_the_reference(workspace: Path) -> None:
    rows = [{"prompt": f"Q{i}?", "chosen": f"good {i}", "rejected": "bad"} for i in range(16)]
    (workspace / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = {"path": "pairs.jsonl", "format": "preference"}
    inputs = preflight.check_grpo(config(dataset=dataset), world_size=2)
    firsts = [(r.prompt, r.answer) for r in inputs.train_rows[:2]]
    assert firsts == [("Q0?", "good 0"), ("Q1?", "good 1")]
    plain = preflight.check_grpo(config(), world_size=2)  # a prompts row's own `answer`
    assert plain.train_rows[0].answer == "meow"


def test_grpo_steps_count_prompts_not_samples() -> None:
    inputs = preflight.check_grpo(config(), world_size=2)
    assert len(inputs.train_rows) == 100 and inputs.micro_batch == 8
    assert inputs.total_steps == 25  # 2 epochs x 100 prompts / 8 prompts per step


def test_ppo_with_a_reward_model(workspace: Path) -> None:
    (workspace / "rm").mkdir()
    (workspace / "rm" / "config.json").write_text("{}")
    options = {"rolloutBatchSize": 32, "maxNewTokens": 8}
    changes = {"rewardFunction": None, "rewardModelPath": "rm", "ppo": options}
    inputs = preflight.check_ppo(config("ppo", **changes), world_size=2)
    assert inputs.reward_model_ref == str(workspace / "rm")


@pytest.mark.parametrize(
    ("stage_type", "changes", "message"),
    [
        ("grpo", {"rollout": None}, "rollout: the stage config names no rollout servers"),
        ("grpo", {"rewardFunction": None}, "reward: set exactly one of"),
        ("grpo", {"rewardModelPath": "rm"}, "reward: set exactly one of"),
        ("grpo", {"rewardFunction": "nope"}, "reward.function: unknown reward function 'nope'"),
        ("grpo", {"hyperparameters": {"batchSize": 24}}, "batchSize: 24 samples per optimizer"),
        ("grpo", {"hyperparameters": {"maxLength": 8}}, "maxLength: 8 leaves no room"),
        ("grpo", {"lora": {"r": 4}}, "rollout.loraAdapter: a LoRA stage syncs its adapters"),
        ("grpo", {"judge": JUDGE | {"mode": "pairwise"}}, "reward: set exactly one of"),
        ("ppo", {"rewardFunction": None, "judge": JUDGE}, "judge.mode: the stage config points"),
        ("grpo", {"rewardFunction": None, "judge": BROKEN_TEMPLATE}, "judge chat template"),
        ("grpo", {"rollout": IN_TRAINER, "grpo": {"async": True}}, "grpo.async: with rollout"),
        ("ppo", {"rollout": IN_TRAINER, "ppo": {"async": True}}, "ppo.async: with rollout"),
        ("grpo", {"rollout": IN_TRAINER, "lora": {"r": 4}}, "rollout.engine: `trainer` does not"),
    ],
)
def test_bad_online_configs_are_refused(stage_type: str, changes: Any, message: str) -> None:
    check = preflight.check_grpo if stage_type == "grpo" else preflight.check_ppo
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        check(config(stage_type, **changes), world_size=2)


@pytest.mark.parametrize(
    ("options", "field"),
    [({"ptxCoef": 0.5}, "ppo.ptxDataset"), ({"klController": "adaptive"}, "ppo.klTarget")],
)
def test_ppo_options_missing_their_companion_are_refused_at_load(options: Any, field: str) -> None:
    # Refused with the config itself (config.PPOOptions), before any preflight runs.
    with pytest.raises(ValidationError) as err:
        config("ppo", ppo={"rolloutBatchSize": 8, "maxNewTokens": 8, **options})
    assert f"stage.yaml: {field}: " in format_validation_error(err.value, "stage.yaml")


def test_module_reward_functions_need_the_allow_list(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "rlhf_trainer.tasks.animal_sounds:check"
    monkeypatch.delenv(reward_functions.ALLOW_ENV, raising=False)
    with pytest.raises(UserError, match="not on the trainer's allow-list"):
        reward_functions.resolve_reward_function(name)
    monkeypatch.setenv(reward_functions.ALLOW_ENV, "rlhf_trainer_extras, rlhf_trainer")
    function = reward_functions.resolve_reward_function(name)
    assert function("What does the cow say?", " moo.") == 1.0
    # A prefix matches whole package names only.
    monkeypatch.setenv(reward_functions.ALLOW_ENV, "rlhf")
    with pytest.raises(UserError, match="allow-list"):
        reward_functions.resolve_reward_function(name)
    monkeypatch.setenv(reward_functions.ALLOW_ENV, "rlhf_trainer")
    with pytest.raises(UserError, match="has no callable 'missing'"):
        reward_functions.resolve_reward_function("rlhf_trainer.tasks.animal_sounds:missing")


@pytest.mark.parametrize(
    ("urls", "device", "threads", "expected"),
    [
        (["http://127.0.0.1:8000"], "cpu", 2, 1),  # `rlhf run`: the server shares the CPUs
        (["http://localhost:8000", "http://[::1]:8001"], "cpu", 16, 14),
        (["http://127.0.0.1:8000", "http://127.0.0.1:8001"], "cpu", 2, 1),  # never below 1
        (["http://policy-rollout.ns.svc:8000"], "cpu", 8, None),  # a server pod elsewhere
        (["http://127.0.0.1:8000"], "meta", 2, None),  # not CPU training
    ],
)
def test_overlapped_training_leaves_a_core_to_each_local_server(
    urls: list[str], device: str, threads: int, expected: int | None
) -> None:
    import torch

    from rlhf_trainer.online.setup import overlap_threads

    assert overlap_threads(urls, torch.device(device), threads) == expected


def test_the_trainer_engine_needs_no_server_urls_and_servers_need_them() -> None:
    inputs = preflight.check_grpo(config(rollout=IN_TRAINER), world_size=2)
    assert inputs.config.rollout is not None and inputs.config.rollout.urls == []
    with pytest.raises(ValueError, match=r"rollout\.urls: engine `vllm` needs its servers' URLs"):
        config(rollout={"servedModel": "policy"})
    with pytest.raises(ValueError, match=r"rollout\.urls: engine `trainer` generates in the"):
        config(rollout=IN_TRAINER | {"urls": ["http://server:8000"]})


def test_stop_tokens_gather_every_eos_the_model_and_tokenizer_name() -> None:
    from types import SimpleNamespace

    from torch import nn

    from rlhf_trainer.online.setup import stop_token_ids

    model = nn.Linear(1, 1)
    model.config = SimpleNamespace(eos_token_id=[2, 7])  # type: ignore[assignment]
    model.generation_config = SimpleNamespace(eos_token_id=9)  # type: ignore[assignment]
    assert stop_token_ids(SimpleNamespace(eos_token_id=2), model) == {2, 7, 9}


def test_a_batch_larger_than_the_data_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    """More rows per step than the training split holds would repeat rows inside a step."""
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r"}) + "\n"
                            for i in range(6)))  # fmt: skip

    def sft(batch: int) -> StageConfig:
        return StageConfig.model_validate({
            "run": "r", "stage": "sft", "type": "sft", "model": {"path": str(tiny_model_dir)},
            "dataset": {"path": str(data), "evalFraction": 0.5}, "outputDir": str(tmp_path),
            "hyperparameters": {"batchSize": batch},
        })  # fmt: skip

    assert len(preflight.check_sft(sft(3), 1).train_rows) == 3
    with pytest.raises(UserError, match=r"hyperparameters.batchSize: 4 is more than the 3 "):
        preflight.check_sft(sft(4), 1)
