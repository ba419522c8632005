"""Pure builders of the inference servers: vLLM or lmdeploy `Deployment`s and their `Service`s.

An online stage (ppo, grpo, rrhf with `rrhf.online`) gets one Deployment and one Service per
rollout replica, named `<run>-<stage>-rollout-<i>`, so the trainer can reach every replica by
name (it generates on all of them and syncs the weights of each). The servers start from the
stage's initial policy; the trainer replaces their weights as it learns (`rollout.weightSync`).

The container port is named `http`; the startup probe waits on `/v1/models` (the weights are
loaded), readiness and liveness use `/health`. The workspace volume is mounted at /workspace
as in trainer pods, because the disk weight sync hands servers a folder on it, and /dev/shm
is a memory emptyDir (tensor-parallel workers share memory through it). vLLM runs with
`VLLM_SERVER_DEV_MODE=1`, which enables the weight-reload routes (/pause, /collective_rpc,
/reset_prefix_cache, /resume).

One builder, `server_children`, makes every inference server from a `ServerRole`: the rollout
role here, the judge's in judge_servers.py.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass

from rlhf_operator import api, builders, engine_versions
from rlhf_operator.objects import Obj
from rlhf_trainer.config import ModelSource, SecretKeyRef

COMPONENT_ROLLOUT = "rollout"
LABEL_REPLICA = "rlhf.dev/replica"
SERVER_CONTAINER = "server"
VLLM_DEV_MODE_ENV = "VLLM_SERVER_DEV_MODE"
# The upstream vLLM and lmdeploy images run as root and are not built for another user
# (torch's compile cache looks the user up in /etc/passwd; caches live under /root), so
# servers keep root but lose everything else root brings: no privilege escalation, the
# runtime's seccomp profile, and every capability dropped except DAC_OVERRIDE, which root
# needs to write into workspace folders the trainer (uid 65532) created, such as the shared
# HF_HOME cache. The root filesystem stays writable for the same caches. docs/RELIABILITY.md.
SERVER_SECURITY: Obj = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"], "add": ["DAC_OVERRIDE"]},
    **builders.SECCOMP_DEFAULT,
}


def model_argument(model: ModelSource) -> str:
    """What a server loads: a hub id, or the folder under the workspace mount."""
    if model.name is not None:
        return model.name
    assert model.path is not None
    if model.path.startswith("/"):
        return model.path
    return f"{builders.WORKSPACE_MOUNT}/{model.path}"


# vLLM accepts these LoRA ranks only (`--max-lora-rank`).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


def vllm_command(
    model: ModelSource,
    rollout: api.Rollout,
    lora_rank: int | None = None,
    served_name: str = builders.SERVED_MODEL,
) -> list[str]:
    """`vllm serve MODEL ...`, the entry point of the vllm/vllm-openai image, answering to
    `served_name`. With `lora_rank` the server takes one runtime-loaded LoRA adapter of up to
    that rank (LoRA stages sync only their adapters)."""
    argv = ["vllm", "serve", model_argument(model)]
    if model.revision is not None:
        argv += ["--revision", model.revision]
    argv += [
        "--served-model-name",
        served_name,
        "--port",
        str(builders.SERVER_PORT),
        "--tensor-parallel-size",
        str(rollout.tensor_parallel_size),
        "--dtype",
        rollout.dtype,
        "--gpu-memory-utilization",
        str(rollout.gpu_memory_utilization),
    ]
    if rollout.max_model_len is not None:
        argv += ["--max-model-len", str(rollout.max_model_len)]
    if rollout.weight_sync == "nccl":
        argv += ["--weight-transfer-config", json.dumps({"backend": "nccl"})]
    if lora_rank is not None:
        rank = next((r for r in VLLM_LORA_RANKS if r >= lora_rank), VLLM_LORA_RANKS[-1])
        argv += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", "1"]
    return argv


def lmdeploy_command(
    model: ModelSource, rollout: api.Rollout, served_name: str = builders.SERVED_MODEL
) -> list[str]:
    """`lmdeploy serve api_server MODEL ...`, the entry point of the openmmlab/lmdeploy image,
    answering to `served_name` and serving /metrics (the chart's PodMonitor scrapes it):
    `--enable-metrics` before lmdeploy 0.11, nothing after (engine_versions)."""
    argv = ["lmdeploy", "serve", "api_server", model_argument(model)]
    if model.revision is not None:
        argv += ["--revision", model.revision]
    argv += [
        "--model-name",
        served_name,
        "--server-port",
        str(builders.SERVER_PORT),
        "--tp",
        str(rollout.tensor_parallel_size),
        "--cache-max-entry-count",
        str(rollout.gpu_memory_utilization),
    ]
    if rollout.dtype in ("bfloat16", "float16"):
        argv += ["--dtype", rollout.dtype]
    if rollout.max_model_len is not None:
        argv += ["--session-len", str(rollout.max_model_len)]
    image = engine_versions.server_image(rollout.engine, rollout.image)
    return argv + engine_versions.lmdeploy_metrics_flags(engine_versions.tag_version(image))


@dataclass(frozen=True)
class ServerRole:
    """What sets one role's inference servers apart from another's. Rollout servers serve the
    stage's policy and take weight reloads (vLLM's dev-mode routes, runtime LoRA); the judge
    (judge_servers.judge_role) serves its own model under its own name and reloads nothing."""

    component: str  # the `rlhf.dev/component` label
    settings: api.Rollout  # engine, replicas, parallelism, image, resources, startup timeout
    model: ModelSource
    served_name: str  # what clients ask for (--served-model-name, lmdeploy --model-name)
    name: Callable[[api.RLHFRun, str, int], str]  # (run, stage, replica) -> object name
    token: SecretKeyRef | None  # the hub token `model` downloads with
    dev_mode: bool  # vLLM's weight-reload routes
    lora_rank: int | None = None  # one runtime-loaded LoRA adapter of up to this rank


def server_command(role: ServerRole) -> list[str]:
    """The role's `vllm serve ...` or `lmdeploy serve api_server ...` argv."""
    if role.settings.engine == "vllm":
        return vllm_command(role.model, role.settings, role.lora_rank, role.served_name)
    return lmdeploy_command(role.model, role.settings, role.served_name)


