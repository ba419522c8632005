"""Pure builders of the AI judge's servers: vLLM or lmdeploy `Deployment`s and `Service`s.

A judging stage (`feedback`, or `reward: {judge: {}}` on ppo/grpo) gets one Deployment and one
Service per `spec.judge.replicas`, named `<run>-<stage>-judge-<i>` and labelled
`rlhf.dev/component=judge`, for as long as the stage runs: the planner starts its trainer once
they are available and removes them when the stage finishes. They are built by the rollout
servers' builder (`servers.server_children`: container port `http`, probes, workspace mount,
lmdeploy's `--enable-metrics` where its version has it) for the judge's `ServerRole`: its own
model and hub token, the served model name `judge`, and vLLM's dev mode off (nothing reloads a
judge's weights).
"""

from __future__ import annotations

from rlhf_operator import api, builders, servers
from rlhf_operator.objects import Obj

COMPONENT_JUDGE = "judge"


# What a judge's servers share with rollout servers, by field name; the rest of api.Rollout
# (weight sync, dtype, client options) keeps its defaults.
SERVER_FIELDS = (
    "engine",
    "replicas",
    "tensor_parallel_size",
    "image",
    "max_model_len",
    "gpu_memory_utilization",
    "startup_timeout_seconds",
    "resources",
)


def server_settings(judge: api.Judge) -> api.Rollout:
    """The judge's server settings, in the shape the server builders take."""
    return api.Rollout(**{f: getattr(judge, f) for f in SERVER_FIELDS})


def judge_role(judge: api.Judge) -> servers.ServerRole:
    """The judge's servers: its own model and token, answering to `judge`, no reload routes."""
    return servers.ServerRole(
        component=COMPONENT_JUDGE,
        settings=server_settings(judge),
        model=judge.model,
        served_name=builders.SERVED_JUDGE,
        name=builders.judge_name,
        token=judge.model.token_secret_ref,
        dev_mode=False,
    )


def judge_command(judge: api.Judge) -> list[str]:
    """`vllm serve ...` or `lmdeploy serve api_server ...`, answering to the name `judge`."""
    return servers.server_command(judge_role(judge))


def judge_children(run: api.RLHFRun, stage: api.Stage) -> list[Obj]:
    """Every judge server of a judging stage, Deployment then Service per replica; [] for
    stages that do not use the judge."""
    judge = run.spec.judge
    if judge is None or not builders.uses_judge(stage):
        return []
    return servers.server_children(run, stage, judge_role(judge))
