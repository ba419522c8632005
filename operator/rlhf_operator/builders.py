"""Pure builders: one function of the typed spec per child object, returning a dict.

No I/O and no YAML templates. Every child carries the `rlhf.dev/{run,stage,component}` labels
and an owner reference to its RLHFRun, so deleting the run deletes its children.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from rlhf_operator import api

# Names, labels and ownership of every child live in children.py; re-exported because every
# builder and most callers read them here.
from rlhf_operator.children import KUEUE_QUEUE_LABEL as KUEUE_QUEUE_LABEL
from rlhf_operator.children import LABEL_COMPONENT as LABEL_COMPONENT
from rlhf_operator.children import LABEL_RUN as LABEL_RUN
from rlhf_operator.children import LABEL_STAGE as LABEL_STAGE
from rlhf_operator.children import MAX_NAME as MAX_NAME
from rlhf_operator.children import WORKSPACE_MOUNT as WORKSPACE_MOUNT
from rlhf_operator.children import child_name as child_name
from rlhf_operator.children import create_suspended as create_suspended
from rlhf_operator.children import held as held
from rlhf_operator.children import kueue_queued as kueue_queued
from rlhf_operator.children import labels as labels
from rlhf_operator.children import metadata as metadata
from rlhf_operator.children import owner_reference as owner_reference
from rlhf_operator.children import stage_model as stage_model
from rlhf_operator.children import stage_output_dir as stage_output_dir
from rlhf_operator.children import stage_token as stage_token
from rlhf_operator.children import token_env as token_env
from rlhf_operator.children import workspace_volume as workspace_volume
from rlhf_operator.objects import Obj
from rlhf_trainer.config import (
    Hyperparameters,
    JudgeProtocol,
    JudgeRequestOptions,
    JudgeTarget,
    RolloutClientOptions,
    RolloutTarget,
    StageConfig,
    stage_types,
)

ANNOTATION_HASH = "rlhf.dev/config-hash"
ANNOTATION_PROGRESS = "rlhf.dev/progress"  # written by the trainer's rank 0 on its own pod

CONFIG_MOUNT = "/etc/rlhf"
TRAINER_CONTAINER = "pytorch"  # the container name Kubeflow's PyTorchJob requires
METRICS_PORT_NAME = "metrics"  # rank 0's /metrics; the chart's PodMonitor selects it by name
METRICS_PORT = 9400
METRICS_PORT_ENV = "RLHF_METRICS_PORT"
# The trainer image's user (Dockerfile `USER 65532:65532`, home /home/trainer). Numeric, so the
# kubelet can check runAsNonRoot without reading /etc/passwd.
TRAINER_UID = 65532
TRAINER_HOME = "/home/trainer"
# Restricted Pod Security: no privilege escalation, no capabilities, the runtime's seccomp
# profile. Servers (upstream images, root) get these too; see servers.server_container.
DROP_PRIVILEGES: Obj = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
SECCOMP_DEFAULT: Obj = {"seccompProfile": {"type": "RuntimeDefault"}}
# Stage types that generate with rollout servers while they train.
ONLINE_STAGE_TYPES: frozenset[str] = stage_types(lambda kind: kind.online)


SERVER_PORT = 8000  # the rollout and judge servers' container port, named `http`
SERVED_MODEL = "policy"  # the name rollout servers answer to (--served-model-name)


def rollout_name(run: api.RLHFRun, stage: str, replica: int) -> str:
    """Deployment and Service name of one rollout server replica."""
    return child_name(run, stage, f"rollout-{replica}")


def is_online(stage: api.Stage) -> bool:
    """ppo, grpo, and rrhf with `rrhf.online`: stages that learn from the policy's own samples."""
    online_rrhf = stage.type == "rrhf" and stage.rrhf is not None and stage.rrhf.online
    return stage.type in ONLINE_STAGE_TYPES or online_rrhf