def probe(path: str, period: int, failures: int) -> Obj:
    """An HTTP GET probe on the container port `http`."""
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 5,
    }


def _server_env(role: ServerRole) -> list[Obj]:
    env: list[Obj] = [
        {"name": "HF_HOME", "value": f"{builders.WORKSPACE_MOUNT}/.cache/huggingface"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if role.dev_mode and role.settings.engine == "vllm":
        env.append({"name": VLLM_DEV_MODE_ENV, "value": "1"})
    env += builders.token_env(role.token)
    if role.lora_rank is not None:
        env.append({"name": VLLM_RUNTIME_LORA_ENV, "value": "True"})
    return env


def _volumes(run: api.RLHFRun) -> list[Obj]:
    return [builders.workspace_volume(run), {"name": "dshm", "emptyDir": {"medium": "Memory"}}]


def server_container(role: ServerRole, command: list[str]) -> Obj:
    rollout = role.settings
    container: Obj = {
        "name": SERVER_CONTAINER,
        "image": engine_versions.server_image(rollout.engine, rollout.image),
        "command": command,
        "env": _server_env(role),
        "ports": [{"name": "http", "containerPort": builders.SERVER_PORT, "protocol": "TCP"}],
        # Weights load (and may download) before /v1/models answers: allow startupTimeout.
        "startupProbe": probe(
            "/v1/models", 10, max(1, int(rollout.startup_timeout_seconds // 10))
        ),
        "readinessProbe": probe("/health", 5, 3),
        "livenessProbe": probe("/health", 10, 6),
        "volumeMounts": [
            {"name": "workspace", "mountPath": builders.WORKSPACE_MOUNT},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        "securityContext": copy.deepcopy(SERVER_SECURITY),
    }
    resources = builders.gpu_resources(rollout.resources, rollout.tensor_parallel_size)
    if resources:
        container["resources"] = resources
    return container


def build_server_deployment(
    run: api.RLHFRun,
    stage: str,
    name: str,
    replica: int,
    container: Obj,
    startup_s: float,
    component: str = COMPONENT_ROLLOUT,
    volumes: list[Obj] | None = None,
) -> Obj:
    """A one-pod Deployment; `Recreate`, so a changed spec never holds two pods' GPUs.

    Without the run's Kueue queue label, on the Deployment and its pods: Kueue v0.19 enables
    its deployment and pod integrations by default, and would admit each server pod on its own,
    apart from the job's gang admission (docs/INSTALL.md, "Kueue")."""
    meta = builders.metadata(run, name, stage, component)
    meta["labels"].pop(builders.KUEUE_QUEUE_LABEL, None)
    selector = {**builders.labels(run, stage, component), LABEL_REPLICA: str(replica)}
    selector.pop(builders.KUEUE_QUEUE_LABEL, None)
    meta["labels"][LABEL_REPLICA] = str(replica)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            # spec.suspend scales servers to zero: a paused run holds no GPUs. A queued run's
            # servers stay up: its trainer job waits for them, and Kueue for the job.
            "replicas": 0 if builders.held(run) else 1,
            "strategy": {"type": "Recreate"},
            "progressDeadlineSeconds": int(startup_s),
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": dict(meta["labels"])},
                "spec": {
                    "containers": [container],
                    "volumes": _volumes(run) if volumes is None else volumes,
                },
            },
        },
    }


def build_server_service(
    run: api.RLHFRun,
    stage: str,
    name: str,
    replica: int,
    component: str = COMPONENT_ROLLOUT,
    port_number: int = builders.SERVER_PORT,
) -> Obj:
    meta = builders.metadata(run, name, stage, component)
    meta["labels"][LABEL_REPLICA] = str(replica)
    selector = {**builders.labels(run, stage, component), LABEL_REPLICA: str(replica)}
    selector.pop(builders.KUEUE_QUEUE_LABEL, None)
    port = {"name": "http", "port": port_number, "targetPort": "http", "protocol": "TCP"}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {"selector": selector, "ports": [port]},
    }


def server_children(run: api.RLHFRun, stage: api.Stage, role: ServerRole) -> list[Obj]:
    """The role's servers for a stage: a Deployment then a Service per replica."""
    command = server_command(role)
    out: list[Obj] = []
    for replica in range(role.settings.replicas):
        name = role.name(run, stage.name, replica)
        container = server_container(role, command)
        startup_s = role.settings.startup_timeout_seconds
        out.append(
            build_server_deployment(
                run, stage.name, name, replica, container, startup_s, role.component
            )
        )
        out.append(build_server_service(run, stage.name, name, replica, role.component))
    return out


def rollout_role(run: api.RLHFRun, stage: api.Stage) -> ServerRole | None:
    """The rollout servers of a stage that generates with them; None for other stage types and
    when the trainer generates itself (engine `trainer`)."""
    if not builders.uses_rollout(stage):
        return None
    rollout = stage.rollout or api.Rollout()
    if rollout.engine == api.IN_TRAINER:
        return None
    return ServerRole(
        component=COMPONENT_ROLLOUT,
        settings=rollout,
        model=builders.stage_model(run, stage),
        served_name=builders.SERVED_MODEL,
        name=builders.rollout_name,
        token=builders.stage_token(run, stage),  # the token its trainer reads `model` with
        dev_mode=True,
        lora_rank=stage.lora.r if stage.lora is not None else None,
    )


def rollout_children(run: api.RLHFRun, stage: api.Stage) -> list[Obj]:
    """Every rollout server of an online stage, Deployment then Service per replica; []
    where `rollout_role` is None."""
    role = rollout_role(run, stage)
    return server_children(run, stage, role) if role is not None else []


def deployment_available(obj: Obj) -> bool:
    """Whether a Deployment reports its pod available (condition Available=True and an
    available replica)."""
    status = obj.get("status") or {}
    conditions = status.get("conditions") or []
    available = any(
        c.get("type") == "Available" and c.get("status") == "True" for c in conditions
    )
    return available and int(status.get("availableReplicas") or 0) >= 1


def deployment_failure(obj: Obj) -> str | None:
    """Why a Deployment will not become available (its progress deadline passed), or None."""
    for c in (obj.get("status") or {}).get("conditions") or []:
        if (
            c.get("type") == "Progressing"
            and c.get("status") == "False"
            and c.get("reason") == "ProgressDeadlineExceeded"
        ):
            meta = obj.get("metadata", {})
            name = meta.get("name", "?")
            component = (meta.get("labels") or {}).get(builders.LABEL_COMPONENT, "inference")
            detail = c.get("message") or "it did not become available in time"
            return f"{component} server {name} failed: {detail}"
    return None


@dataclass(frozen=True)
class Readiness:
    """Whether an online stage's servers are all available; else why it waits or failed."""

    ready: bool
    waiting: str | None = None
    failure: str | None = None


def readiness(wanted_servers: list[Obj], observed: list[Obj]) -> Readiness:
    """Read the observed Deployments of a stage's servers (`rollout_children`, and the judge's
    from `judge_servers.judge_children`): ready once every one is available."""
    wanted = {
        o["metadata"]["name"]: o["metadata"]["labels"].get(builders.LABEL_COMPONENT, "inference")
        for o in wanted_servers
        if o["kind"] == "Deployment"
    }
    if not wanted:
        return Readiness(ready=True)
    found = {
        o["metadata"]["name"]: o
        for o in observed
        if o.get("kind") == "Deployment" and o.get("metadata", {}).get("name") in wanted
    }
    for name, component in wanted.items():
        stub = {"metadata": {"name": name, "labels": {builders.LABEL_COMPONENT: component}}}
        failure = deployment_failure(found.get(name, stub))
        if failure is not None:
            return Readiness(ready=False, failure=failure)
    up = {n for n in wanted if n in found and deployment_available(found[n])}
    if len(up) == len(wanted):
        return Readiness(ready=True)
    counts = [
        f"{component} servers: {sum(1 for n in up if wanted[n] == component)}/"
        f"{sum(1 for c in wanted.values() if c == component)} available"
        for component in dict.fromkeys(wanted.values())
    ]
    return Readiness(ready=False, waiting="Waiting for " + ", ".join(counts))
