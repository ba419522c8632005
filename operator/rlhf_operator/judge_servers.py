"""Pure builders of the AI judge's servers: vLLM or lmdeploy `Deployment`s and `Service`s.

A judging stage (`feedback`, or `reward: {judge: {}}` on ppo/grpo) gets one Deployment and one
Service per `spec.judge.replicas`, named `<run>-<stage>-judge-<i>` and labelled
`rlhf.dev/component=judge`, for as long as the stage runs: the planner starts its trainer once
they are available and removes them when the stage finishes. They are built like the rollout
servers (`servers.py`: container port `http`, probes, workspace mount, lmdeploy's
`--enable-metrics` where its version has it), with two differences: the served model name is
`judge`, and vLLM's dev mode stays off (nothing reloads a judge's weights).
"""

from __future__ import annotations

from typing import Any

from rlhf_operator import api, builders, servers

Obj = dict[str, Any]

COMPONENT_JUDGE = "judge"
_SERVED_NAME_FLAG = {"vllm": "--served-model-name", "lmdeploy": "--model-name"}


def server_settings(judge: api.Judge) -> api.Rollout:
    """The judge's server settings, in the shape the server builders take."""
    return api.Rollout(
        engine=judge.engine,
        replicas=judge.replicas,
        tensor_parallel_size=judge.tensor_parallel_size,
        image=judge.image,
        max_model_len=judge.max_model_len,
        gpu_memory_utilization=judge.gpu_memory_utilization,
        startup_timeout_seconds=judge.startup_timeout_seconds,
        resources=judge.resources,
    )


def judge_command(judge: api.Judge) -> list[str]:
    """`vllm serve ...` or `lmdeploy serve api_server ...`, answering to the name `judge`."""
    settings = server_settings(judge)
    if judge.engine == "vllm":
        argv = servers.vllm_command(judge.model, settings)
    else:
        argv = servers.lmdeploy_command(judge.model, settings)
    flag = _SERVED_NAME_FLAG[judge.engine]
    argv[argv.index(flag) + 1] = builders.SERVED_JUDGE
    return argv


def _relabel(obj: Obj) -> Obj:
    """Mark a server object built by servers.py as the judge's (labels and selectors)."""
    spec = obj["spec"]
    for labels in (
        obj["metadata"]["labels"],
        spec.get("selector", {}).get("matchLabels"),  # Deployment
        spec.get("template", {}).get("metadata", {}).get("labels"),
        spec.get("selector") if obj["kind"] == "Service" else None,
    ):
        if labels is not None:
            labels[builders.LABEL_COMPONENT] = COMPONENT_JUDGE
    return obj


def _judge_env(env: list[Obj], judge: api.Judge) -> list[Obj]:
    """No dev-mode routes, and the judge model's own hub token (not the policy's)."""
    drop = {servers.VLLM_DEV_MODE_ENV, "HF_TOKEN"}
    out = [e for e in env if e["name"] not in drop]
    token = judge.model.token_secret_ref
    if token is not None:
        ref = {"secretKeyRef": {"name": token.name, "key": token.key}}
        out.append({"name": "HF_TOKEN", "valueFrom": ref})
    return out


def judge_children(run: api.RLHFRun, stage: api.Stage) -> list[Obj]:
    """Every judge server of a judging stage, Deployment then Service per replica; [] for
    stages that do not use the judge."""
    judge = run.spec.judge
    if judge is None or not builders.uses_judge(stage):
        return []
    settings = server_settings(judge)
    command = judge_command(judge)
    out: list[Obj] = []
    for replica in range(judge.replicas):
        name = builders.judge_name(run, stage.name, replica)
        container = servers.server_container(run, settings, command)
        container["env"] = _judge_env(container["env"], judge)
        deployment = servers.build_server_deployment(
            run, stage.name, name, replica, container, judge.startup_timeout_seconds
        )
        out.append(_relabel(deployment))
        out.append(_relabel(servers.build_server_service(run, stage.name, name, replica)))
    return out
