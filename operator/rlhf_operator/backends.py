"""Trainer backends behind one interface: Kubeflow `PyTorchJob` and Kubeflow Trainer v2 `TrainJob`.

A backend builds a stage's job from the typed spec, reads the job's phase from the status its
controller writes, and tells the local executor how to run the job's pods as processes. The
planner, the kube executor and the local executor go through `backend_for` / `for_kind` and
never branch on the kind themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from rlhf_operator import api, builders
from rlhf_operator.objects import Obj

TRAINJOB_RUNTIME = "torch-distributed"  # the ClusterTrainingRuntime Kubeflow Trainer installs
TRAINJOB_NODE = "node"  # the replicated job and container name in that runtime
# The `manager` key of the operator's spec.runtimePatches entry. Each writer owns its own
# entry (Kueue's is kueue.x-k8s.io/manager); the operator never touches the others.
TRAINJOB_MANAGER = "rlhf.dev/operator"


@dataclass(frozen=True)
class LocalLaunch:
    """How the local executor runs a job: `replicas` copies of one pod spec."""

    pod: Obj
    replicas: int
    nproc_per_node: str


class TrainerBackend(Protocol):
    name: ClassVar[str]  # the value of spec.trainer.backend
    api_version: ClassVar[str]
    kind: ClassVar[str]
    plural: ClassVar[str]
    suspend_path: ClassVar[tuple[str, ...]]

    def build_job(self, run: api.RLHFRun, stage: api.Stage) -> Obj: ...

    def job_phase(self, job: Obj) -> api.Phase: ...

    def status_for(self, phase: api.Phase, message: str = "") -> Obj:
        """The status this backend's controller reports in `phase` (local executor, tests)."""
        ...

    def local_launch(self, job: Obj) -> LocalLaunch: ...


def _true_conditions(job: Obj) -> list[Obj]:
    status = job.get("status") or {}
    return [c for c in status.get("conditions") or [] if c.get("status") == "True"]


class PyTorchJobBackend:
    """kubeflow.org/v1 PyTorchJob, run by the Kubeflow training operator."""

    name: ClassVar[str] = "pytorchjob"
    api_version: ClassVar[str] = "kubeflow.org/v1"
    kind: ClassVar[str] = "PyTorchJob"
    plural: ClassVar[str] = "pytorchjobs"
    suspend_path: ClassVar[tuple[str, ...]] = ("spec", "runPolicy", "suspend")

    def build_job(self, run: api.RLHFRun, stage: api.Stage) -> Obj:
        return builders.build_pytorchjob(run, stage)

    def job_phase(self, job: Obj) -> api.Phase:
        """The newest true condition wins (the training operator appends them in order)."""
        conditions = _true_conditions(job)
        if not conditions:
            return "Pending"
        phases: dict[str, api.Phase] = {
            "Succeeded": "Succeeded",
            "Failed": "Failed",
            "Suspended": "Suspended",
            "Running": "Running",
            "Restarting": "Running",
        }
        return phases.get(str(conditions[-1].get("type")), "Pending")

    def status_for(self, phase: api.Phase, message: str = "") -> Obj:
        types = {"Pending": "Created"}
        condition = {"type": types.get(phase, phase), "status": "True", "message": message}
        return {"conditions": [condition]}

    def local_launch(self, job: Obj) -> LocalLaunch:
        specs = job["spec"]["pytorchReplicaSpecs"]
        workers = specs.get("Worker", {}).get("replicas", 0)
        return LocalLaunch(
            pod=specs["Master"]["template"]["spec"],
            replicas=1 + int(workers),
            nproc_per_node=str(job["spec"].get("nprocPerNode", "1")),
        )


def trainjob_command(stage: api.Stage) -> list[str]:
    """torchrun takes nnodes, nproc-per-node, node rank and rendezvous from the PET_* env
    that Kubeflow Trainer's torch plugin injects, so the command names none of them."""
    config = f"{builders.CONFIG_MOUNT}/{builders.config_key(stage)}"
    return ["torchrun", "-m", "rlhf_trainer", stage.type, "--config", config]


def runtime_patch(template: Obj) -> Obj:
    """The operator's `spec.runtimePatches` entry (Kubeflow Trainer v2.2+): what the trainer
    pod `template`, the one a PyTorchJob's replicas get, adds to the runtime's `node` job.

    Its path is trainingRuntimeSpec -> JobSet template -> replicatedJobs[node] -> Job template
    -> pod template. It carries the labels, volumes and mounts, the pod and container
    securityContext (fsGroup makes a fresh workspace volume writable) and the service account;
    image, command, env and resources go through `spec.trainer`. Container ports cannot be
    patched (ContainerPatch has no `ports`): these pods declare only Trainer's rendezvous
    port, so a PodMonitor reaches rank 0's metrics port by address, not by port name.
    """
    pod = template["spec"]
    container = pod["containers"][0]
    node: Obj = {
        "name": TRAINJOB_NODE,
        "volumeMounts": container["volumeMounts"],
        "securityContext": container["securityContext"],
    }
    pod_patch: Obj = {
        "securityContext": pod["securityContext"],
        "volumes": pod["volumes"],
        "containers": [node],
    }
    if "serviceAccountName" in pod:
        pod_patch["serviceAccountName"] = pod["serviceAccountName"]
    pod_template = {"metadata": {"labels": template["metadata"]["labels"]}, "spec": pod_patch}
    replicated = {"name": TRAINJOB_NODE, "template": {"spec": {"template": pod_template}}}
    return {
        "manager": TRAINJOB_MANAGER,
        "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [replicated]}}},
    }