def uses_rollout(stage: api.Stage) -> bool:
    """Online stages generate with rollout servers; a feedback stage with `rollout` samples
    the responses it judges from them."""
    return is_online(stage) or (
        stage.type == "feedback" and stage.rollout is not None
    )


def rollout_target(run: api.RLHFRun, stage: api.Stage) -> RolloutTarget | None:
    """How the trainer of an online stage reaches its servers: one Service URL per replica
    (none when the trainer generates itself, engine `trainer`)."""
    rollout = stage.rollout
    if not uses_rollout(stage):
        return None
    rollout = rollout or api.Rollout()
    namespace = run.metadata.namespace
    urls = [
        f"http://{rollout_name(run, stage.name, i)}.{namespace}.svc:{SERVER_PORT}"
        for i in range(rollout.replicas)
        if rollout.engine != api.IN_TRAINER  # the trainer generates; no servers to reach
    ]
    options = {f: getattr(rollout, f) for f in RolloutClientOptions.model_fields}
    return RolloutTarget(
        engine=rollout.engine,
        urls=urls,
        served_model=SERVED_MODEL,
        weight_sync=rollout.weight_sync,
        lora_adapter=f"{SERVED_MODEL}-lora" if stage.lora is not None else None,
        **options,
    )


SERVED_JUDGE = "judge"  # the name judge servers answer to


def uses_judge(stage: api.Stage) -> bool:
    """Feedback stages, and online stages rewarded by the judge, get judge servers."""
    return stage.type == "feedback" or (stage.reward is not None and stage.reward.judge is not None)


def judge_name(run: api.RLHFRun, stage: str, replica: int) -> str:
    """Deployment and Service name of one judge server replica (one set per judging stage)."""
    return child_name(run, stage, f"judge-{replica}")


def judge_target(run: api.RLHFRun, stage: api.Stage) -> JudgeTarget | None:
    """How a judging stage reaches the judge: Service URLs, protocol and request options."""
    judge = run.spec.judge
    if judge is None or not uses_judge(stage):
        return None
    namespace = run.metadata.namespace
    urls = [
        f"http://{judge_name(run, stage.name, i)}.{namespace}.svc:{SERVER_PORT}"
        for i in range(judge.replicas)
    ]
    calls = (stage.reward.judge if stage.reward else None) or stage.feedback
    requests = JudgeRequestOptions(
        **{f: getattr(calls, f) for f in JudgeRequestOptions.model_fields} if calls else {}
    )
    return JudgeTarget(
        **{f: getattr(judge, f) for f in JudgeProtocol.model_fields},
        engine=judge.engine,
        urls=urls,
        served_model=SERVED_JUDGE,
        model=judge.model,
        requests=requests,
        startup_timeout_seconds=judge.startup_timeout_seconds,
        mode=stage.reward.judge.mode if stage.reward and stage.reward.judge else None,
    )


# PPO's own defaults where a stage leaves a hyperparameter unset (docs/ALGORITHMS.md, from
# MOSS-RLHF): policy lr 5e-7, AdamW betas (0.9, 0.95), train minibatch 32.
PPO_HYPERPARAMETERS: dict[str, Any] = {
    "learning_rate": 5e-7,
    "adam_betas": (0.9, 0.95),
    "batch_size": 32,
}


def stage_hyperparameters(stage: api.Stage) -> Hyperparameters:
    """The stage's hyperparameters, with its algorithm's defaults for the fields it left unset
    (rendered into the config, so the trainer and the user see the values in effect)."""
    hp = stage.hyperparameters
    if stage.type != "ppo":
        return hp
    unset = {k: v for k, v in PPO_HYPERPARAMETERS.items() if k not in hp.model_fields_set}
    return hp.model_copy(update=unset)


def _reward_fields(run: api.RLHFRun, stage: api.Stage) -> dict[str, Any]:
    """reward.from becomes the reward stage's final/ folder; reward.function passes through."""
    reward = stage.reward
    if reward is None:
        return {}
    out: dict[str, Any] = {}
    if reward.from_ is not None:
        out["reward_model_path"] = f"{stage_output_dir(run, reward.from_)}/final"
    if reward.function is not None:
        out["reward_function"] = reward.function
    return out


