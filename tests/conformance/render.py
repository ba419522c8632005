"""What the conformance tier checks: every child of every stage of every example, and the chart.

`rlhf render` prints the children of the first unfinished stage only. Here the planner is driven
stage by stage with pure functions, as the kube executor would drive it: each stage's rollout
and judge Deployments are reported available (so its trainer job is rendered too), then its job
is reported succeeded by its backend, which moves the run on to the next stage.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from rlhf_operator import api, backends, builders, defaults
from rlhf_operator.planner import Observed, plan, refusal

Obj = dict[str, Any]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(ROOT.glob("manifests/examples/*.yaml"))
RUN_UID = "6f1b0c1e-3f43-4f0e-9a57-000000000001"  # the API server gives every run one


@dataclass(frozen=True)
class StageRender:
    """The children the operator creates for one stage, once the stages before it succeeded."""

    run: api.RLHFRun
    variant: str
    stage: api.Stage
    children: list[Obj]
    current_stage: str | None

    @property
    def where(self) -> str:
        return f"{self.run.metadata.name} [{self.variant}] stage {self.stage.name}"

    def jobs(self) -> list[Obj]:
        return [c for c in self.children if c.get("kind") in backends.JOB_KINDS]


def load_example(
    path: Path,
    name: str | None = None,
    labels: dict[str, str] | None = None,
    backend: str | None = None,
) -> api.RLHFRun:
    """An example as the operator receives it: in a namespace, with a uid (and a new name, more
    labels, or another trainer backend). SpecError if the operator refuses it."""
    doc = yaml.safe_load(path.read_text())
    doc["metadata"]["uid"] = RUN_UID
    if name is not None:
        doc["metadata"]["name"] = name
    if labels:
        doc["metadata"]["labels"] = {**(doc["metadata"].get("labels") or {}), **labels}
    if backend is not None:
        doc["spec"].setdefault("trainer", {})["backend"] = backend
    return api.parse_run(doc, str(path))


def _available(obj: Obj) -> Obj:
    if obj.get("kind") != "Deployment":
        return obj
    out = copy.deepcopy(obj)
    out["status"] = {
        "availableReplicas": 1,
        "conditions": [{"type": "Available", "status": "True"}],
    }
    return out


def _succeeded(obj: Obj, stage: str) -> Obj:
    labels = obj.get("metadata", {}).get("labels") or {}
    if obj.get("kind") not in backends.JOB_KINDS or labels.get(builders.LABEL_STAGE) != stage:
        return obj
    out = copy.deepcopy(obj)
    out["status"] = backends.for_kind(out["kind"]).status_for("Succeeded")
    return out


def _strip_status(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k != "status"}


def _key(obj: Obj) -> tuple[str, str]:
    return str(obj.get("kind")), str(obj.get("metadata", {}).get("name"))


def _created(observed: list[Obj], desired: list[Obj]) -> list[Obj]:
    """What the cluster holds after the executor applied `desired`: the objects observed
    before (with their status) and the new ones, Deployments available."""
    before = {_key(o): o for o in observed}
    return [before.get(_key(c)) or _available(c) for c in desired]


def stage_renders(run: api.RLHFRun, variant: str = "defaults") -> list[StageRender]:
    """Every stage's children, each rendered as if the stages before it had succeeded."""
    observed: list[Obj] = []
    out = []
    for stage in run.spec.stages:
        first = plan(run, Observed(children=observed)).children
        second = plan(run, Observed(children=_created(observed, first)))
        mine = [
            _strip_status(c)
            for c in second.children
            if (c.get("metadata", {}).get("labels") or {}).get(builders.LABEL_STAGE) == stage.name
        ]
        out.append(StageRender(run, variant, stage, mine, second.status.current_stage))
        observed = [_succeeded(c, stage.name) for c in _created(observed, second.children)]
    return out


def uses_engine(run: api.RLHFRun, engine: str) -> bool:
    rollouts = [s.rollout.engine for s in run.spec.stages if s.rollout is not None]
    judge = [run.spec.judge.engine] if run.spec.judge is not None else []
    return engine in [*rollouts, *judge]


def backend_runs(path: Path) -> list[tuple[str, api.RLHFRun]]:
    """The example as written, and on the TrainJob backend too where the operator accepts it
    there (the planner refuses `schedulerName` with TrainJob)."""
    run = load_example(path)
    out = [("defaults", run)]
    other = backends.TrainJobBackend.name
    if run.spec.trainer.backend != other:
        try:
            trainjob = load_example(path, backend=other)
        except api.SpecError:  # names that fit a PyTorchJob's derived names but not a JobSet's
            return out
        if refusal(trainjob) is None:
            out.append((f"backend {other}", trainjob))
    return out


def lmdeploy_runs(
    label: str, run: api.RLHFRun, versions: list[str]
) -> list[tuple[str, api.RLHFRun]]:
    """The run; and, when it serves with lmdeploy, the run with each lmdeploy version the
    upstream folder has a flag list for as the install default (`defaults.lmdeploy.image`,
    which the operator applies as it would in a cluster)."""
    out = [(label, run)]
    if uses_engine(run, "lmdeploy"):
        repository = api.DEFAULT_LMDEPLOY_IMAGE.rsplit(":", 1)[0]
        for version in versions:
            image = f"{repository}:v{version}"
            env = {"RLHF_DEFAULT_LMDEPLOY_IMAGE": image}
            out.append((f"{label}, lmdeploy {image}", defaults.with_install_defaults(run, env)))
    return out