def node_pod_patch(job: Obj) -> Obj:
    """The pod template (metadata, spec) the operator's runtime patch gives the `node` job."""
    entry = next(p for p in job["spec"]["runtimePatches"] if p["manager"] == TRAINJOB_MANAGER)
    jobs = entry["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    node = next(j for j in jobs if j["name"] == TRAINJOB_NODE)
    return dict(node["template"]["spec"]["template"])


def build_trainjob(run: api.RLHFRun, stage: api.Stage) -> Obj:
    """A trainer.kubeflow.org/v1alpha1 TrainJob on the `torch-distributed` runtime, for
    Kubeflow Trainer v2.2 and later (`spec.runtimePatches`; v2.1's `podTemplateOverrides` is
    gone from the API, and a server asked for strict field validation refuses it).

    The runtime owns the pod template; ours reaches it through `spec.trainer` (image, command,
    env, resources, node and process counts) and the operator's own `runtimePatches` entry
    (`runtime_patch`). Gang scheduling is the runtime's `podGroupPolicy`, so `schedulerName`
    has no place here (the planner refuses it).
    """
    trainer = run.spec.trainer
    template = builders.trainer_pod_template(run, stage)
    container = template["spec"]["containers"][0]
    job_trainer: Obj = {
        "image": trainer.image,
        "command": trainjob_command(stage),
        "numNodes": trainer.nodes,
        "numProcPerNode": trainer.procs_per_node,
        "env": container["env"],
    }
    if "resources" in container:
        job_trainer["resourcesPerNode"] = container["resources"]
    job: Obj = {
        "apiVersion": TrainJobBackend.api_version,
        "kind": TrainJobBackend.kind,
        "metadata": builders.metadata(
            run, builders.child_name(run, stage.name), stage.name, "trainer"
        ),
        "spec": {
            "runtimeRef": {
                "name": TRAINJOB_RUNTIME,
                "apiGroup": "trainer.kubeflow.org",
                "kind": "ClusterTrainingRuntime",
            },
            "trainer": job_trainer,
            "runtimePatches": [runtime_patch(template)],
            "suspend": builders.create_suspended(run),
        },
    }
    return builders.with_config_hash(job, builders.build_configmap(run, stage))


class TrainJobBackend:
    """trainer.kubeflow.org/v1alpha1 TrainJob, run by Kubeflow Trainer v2 (as a JobSet)."""

    name: ClassVar[str] = "trainjob"
    api_version: ClassVar[str] = "trainer.kubeflow.org/v1alpha1"
    kind: ClassVar[str] = "TrainJob"
    plural: ClassVar[str] = "trainjobs"
    suspend_path: ClassVar[tuple[str, ...]] = ("spec", "suspend")

    def build_job(self, run: api.RLHFRun, stage: api.Stage) -> Obj:
        return build_trainjob(run, stage)

    def job_phase(self, job: Obj) -> api.Phase:
        """Conditions Failed/Complete/Suspended (a map by type, so no order); otherwise
        Running once a child Job of the JobSet has active, ready or finished pods."""
        true = {str(c.get("type")) for c in _true_conditions(job)}
        if "Failed" in true:
            return "Failed"
        if "Complete" in true:
            return "Succeeded"
        if "Suspended" in true:
            return "Suspended"
        jobs = (job.get("status") or {}).get("jobsStatus") or []
        counts = ("active", "ready", "succeeded")
        if any(int(j.get(key) or 0) > 0 for j in jobs for key in counts):
            return "Running"
        return "Pending"

    def status_for(self, phase: api.Phase, message: str = "") -> Obj:
        if phase in ("Pending", "Running"):
            active = 1 if phase == "Running" else 0
            counts = {"ready": 0, "succeeded": 0, "failed": 0, "suspended": 0}
            return {"jobsStatus": [{"name": TRAINJOB_NODE, "active": active, **counts}]}
        types = {"Succeeded": "Complete", "Failed": "Failed", "Suspended": "Suspended"}
        condition = {"type": types[phase], "status": "True", "reason": phase, "message": message}
        return {"conditions": [condition]}

    def local_launch(self, job: Obj) -> LocalLaunch:
        trainer = job["spec"]["trainer"]
        pod = node_pod_patch(job)["spec"]
        mounts = next(c for c in pod["containers"] if c["name"] == TRAINJOB_NODE)
        container = {
            "name": TRAINJOB_NODE,
            "image": trainer["image"],
            "command": trainer["command"],
            "env": trainer.get("env", []),
            "volumeMounts": mounts.get("volumeMounts", []),
        }
        return LocalLaunch(
            pod={"containers": [container], "volumes": pod.get("volumes", [])},
            replicas=int(trainer.get("numNodes", 1)),
            nproc_per_node=str(trainer.get("numProcPerNode", 1)),
        )


BACKENDS: dict[str, TrainerBackend] = {
    b.name: b for b in (PyTorchJobBackend(), TrainJobBackend())
}
JOB_KINDS: frozenset[str] = frozenset(b.kind for b in BACKENDS.values())


def backend_for(run: api.RLHFRun) -> TrainerBackend:
    return BACKENDS[run.spec.trainer.backend]


def for_kind(kind: str) -> TrainerBackend:
    for backend in BACKENDS.values():
        if backend.kind == kind:
            return backend
    raise KeyError(f"no trainer backend runs a {kind}")


def is_suspended(job: Obj) -> bool:
    value: Any = job
    for key in for_kind(job["kind"]).suspend_path:
        value = value.get(key) if isinstance(value, dict) else None
    return bool(value)


def build_stage_children(run: api.RLHFRun, stage: api.Stage) -> list[Obj]:
    """Every object a trainer stage needs, in creation order."""
    return [builders.build_configmap(run, stage), backend_for(run).build_job(run, stage)]