def _policy_paths(run: api.RLHFRun, stage: api.Stage) -> dict[str, str] | None:
    """evaluate.policies: each named stage's final/ folder."""
    if stage.evaluate is None or not stage.evaluate.policies:
        return None
    return {name: f"{stage_output_dir(run, name)}/final" for name in stage.evaluate.policies}


def build_stage_config(run: api.RLHFRun, stage: api.Stage) -> StageConfig:
    # Imported here: env_servers builds on this module.
    from rlhf_operator.env_servers import environment_target

    return StageConfig(
        rollout=rollout_target(run, stage),
        judge=judge_target(run, stage),
        environment=environment_target(run, stage),
        **_reward_fields(run, stage),
        run=run.metadata.name,
        stage=stage.name,
        type=stage.type,
        model=stage_model(run, stage),
        dataset=stage.dataset,
        output_dir=stage_output_dir(run, stage.name),
        hyperparameters=stage_hyperparameters(stage),
        sft=stage.sft,
        reward_model=stage.reward_model,
        dpo=stage.dpo,
        rrhf=stage.rrhf,
        ppo=stage.ppo,
        grpo=stage.grpo,
        feedback=stage.feedback,
        evaluate=stage.evaluate,
        lora=stage.lora,
        policies=_policy_paths(run, stage),
    )


def config_key(stage: api.Stage) -> str:
    return f"{stage.name}.yaml"


