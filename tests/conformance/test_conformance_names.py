"""Names upstream admits, including the ones it derives from ours, and the trainer jobs'
webhook rules (conventions.json `training_operator_v1`, `jobset`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from render import (
    EXAMPLES,
    StageRender,
    lmdeploy_runs,
    load_example,
    pod_templates,
    stage_renders,
)
from render import trainer_replicated_job as runtime_trainer_job
from upstream import DNS1035, DNS1123_SUBDOMAIN, LABEL_VALUE, Upstream, describe

from rlhf_operator import api, backends
from rlhf_operator.planner import refusal

pytestmark = pytest.mark.conformance

Obj = dict[str, Any]
LABEL_MAX = 63
# Kinds whose names upstream wants as DNS-1035 labels: Services (core validation), PyTorchJob
# (training-operator webhook NameIsDNS1035Label), TrainJob (CRD CEL rule).
DNS1035_KINDS = frozenset({"Service", "PyTorchJob", "TrainJob"})
SERVICE_FORMAT = "{job}-{replicaType lowercased}-{index}"
JOBSET_POD_FORMAT = "{jobset}-{replicatedJob}-{jobIndex}-{podIndex}-xxxxx"


def label_problems(name: str, what: str) -> list[str]:
    if len(name) > LABEL_MAX or not DNS1035.match(name):
        return [f"{what} {name!r} ({len(name)} characters) is not a DNS-1035 label <= 63"]
    return []


def _labels_of(obj: Obj) -> list[tuple[str, dict[str, str]]]:
    found = [("metadata.labels", obj.get("metadata", {}).get("labels") or {})]
    for where, pod in pod_templates(obj):
        found.append((f"{where}.metadata.labels", (pod.get("metadata") or {}).get("labels") or {}))
    return found


def child_name_problems(obj: Obj) -> list[str]:
    name = str(obj["metadata"]["name"])
    out = []
    if obj["kind"] in DNS1035_KINDS:
        out += label_problems(name, f"{obj['kind']} name")
    elif len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
        out.append(f"{obj['kind']} name {name!r} is not a DNS-1123 subdomain")
    for where, labels in _labels_of(obj):
        for key, value in labels.items():
            if len(value) > LABEL_MAX or not LABEL_VALUE.match(value):
                out.append(f"{where}[{key}] = {value!r} is not a label value")
    return out


def derived_names(job: Obj, runtimes: dict[str, Obj]) -> list[tuple[str, str]]:
    """Names upstream derives from a trainer job: (name, what names it)."""
    name = job["metadata"]["name"]
    if job["kind"] == "PyTorchJob":
        return [
            (f"{name}-{rtype.lower()}-{i}", "training-operator replica Service")
            for rtype, spec in job["spec"]["pytorchReplicaSpecs"].items()
            for i in range(int(spec.get("replicas", 1)))
        ]
    runtime = runtimes[job["spec"]["runtimeRef"]["name"]]
    rjob = runtime_trainer_job(runtime)
    nodes = int(job["spec"].get("trainer", {}).get("numNodes")
                or runtime["spec"].get("mlPolicy", {}).get("numNodes", 1))
    jobs = int(rjob.get("replicas", 1))
    return [(f"{name}-{rjob['name']}-{jobs - 1}-{nodes - 1}-xxxxx", "JobSet pod")]


def stage_problems(render: StageRender, runtimes: dict[str, Obj]) -> list[str]:
    out = label_problems(render.run.metadata.name, "RLHFRun name")
    out += label_problems(render.stage.name, "stage name")
    for child in render.children:
        out += [f"{describe(child)}: {p}" for p in child_name_problems(child)]
    for job in render.jobs():
        for name, what in derived_names(job, runtimes):
            out += [f"{describe(job)}: {p}" for p in label_problems(name, what)]
    return [f"{render.where}: {p}" for p in out]


def test_conventions_name_the_derived_formats(upstream: Upstream) -> None:
    """The formats derived_names() computes are the ones conventions.json records."""
    conv = upstream.conventions
    assert conv["training_operator_v1"]["service_name"].startswith(SERVICE_FORMAT)
    assert conv["jobset"]["pod_name"].startswith(JOBSET_POD_FORMAT)


@pytest.mark.parametrize("example", [p.stem for p in EXAMPLES])
def test_names_fit_upstream(
    renders: dict[str, list[StageRender]], runtimes: dict[str, Obj], example: str
) -> None:
    found = [p for r in renders[example] for p in stage_problems(r, runtimes)]
    assert not found, "\n".join(found)


def longest_accepted(path: Path, backend: str) -> api.RLHFRun | None:
    """The example on `backend` renamed to the longest run name the operator accepts (the API
    server takes up to 253 characters; a label value, the run's among them, at most 63). None
    when the planner refuses the example on that backend."""

    def accepted(length: int) -> api.RLHFRun | None:
        try:
            return load_example(path, name="r" * length, backend=backend)
        except api.SpecError:
            return None

    low, high = 0, LABEL_MAX + 1  # a longer name never fits where a shorter one does not
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if accepted(middle) is not None else (low, middle - 1)
    run = accepted(low) if low else None
    assert run is not None, f"{path}: no run name is accepted on backend {backend}"
    return run if refusal(run) is None else None


@pytest.mark.parametrize("example", [p.stem for p in EXAMPLES])
def test_longest_accepted_run_name_derives_valid_names(
    upstream: Upstream, runtimes: dict[str, Obj], example: str
) -> None:
    """Whatever run name the operator accepts, every name upstream derives from it fits."""
    path = next(p for p in EXAMPLES if p.stem == example)
    lmdeploy = sorted(upstream.engines["lmdeploy"]["flags_files"])
    found = []
    for backend in sorted(backends.BACKENDS):
        run = longest_accepted(path, backend)
        if run is None:
            continue
        label = f"{backend}, name of {len(run.metadata.name)}"
        for variant, each in lmdeploy_runs(label, run, lmdeploy):
            found += [p for r in stage_renders(each, variant) for p in stage_problems(r, runtimes)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("example", [p.stem for p in EXAMPLES])
def test_jobs_pass_upstream_webhooks(
    upstream: Upstream, renders: dict[str, list[StageRender]], runtimes: dict[str, Obj],
    example: str,
) -> None:
    """PyTorchJob: the training operator v1 webhook's replica types, container name and restart
    policies. TrainJob: its runtime exists, and its patches target what the runtime has."""
    found = []
    for render in renders[example]:
        for job in render.jobs():
            problems = (
                pytorchjob_problems(upstream, job)
                if job["kind"] == "PyTorchJob"
                else trainjob_problems(job, runtimes)
            )
            found += [f"{render.where}: {describe(job)}: {p}" for p in problems]
    assert not found, "\n".join(found)


def pytorchjob_problems(upstream: Upstream, job: Obj) -> list[str]:
    rules = upstream.conventions["training_operator_v1"]
    out = []
    for rtype, spec in job["spec"]["pytorchReplicaSpecs"].items():
        if rtype not in rules["replica_types"]:
            out.append(f"replica type {rtype} is not one of {rules['replica_types']}")
        if spec.get("restartPolicy", "Never") not in rules["restart_policies"]:
            out.append(f"{rtype}: restartPolicy {spec.get('restartPolicy')!r}")
        names = [c["name"] for c in spec["template"]["spec"]["containers"]]
        if rules["container_name"] not in names:
            out.append(f"{rtype}: no container named {rules['container_name']!r}: {names}")
    return out


def trainjob_problems(job: Obj, runtimes: dict[str, Obj]) -> list[str]:
    ref = job["spec"]["runtimeRef"]
    runtime = runtimes.get(ref["name"])
    if runtime is None or ref.get("kind", "ClusterTrainingRuntime") != runtime["kind"]:
        return [f"runtimeRef {ref} names no known runtime: {sorted(runtimes)}"]
    rjobs = {j["name"]: j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
    out = []
    for patch in job["spec"].get("runtimePatches") or []:
        template = patch.get("trainingRuntimeSpec", {}).get("template", {})
        for target in template.get("spec", {}).get("replicatedJobs") or []:
            rjob = rjobs.get(target["name"])
            if rjob is None:
                out.append(f"patch targets replicated job {target['name']!r}: not in {ref}")
                continue
            pod = rjob["template"]["spec"]["template"]["spec"]
            have = {c["name"] for c in pod.get("containers", [])}
            patched = target.get("template", {}).get("spec", {}).get("template", {})
            for container in patched.get("spec", {}).get("containers") or []:
                if container["name"] not in have:
                    out.append(f"patch targets container {container['name']!r}: not in {ref}")
    return out