@functools.lru_cache(maxsize=1)
def _chart_tests() -> ModuleType:
    """tests/unit/test_chart.py, whose values scenarios and render() this tier reuses."""
    path = ROOT / "tests" / "unit" / "test_chart.py"
    spec = importlib.util.spec_from_file_location("_conformance_test_chart", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def chart_values() -> dict[str, Obj]:
    """The values scenarios of tests/unit/test_chart.py, by name."""
    return dict(_chart_tests().SCENARIOS)


def chart_scenarios() -> dict[str, list[Obj]]:
    """The chart rendered under every values scenario of tests/unit/test_chart.py."""
    return {name: _chart_tests().render(values) for name, values in chart_values().items()}


# Pod templates -------------------------------------------------------------------------------


def _by_name(items: list[Obj], name: str) -> Obj | None:
    return next((i for i in items if i.get("name") == name), None)


def trainer_replicated_job(runtime: Obj) -> Obj:
    """The runtime's replicated job that runs the trainer (rank 0 lives there)."""
    jobs = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    step = "trainer.kubeflow.org/trainjob-ancestor-step"
    for job in jobs:
        labels = (job.get("template", {}).get("metadata") or {}).get("labels") or {}
        if labels.get(step) == "trainer":
            return dict(job)
    return dict(_by_name(jobs, backends.TRAINJOB_NODE) or jobs[0])


def _patch_container(container: Obj, patch: Obj) -> None:
    for key in ("env", "volumeMounts"):
        if key in patch:
            known = {i["name"] for i in container.get(key, [])}
            extra = [i for i in patch[key] if i["name"] not in known]
            container[key] = [*container.get(key, []), *extra]
    if "securityContext" in patch:
        container["securityContext"] = patch["securityContext"]


def trainjob_pod(job: Obj, runtime: Obj) -> Obj:
    """The pod template Kubeflow Trainer makes for the TrainJob's trainer nodes: the runtime's,
    with the job's `spec.trainer` on the `node` container and its `spec.runtimePatches` applied
    to that replicated job (labels, pod fields, container env, mounts, security context)."""
    rjob = trainer_replicated_job(runtime)
    pod: Obj = copy.deepcopy(rjob["template"]["spec"]["template"])
    spec = pod.setdefault("spec", {})
    labels = pod.setdefault("metadata", {}).setdefault("labels", {})
    node = _by_name(spec.get("containers", []), backends.TRAINJOB_NODE)
    trainer = job["spec"].get("trainer") or {}
    if node is not None:
        for key in ("image", "command", "args"):
            if key in trainer:
                node[key] = trainer[key]
        _patch_container(node, {"env": trainer.get("env", [])})
    for patch in job["spec"].get("runtimePatches") or []:
        template = (patch.get("trainingRuntimeSpec") or {}).get("template") or {}
        for target in (template.get("spec") or {}).get("replicatedJobs") or []:
            if target.get("name") != rjob["name"]:
                continue
            patched = ((target.get("template") or {}).get("spec") or {}).get("template") or {}
            labels.update((patched.get("metadata") or {}).get("labels") or {})
            for key, value in (patched.get("spec") or {}).items():
                if key != "containers":
                    spec[key] = value
            for cpatch in (patched.get("spec") or {}).get("containers") or []:
                container = _by_name(spec.get("containers", []), cpatch["name"])
                if container is not None:
                    _patch_container(container, cpatch)
    return pod


def rank0_pod(job: Obj, runtimes: dict[str, Obj]) -> Obj | None:
    """The pod template rank 0 of a trainer job runs in (None: the TrainJob's runtime is not
    known)."""
    if job["kind"] == "PyTorchJob":
        return dict(job["spec"]["pytorchReplicaSpecs"]["Master"]["template"])
    runtime = runtimes.get(job["spec"]["runtimeRef"]["name"])
    return trainjob_pod(job, runtime) if runtime is not None else None


def pod_templates(obj: Obj) -> list[tuple[str, Obj]]:
    """Pod templates written in an object itself: (where, template)."""
    kind = obj.get("kind")
    if kind == "Deployment":
        return [("spec.template", obj["spec"]["template"])]
    if kind == "PyTorchJob":
        specs = obj["spec"]["pytorchReplicaSpecs"]
        return [(f"spec.pytorchReplicaSpecs.{r}.template", s["template"]) for r, s in specs.items()]
    if kind == "TrainJob":
        out = []
        for i, patch in enumerate(obj["spec"].get("runtimePatches") or []):
            template = (patch.get("trainingRuntimeSpec") or {}).get("template") or {}
            for j, rjob in enumerate((template.get("spec") or {}).get("replicatedJobs") or []):
                pod = ((rjob.get("template") or {}).get("spec") or {}).get("template")
                if pod is not None:
                    where = f"spec.runtimePatches[{i}]...replicatedJobs[{j}].template.spec.template"
                    out.append((where, pod))
        return out
    return []


def containers(pod: Obj) -> list[Obj]:
    spec = pod.get("spec") or {}
    return [*spec.get("initContainers", []), *spec.get("containers", [])]