def build_configmap(run: api.RLHFRun, stage: api.Stage) -> Obj:
    """The ConfigMap holding the stage's rendered trainer config."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(run, child_name(run, stage.name, "config"), stage.name, "config"),
        "data": {config_key(stage): build_stage_config(run, stage).to_yaml()},
    }


def trainer_command(run: api.RLHFRun, stage: api.Stage) -> list[str]:
    """torchrun argv; every spec string is a separate argv item, never through a shell.

    The node rank and rendezvous address are `$(VAR)` references that the kubelet expands from
    the env Kubeflow's training operator injects (RANK is the pod's replica index there).
    """
    trainer = run.spec.trainer
    return [
        "torchrun",
        f"--nnodes={trainer.nodes}",
        f"--nproc-per-node={trainer.procs_per_node}",
        "--node-rank=$(RANK)",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
        "-m",
        "rlhf_trainer",
        stage.type,
        "--config",
        f"{CONFIG_MOUNT}/{config_key(stage)}",
    ]


def gpu_resources(resources: api.ResourceRequirements, gpus: int) -> Obj:
    """Container resources with `gpus` nvidia.com/gpu in both requests and limits."""
    return _resources(resources, gpus)


def _resources(resources: api.ResourceRequirements, gpus: int) -> Obj:
    out: Obj = {}
    if resources.requests:
        out["requests"] = dict(resources.requests)
    limits = dict(resources.limits)
    if gpus:
        limits["nvidia.com/gpu"] = gpus
        out.setdefault("requests", {})["nvidia.com/gpu"] = gpus
    if limits:
        out["limits"] = limits
    return out


def _env(run: api.RLHFRun, stage: api.Stage) -> list[Obj]:
    env: list[Obj] = [
        {"name": "RLHF_WORKSPACE", "value": WORKSPACE_MOUNT},
        {"name": "HF_HOME", "value": f"{WORKSPACE_MOUNT}/.cache/huggingface"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": METRICS_PORT_ENV, "value": str(METRICS_PORT)},
        # The downward API tells rank 0 which pod to annotate with its progress.
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        # Rank 0 hosts the NCCL weight-transfer rendezvous that rollout servers join.
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]
    return env + token_env(stage_token(run, stage))


def _volumes(run: api.RLHFRun, configmap: str) -> list[Obj]:
    return [
        workspace_volume(run),
        {"name": "config", "configMap": {"name": configmap}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        # The root filesystem is read-only: torchrun, torch and triton write under /tmp and HOME.
        {"name": "tmp", "emptyDir": {}},
        {"name": "home", "emptyDir": {}},
    ]


def trainer_pod_template(run: api.RLHFRun, stage: api.Stage) -> Obj:
    trainer = run.spec.trainer
    container: Obj = {
        "name": TRAINER_CONTAINER,
        "image": trainer.image,
        "command": trainer_command(run, stage),
        "env": _env(run, stage),
        "volumeMounts": [
            {"name": "workspace", "mountPath": WORKSPACE_MOUNT},
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "home", "mountPath": TRAINER_HOME},
        ],
        "ports": [{"name": METRICS_PORT_NAME, "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "securityContext": {**copy.deepcopy(DROP_PRIVILEGES), "readOnlyRootFilesystem": True},
    }
    resources = _resources(trainer.resources, trainer.gpus_per_node)
    if resources:
        container["resources"] = resources
    pod: Obj = {
        "containers": [container],
        "volumes": _volumes(run, child_name(run, stage.name, "config")),
        # fsGroup: the workspace volume is group-owned by the trainer's group, so a fresh PVC
        # is writable by it.
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            **copy.deepcopy(SECCOMP_DEFAULT),
        },
    }
    if trainer.scheduler_name:
        pod["schedulerName"] = trainer.scheduler_name
    if trainer.service_account_name:
        pod["serviceAccountName"] = trainer.service_account_name
    # The queue label goes on the job alone: on a pod it makes Kueue admit that pod by itself
    # (its pod integration), so the job's pods would not be admitted together.
    pod_labels = labels(run, stage.name, "trainer")
    pod_labels.pop(KUEUE_QUEUE_LABEL, None)
    return {"metadata": {"labels": pod_labels}, "spec": pod}


def build_pytorchjob(run: api.RLHFRun, stage: api.Stage) -> Obj:
    """A kubeflow.org/v1 PyTorchJob: one Master and `nodes - 1` Workers running torchrun."""
    trainer = run.spec.trainer
    template = trainer_pod_template(run, stage)
    replica = {"restartPolicy": "OnFailure", "template": template}
    replicas: Obj = {"Master": {"replicas": 1, **replica}}
    if trainer.nodes > 1:
        # Only rank 0 (the Master) serves /metrics: Workers declare no metrics port, so the
        # trainers' PodMonitor (port: metrics) has no dead targets.
        worker = copy.deepcopy(template)
        del worker["spec"]["containers"][0]["ports"]
        replicas["Worker"] = {"replicas": trainer.nodes - 1, "restartPolicy": "OnFailure",
                              "template": worker}  # fmt: skip
    run_policy: Obj = {
        "cleanPodPolicy": "None", "backoffLimit": 3, "suspend": create_suspended(run)
    }  # fmt: skip
    if trainer.scheduler_name:
        run_policy["schedulingPolicy"] = {"minAvailable": trainer.nodes}
    job: Obj = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": metadata(run, child_name(run, stage.name), stage.name, "trainer"),
        "spec": {
            "nprocPerNode": str(trainer.procs_per_node),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": replicas,
        },
    }
    return with_config_hash(job, build_configmap(run, stage))


def with_config_hash(job: Obj, configmap: Obj) -> Obj:
    """Annotate a job with a hash of what it runs (its spec, less suspension, and its config).

    A changed hash means the job must be recreated; suspension alone is patched in place.
    """
    spec = json.loads(json.dumps(job["spec"]))
    spec.pop("suspend", None)  # TrainJob
    spec.get("runPolicy", {}).pop("suspend", None)  # PyTorchJob
    payload = json.dumps([spec, configmap["data"]], sort_keys=True)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
    job["metadata"]["annotations"] = {ANNOTATION_HASH: digest}
    return job
