"""Judge servers: the builders (vLLM and lmdeploy), the stage config that points a trainer at
them, and the planner creating them only while a judging stage runs."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
import yaml

from helpers import job_with, make_run, manifest
from rlhf_operator import builders, judge_servers, servers
from rlhf_operator.planner import Observed, plan
from rlhf_trainer.config import StageConfig

pytestmark = pytest.mark.unit

Obj = dict[str, Any]
JUDGE: Obj = {"engine": "vllm", "model": {"path": "models/judge"}, "replicas": 2}
STAGES: list[Obj] = [
    {"name": "sft", "type": "sft", "dataset": {"path": "data/sft.jsonl"}},
    {
        "name": "feedback",
        "type": "feedback",
        "from": "sft",
        "dataset": {"path": "data/ranked.jsonl", "format": "ranked"},
        "feedback": {"concurrency": 7, "timeoutSeconds": 9, "positionSwap": False},
    },
    {
        "name": "rm",
        "type": "reward",
        "dataset": {"path": "demo/feedback/final/preference.jsonl", "format": "preference"},
    },
]


def run_with(judge: Obj | None = None, stages: list[Obj] | None = None) -> Any:
    return make_run(manifest(judge=judge or JUDGE, stages=stages or STAGES))


def container(obj: Obj) -> Obj:
    return obj["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


def test_vllm_judge_servers() -> None:
    run = run_with()
    children = judge_servers.judge_children(run, run.spec.stages[1])
    assert [(c["kind"], c["metadata"]["name"]) for c in children] == [
        ("Deployment", "demo-feedback-judge-0"), ("Service", "demo-feedback-judge-0"),
        ("Deployment", "demo-feedback-judge-1"), ("Service", "demo-feedback-judge-1"),
    ]  # fmt: skip
    for child in children:
        assert child["metadata"]["labels"][builders.LABEL_COMPONENT] == "judge"
        kubernetes_validate.validate(child, "1.34", strict=True)
    deployment, service = children[:2]
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert deployment["spec"]["template"]["metadata"]["labels"][builders.LABEL_COMPONENT] == "judge"
    assert service["spec"]["ports"][0]["name"] == "http"
    server = container(deployment)
    assert server["command"][:3] == ["vllm", "serve", "/workspace/models/judge"]
    assert server["command"][server["command"].index("--served-model-name") + 1] == "judge"
    assert server["ports"][0]["name"] == "http"
    assert all(e["name"] != "VLLM_SERVER_DEV_MODE" for e in server["env"])


def test_lmdeploy_judge_serves_metrics_and_its_own_token() -> None:
    judge = {"engine": "lmdeploy", "model": {"name": "org/judge",
             "tokenSecretRef": {"name": "hub", "key": "token"}}}  # fmt: skip
    run = run_with(judge)
    server = container(judge_servers.judge_children(run, run.spec.stages[1])[0])
    argv = server["command"]
    assert argv[:4] == ["lmdeploy", "serve", "api_server", "org/judge"]
    assert "--enable-metrics" in argv
    assert argv[argv.index("--model-name") + 1] == "judge"
    token = next(e for e in server["env"] if e["name"] == "HF_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "hub", "key": "token"}


def test_only_judging_stages_get_judge_servers() -> None:
    run = run_with()
    assert judge_servers.judge_children(run, run.spec.stages[0]) == []
    assert judge_servers.judge_children(run, run.spec.stages[2]) == []
    online = {"name": "ppo", "type": "ppo", "dataset": {"path": "data/prompts.jsonl"},
              "reward": {"judge": {"mode": "pointwise", "concurrency": 3}}}  # fmt: skip
    run = run_with(stages=[*STAGES, online])
    assert len(judge_servers.judge_children(run, run.spec.stages[3])) == 4
    config = builders.build_stage_config(run, run.spec.stages[3])
    assert config.judge is not None and config.judge.mode == "pointwise"
    assert config.judge.requests.concurrency == 3


def test_stage_config_points_at_the_judge_services() -> None:
    run = run_with()
    configmap = builders.build_configmap(run, run.spec.stages[1])
    config = StageConfig.model_validate(yaml.safe_load(configmap["data"]["feedback.yaml"]))
    assert config.judge is not None
    assert config.judge.urls == [
        "http://demo-feedback-judge-0.team-a.svc:8000",
        "http://demo-feedback-judge-1.team-a.svc:8000",
    ]
    assert config.judge.served_model == "judge" and config.judge.mode is None
    assert config.judge.requests.concurrency == 7 and config.judge.requests.timeout_seconds == 9
    assert config.judge.principle == "Which response is best for humanity?"
    assert config.rollout is None  # responses come from the dataset
    assert builders.build_stage_config(run, run.spec.stages[0]).judge is None


def available(obj: Obj) -> Obj:
    out = copy.deepcopy(obj)
    out["status"] = {"availableReplicas": 1,
                     "conditions": [{"type": "Available", "status": "True"}]}  # fmt: skip
    return out


def test_planner_runs_judge_servers_only_while_the_stage_runs() -> None:
    feedback = {k: v for k, v in STAGES[1].items() if k != "from"}
    run = run_with(stages=[feedback])
    first = plan(run, Observed(now="t0"))
    kinds = [(c["kind"], c["metadata"]["labels"][builders.LABEL_COMPONENT]) for c in first.children]
    assert ("Deployment", "judge") in kinds and ("Service", "judge") in kinds
    assert "PyTorchJob" not in [k for k, _ in kinds]  # the trainer waits for its judge
    up = [available(c) if c["kind"] == "Deployment" else c for c in first.children]
    second = plan(run.model_copy(update={"status": first.status}), Observed(up, now="t1"))
    job = next(c for c in second.children if c["kind"] == "PyTorchJob")
    done = [*up, job_with(job, "Running", "Succeeded")]
    third = plan(run.model_copy(update={"status": second.status}), Observed(done, now="t2"))
    assert third.status.phase == "Succeeded"
    left = {c["metadata"]["labels"][builders.LABEL_COMPONENT] for c in third.children}
    assert "judge" not in left  # a finished stage gives its judge's GPUs back


def test_feedback_with_rollout_samples_from_the_policy_servers() -> None:
    stage = {**STAGES[1], "rollout": {"engine": "vllm"}}
    run = run_with(stages=[STAGES[0], stage])
    config = builders.build_stage_config(run, run.spec.stages[1])
    assert config.rollout is not None
    assert config.rollout.urls == ["http://demo-feedback-rollout-0.team-a.svc:8000"]
    rollout = servers.rollout_children(run, run.spec.stages[1])
    assert [c["kind"] for c in rollout] == ["Deployment", "Service"]
    without = run_with()  # responses from the dataset: no policy servers
    assert servers.rollout_children(without, without.spec.stages[1]) == []


# -- online stages rewarded by the judge (ppo, grpo) --------------------------------------------

GRPO_JUDGE: Obj = {
    "name": "grpo",
    "type": "grpo",
    "dataset": {"path": "data/prompts.jsonl", "format": "prompts"},
    "reward": {"judge": {"mode": "pairwise", "timeoutSeconds": 30}},
    "rollout": {"replicas": 1},
}
GRPO_FUNCTION: Obj = {
    "name": "grpo-fn",
    "type": "grpo",
    "from": "grpo",
    "dataset": {"path": "data/prompts.jsonl", "format": "prompts"},
    "reward": {"function": "animal_sounds"},
}


def components(children: list[Obj], stage: str) -> list[tuple[str, str]]:
    return [
        (c["kind"], c["metadata"]["labels"].get(builders.LABEL_COMPONENT, ""))
        for c in children
        if c["metadata"]["labels"].get(builders.LABEL_STAGE) == stage
    ]


def refused(p: Any) -> bool:
    return any(c.type == "Degraded" and c.status == "True" for c in p.status.conditions)


def stage_of(p: Any, name: str) -> Any:
    return next(s for s in p.status.stages if s.name == name)


def test_online_judge_stage_waits_for_rollout_and_judge_servers_then_frees_them() -> None:
    run = run_with(stages=[GRPO_JUDGE, GRPO_FUNCTION])
    first = plan(run, Observed(now="t0"))
    assert not refused(first)
    found = components(first.children, "grpo")
    for kind in ("Deployment", "Service"):
        assert found.count((kind, "rollout")) == 1 and found.count((kind, "judge")) == 2
    assert "PyTorchJob" not in [k for k, _ in found]  # the trainer waits for both
    assert stage_of(first, "grpo").message == (
        "Waiting for rollout servers: 0/1 available, judge servers: 0/2 available"
    )
    # Rollout up, judge still loading: the trainer keeps waiting.
    rollout_up = [
        available(c) if c["kind"] == "Deployment" and "rollout" in c["metadata"]["name"] else c
        for c in first.children
    ]
    second = plan(run.model_copy(update={"status": first.status}), Observed(rollout_up, now="t1"))
    assert not any(c["kind"] == "PyTorchJob" for c in second.children)
    assert stage_of(second, "grpo").message == (
        "Waiting for rollout servers: 1/1 available, judge servers: 0/2 available"
    )
    # Both up: the trainer starts, pointed at both.
    all_up = [available(c) if c["kind"] == "Deployment" else c for c in first.children]
    third = plan(run.model_copy(update={"status": second.status}), Observed(all_up, now="t2"))
    job = next(c for c in third.children if c["kind"] == "PyTorchJob")
    configmap = next(c for c in third.children if c["kind"] == "ConfigMap")
    config = StageConfig.model_validate(yaml.safe_load(configmap["data"]["grpo.yaml"]))
    assert config.judge is not None and config.judge.mode == "pairwise"
    assert config.judge.urls == [
        "http://demo-grpo-judge-0.team-a.svc:8000",
        "http://demo-grpo-judge-1.team-a.svc:8000",
    ]
    assert config.judge.requests.timeout_seconds == 30
    assert config.rollout is not None
    assert config.rollout.urls == ["http://demo-grpo-rollout-0.team-a.svc:8000"]
    assert config.reward_function is None and config.reward_model_path is None
    # Finished: its rollout and judge servers go; the next stage gets rollout servers only.
    done = [*all_up, job_with(job, "Running", "Succeeded")]
    fourth = plan(run.model_copy(update={"status": third.status}), Observed(done, now="t3"))
    assert stage_of(fourth, "grpo").phase == "Succeeded"
    assert {k for k, _ in components(fourth.children, "grpo")} == {"ConfigMap", "PyTorchJob"}
    nxt = components(fourth.children, "grpo-fn")
    assert ("Deployment", "rollout") in nxt and all(c != "judge" for _, c in nxt)
    assert builders.build_stage_config(run, run.spec.stages[1]).judge is None


def test_a_judge_server_that_cannot_start_fails_the_online_stage() -> None:
    run = run_with(stages=[GRPO_JUDGE])
    first = plan(run, Observed(now="t0"))
    broken = []
    for child in first.children:
        if child["kind"] == "Deployment" and child["metadata"]["name"] == "demo-grpo-judge-1":
            child = copy.deepcopy(child)
            child["status"] = {"conditions": [{
                "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                "message": "ReplicaSet has timed out progressing."}]}  # fmt: skip
        broken.append(child)
    failed = plan(run.model_copy(update={"status": first.status}), Observed(broken, now="t1"))
    grpo = stage_of(failed, "grpo")
    assert grpo.phase == "Failed"
    assert grpo.message == (
        "judge server demo-grpo-judge-1 failed: ReplicaSet has timed out progressing."
    )
    assert not any(c["kind"] == "Deployment" for c in failed.children)  # GPUs freed


@pytest.mark.parametrize("stage_type", ["ppo", "grpo"])
def test_online_judge_rewards_render_for_ppo_and_grpo(stage_type: str) -> None:
    stage = {**GRPO_JUDGE, "name": stage_type, "type": stage_type,
             "reward": {"judge": {"mode": "pointwise"}}}  # fmt: skip
    run = run_with({**JUDGE, "engine": "lmdeploy", "replicas": 1}, stages=[stage])
    p = plan(run, Observed(now="t0"))
    assert not refused(p)
    judge = [c for c in p.children if c["metadata"]["labels"].get(builders.LABEL_COMPONENT)
             == "judge" and c["kind"] == "Deployment"]  # fmt: skip
    assert [container(d)["command"][:3] for d in judge] == [["lmdeploy", "serve", "api_server"]]
    config = builders.build_stage_config(run, run.spec.stages[0])
    assert config.judge is not None and config.judge.mode == "pointwise"
    assert config.judge.engine == "lmdeploy" and config.judge.urls == [
        f"http://demo-{stage_type}-judge-0.team-a.svc:8000"
    ]
