"""Who a child object is: its name, its `rlhf.dev/{run,stage,component}` labels and its owner
reference to the RLHFRun (so deleting the run deletes it), and the pieces every pod of a run
shares (the workspace volume, the hub token). Re-exported by builders.py.
"""

from __future__ import annotations

import hashlib

from rlhf_operator import api
from rlhf_operator.objects import Obj
from rlhf_trainer.config import ModelSource, SecretKeyRef

LABEL_RUN = "rlhf.dev/run"
LABEL_STAGE = "rlhf.dev/stage"
LABEL_COMPONENT = "rlhf.dev/component"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
WORKSPACE_MOUNT = "/workspace"
MAX_NAME = 63


def child_name(run: api.RLHFRun, stage: str, suffix: str = "") -> str:
    """`<run>-<stage>[-suffix]`, shortened with a stable hash when over a DNS label's length."""
    base = f"{run.metadata.name}-{stage}"
    tail = f"-{suffix}" if suffix else ""
    if len(base) + len(tail) <= MAX_NAME:
        return base + tail
    digest = hashlib.sha256(base.encode()).hexdigest()[:8]
    keep = MAX_NAME - len(tail) - len(digest) - 1
    return f"{base[:keep].rstrip('-')}-{digest}{tail}"


def labels(run: api.RLHFRun, stage: str, component: str) -> dict[str, str]:
    out = {LABEL_RUN: run.metadata.name, LABEL_STAGE: stage, LABEL_COMPONENT: component}
    queue = run.metadata.labels.get(KUEUE_QUEUE_LABEL)
    if queue is not None:
        out[KUEUE_QUEUE_LABEL] = queue
    return out


def kueue_queued(run: api.RLHFRun) -> bool:
    """Whether Kueue queues the run (the queue-name label on the RLHFRun). Kueue then owns each
    job's `suspend` after creation: the job is created suspended and Kueue un-suspends it on
    admission, so `spec.suspend` is not the operator's gate (`held`)."""
    return KUEUE_QUEUE_LABEL in run.metadata.labels


def held(run: api.RLHFRun) -> bool:
    """Whether the operator itself holds the run (`spec.suspend` on a run Kueue does not queue):
    its job suspended, its servers at zero replicas, its phase Suspended."""
    return run.spec.suspend and not kueue_queued(run)


def create_suspended(run: api.RLHFRun) -> bool:
    """The `suspend` a new job is created with: a queued job waits for Kueue's admission (its
    webhook would set it too), a held one for `spec.suspend: false`."""
    return run.spec.suspend or kueue_queued(run)


def owner_reference(run: api.RLHFRun) -> Obj:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": run.metadata.name,
        "uid": run.metadata.uid or "",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(run: api.RLHFRun, name: str, stage: str, component: str) -> Obj:
    return {
        "name": name,
        "namespace": run.metadata.namespace,
        "labels": labels(run, stage, component),
        "ownerReferences": [owner_reference(run)],
    }


def stage_output_dir(run: api.RLHFRun, stage: str) -> str:
    """Workspace-relative folder of a stage: final/, checkpoints/, progress.json."""
    return f"{run.metadata.name}/{stage}"


def stage_model(run: api.RLHFRun, stage: api.Stage) -> ModelSource:
    """The initial weights of a stage: its own `model`, the output of its `from` stage, or else
    the base model."""
    if stage.model is not None:
        return stage.model
    if stage.from_ is None:
        return run.spec.model
    return ModelSource(path=f"{stage_output_dir(run, stage.from_)}/final")


def stage_token(run: api.RLHFRun, stage: api.Stage) -> SecretKeyRef | None:
    """The hub token a stage's trainer and rollout servers read its model with: its own
    `model`'s if it names one, else spec.model's."""
    own = stage.model.token_secret_ref if stage.model is not None else None
    return own or run.spec.model.token_secret_ref


def workspace_volume(run: api.RLHFRun) -> Obj:
    """The volume `workspace`: the run's claim, or an emptyDir."""
    claim = run.spec.workspace.claim_name
    if claim:
        return {"name": "workspace", "persistentVolumeClaim": {"claimName": claim}}
    return {"name": "workspace", "emptyDir": {}}


def token_env(token: SecretKeyRef | None) -> list[Obj]:
    """`HF_TOKEN` from the model's hub-token Secret; [] without one."""
    if token is None:
        return []
    ref = {"secretKeyRef": {"name": token.name, "key": token.key}}
    return [{"name": "HF_TOKEN", "valueFrom": ref}]
