"""The API, builders, planner and `rlhf eval` resolution for reward, dpo, rrhf, evaluate, LoRA."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_crd import cel_failures

from helpers import make_run, manifest
from rlhf_operator import api, builders, evalcmd, servers, spec_checks
from rlhf_operator.planner import Observed, plan
from rlhf_trainer.config import StageConfig

pytestmark = pytest.mark.unit

DATA = {"path": "data/preference.jsonl", "format": "preference"}
STAGES: list[dict[str, Any]] = [
    {"name": "sft", "type": "sft", "dataset": {"path": "data/sft.jsonl"}},
    {"name": "rm", "type": "reward", "from": "sft", "dataset": DATA},
    {"name": "dpo", "type": "dpo", "from": "sft", "dataset": DATA,
     "lora": {"r": 4, "targetModules": ["q_proj"], "merge": False}},
    {"name": "rrhf", "type": "rrhf", "from": "sft", "reward": {"from": "rm"},
     "dataset": {"path": "data/ranked.jsonl", "format": "ranked"}},
    {"name": "eval", "type": "evaluate", "from": "sft", "reward": {"from": "rm"},
     "dataset": {"path": "data/prompts.jsonl", "format": "prompts"},
     "evaluate": {"policies": ["sft", "dpo", "rrhf"], "maxNewTokens": 8}},
]  # fmt: skip


def doc(**changes: Any) -> dict[str, Any]:
    stages = copy.deepcopy(STAGES)
    for index, update in changes.items():
        stages[int(index.removeprefix("s"))].update(update)
    return manifest(stages=stages)


def stage_config(run: api.RLHFRun, name: str) -> StageConfig:
    stage = next(s for s in run.spec.stages if s.name == name)
    return builders.build_stage_config(run, stage)


def test_pipeline_renders_with_reward_model_lora_and_policy_paths() -> None:
    run = make_run(doc())
    assert stage_config(run, "rrhf").reward_model_path == "demo/rm/final"
    dpo = stage_config(run, "dpo")
    assert dpo.lora is not None and dpo.lora.r == 4 and dpo.lora.merge is False
    assert dpo.lora.target_modules == ["q_proj"]
    assert stage_config(run, "eval").policies == {
        "sft": "demo/sft/final", "dpo": "demo/dpo/final", "rrhf": "demo/rrhf/final",
    }  # fmt: skip
    rendered = yaml.safe_load(builders.build_configmap(run, run.spec.stages[2])["data"]["dpo.yaml"])
    assert rendered["lora"] == {"r": 4, "alpha": 16, "dropout": 0.0, "targetModules": ["q_proj"],
                                "merge": False}  # fmt: skip
    planned = plan(run, Observed(now="t0"))
    assert planned.status.conditions[2].type == "Degraded"
    assert planned.status.conditions[2].status == "False"
    assert [c["kind"] for c in planned.children] == ["ConfigMap", "PyTorchJob"]


@pytest.mark.parametrize(
    ("changes", "needle", "rule"),
    [
        ({"s0": {"lora": {}, "type": "evaluate"}}, "`lora` applies to", "has(self.lora)"),
        ({"s4": {"evaluate": {"policies": []}}}, "needs `evaluate.policies`",
         "size(self.evaluate.policies)"),
        ({"s4": {"evaluate": {"policies": ["rm"]}}}, "evaluate.policies: 'rm' is not",
         "s.evaluate.policies.all"),
        ({"s3": {"evaluate": {"policies": ["eval"]}, "type": "evaluate"}},
         "evaluate.policies: 'eval' is not", "s.evaluate.policies.all"),
        ({"s3": {"reward": {"from": "dpo"}}}, "reward.from: 'dpo' is not", "t.type == 'reward'"),
    ],
)  # fmt: skip
def test_validate_and_cel_refuse_bad_preference_stages(
    changes: dict[str, Any], needle: str, rule: str
) -> None:
    bad = doc(**changes)
    with pytest.raises(api.SpecError) as err:
        api.parse_run(bad)
    assert needle in str(err.value)
    assert any(rule in failed for failed in cel_failures(bad["spec"])), cel_failures(bad["spec"])


def test_cel_accepts_the_pipeline() -> None:
    assert cel_failures(doc()["spec"]) == []


def test_planner_refuses_judged_offline_rrhf() -> None:
    spec = doc(s3={"reward": {"judge": {}}})
    spec["spec"]["judge"] = {"model": {"name": "org/judge"}}
    planned = plan(make_run(spec), Observed(now="t0"))
    degraded = next(c for c in planned.status.conditions if c.type == "Degraded")
    assert planned.children == [] and degraded.status == "True"
    assert degraded.message.startswith("spec.stages[3].reward.judge")


ONLINE_RRHF = {
    "rrhf": {"online": True, "samplesPerPrompt": 4, "rolloutBatchSize": 8},
    "dataset": {"path": "data/prompts.jsonl", "format": "prompts"},
}


def test_online_rrhf_gets_rollout_servers_and_a_rollout_target() -> None:
    run = make_run(doc(s3=ONLINE_RRHF))
    stage = run.spec.stages[3]
    assert builders.is_online(stage) and not builders.is_online(run.spec.stages[1])
    assert spec_checks.online_stage_problem(run, 3, stage) is None
    children = servers.rollout_children(run, stage)
    assert [(c["kind"], c["metadata"]["name"]) for c in children] == [
        ("Deployment", "demo-rrhf-rollout-0"), ("Service", "demo-rrhf-rollout-0"),
    ]  # fmt: skip
    config = stage_config(run, "rrhf")
    assert config.rollout is not None and config.rollout.urls == [
        "http://demo-rrhf-rollout-0.team-a.svc:8000"
    ]
    assert config.rrhf is not None and config.rrhf.samples_per_prompt == 4
    assert config.reward_model_path == "demo/rm/final"
    offline = make_run(doc())
    assert servers.rollout_children(offline, offline.spec.stages[3]) == []
    assert stage_config(offline, "rrhf").rollout is None


def test_online_rrhf_needs_a_reward_source() -> None:
    bad = doc(s3=ONLINE_RRHF)
    del bad["spec"]["stages"][3]["reward"]
    with pytest.raises(api.SpecError, match="online `rrhf` stage needs `reward`"):
        api.parse_run(bad)
    assert any("self.rrhf.online" in failed for failed in cel_failures(bad["spec"]))
    assert cel_failures(doc(s3=ONLINE_RRHF)["spec"]) == []


def eval_args(**flags: Any) -> argparse.Namespace:
    defaults = {"policy": [], "reward_model": None, "kl_reference": None, "prompts": None}
    return argparse.Namespace(**{**defaults, **flags})


def test_rlhf_eval_defaults_to_the_first_and_last_policy(tmp_path: Path) -> None:
    run = make_run(doc())
    for stage in ("sft", "rm", "dpo", "rrhf"):
        (tmp_path / "demo" / stage / "final").mkdir(parents=True)
    resolved = evalcmd.from_run(run, tmp_path, eval_args())
    final = tmp_path.resolve() / "demo"
    assert resolved == {
        "policy": [f"sft={final / 'sft' / 'final'}", f"rrhf={final / 'rrhf' / 'final'}"],
        "reward_model": str(final / "rm" / "final"),
        "kl_reference": "sft",
    }
    picked = evalcmd.from_run(run, tmp_path, eval_args(policy=["dpo", "base=models/x"]))
    assert picked["policy"] == [f"dpo={final / 'dpo' / 'final'}", "base=models/x"]
    with pytest.raises(evalcmd.EvalUsageError, match="not a stage"):
        evalcmd.from_run(run, tmp_path, eval_args(policy=["nope"]))
    (tmp_path / "demo" / "rrhf" / "final").rmdir()
    with pytest.raises(evalcmd.EvalUsageError, match=r"rrhf: no output at .*run the pipeline"):
        evalcmd.from_run(run, tmp_path, eval_args())
