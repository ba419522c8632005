"""Opt-in: `rlhf operator` against a real cluster, for what the API emulator cannot show:
CEL validation at admission, the PyTorchJob and TrainJob CRDs accepting what the builders
write, server-side defaulting not counted as drift, and garbage collection through owner
references.

    RLHF_E2E_KUBECONFIG=~/.kube/config pytest -m cluster

The cluster needs the RLHFRun CRD (`kubectl apply -f manifests/crds/`) and the CRDs of
Kubeflow's training operator (PyTorchJob) and Kubeflow Trainer v2 (TrainJob); their
controllers are not needed, because every run here is suspended. The kubeconfig's user creates
and deletes one namespace (or set RLHF_E2E_NAMESPACE to an existing, empty one). The suite
starts `rlhf operator --namespace <it>` itself, so no operator may already watch that
namespace. Without RLHF_E2E_KUBECONFIG the tests fail: they are deselected by default
(pyproject addopts), never skipped.
"""

from __future__ import annotations

import copy
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import manifest
from kube_emulator import operator_process, wait_for
from rlhf_operator.kube import BY_KIND, RUNS, ApiKube, KubeError

pytestmark = pytest.mark.cluster

Obj = dict[str, Any]
RESYNC_SECONDS = 2.0


@pytest.fixture(scope="module")
def kubeconfig() -> Path:
    path = os.environ.get("RLHF_E2E_KUBECONFIG")
    assert path, "set RLHF_E2E_KUBECONFIG to a kubeconfig (or deselect: -m 'not cluster')"
    return Path(path).expanduser()


@pytest.fixture(scope="module")
def api_client(kubeconfig: Path) -> Any:
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    return client.ApiClient(configuration)


@pytest.fixture(scope="module")
def kube(api_client: Any) -> ApiKube:
    return ApiKube(api_client)


@pytest.fixture(scope="module")
def namespace(
    api_client: Any, kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    given = os.environ.get("RLHF_E2E_NAMESPACE")
    name = given or f"rlhf-e2e-{uuid.uuid4().hex[:6]}"
    if not given:
        core.create_namespace({"metadata": {"name": name}})
    log = tmp_path_factory.mktemp("cluster") / "operator.log"
    args = ("--namespace", name, "--metrics-port", "0")
    try:
        with operator_process(kubeconfig, log, *args, resync_seconds=RESYNC_SECONDS) as proc:
            yield name
            assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        if not given:
            core.delete_namespace(name)


def run_doc(ns: str, name: str, **spec: Any) -> Obj:
    doc = manifest(suspend=True, **spec)
    doc["metadata"] = {"name": name, "namespace": ns}
    return doc


def version(kube: ApiKube, ns: str, name: str) -> str:
    run = kube.get(RUNS, ns, name)
    assert run is not None
    return str(run["metadata"]["resourceVersion"])


def children(kube: ApiKube, ns: str, run: str) -> list[Obj]:
    labels = {"rlhf.dev/run": run}
    kinds = ("ConfigMap", "PyTorchJob", "TrainJob")
    return [obj for kind in kinds for obj in kube.list(BY_KIND[kind], ns, labels)]


def test_the_crd_refuses_a_bad_spec_naming_the_rule(kube: ApiKube, namespace: str) -> None:
    doc = run_doc(namespace, "dup")
    doc["spec"]["stages"][1]["name"] = "sft"
    with pytest.raises(KubeError) as refused:
        kube.create(doc)
    assert refused.value.status == 422
    assert "stage names must be unique" in str(refused.value)


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_a_suspended_run_settles_and_is_garbage_collected(
    kube: ApiKube, namespace: str, backend: str
) -> None:
    name = f"gc-{backend}"
    kube.create(run_doc(namespace, name, trainer={"backend": backend}))
    kind = "PyTorchJob" if backend == "pytorchjob" else "TrainJob"

    def settled() -> Obj | None:
        run = kube.get(RUNS, namespace, name)
        return run if run and (run.get("status") or {}).get("phase") == "Suspended" else None

    run = wait_for("phase Suspended", settled, timeout=60)
    made = wait_for(
        "the children", lambda: (lambda c: len(c) == 2 and c)(children(kube, namespace, name))
    )
    assert sorted(c["kind"] for c in made) == sorted(["ConfigMap", kind])
    for child in made:
        [owner] = child["metadata"]["ownerReferences"]
        assert owner["uid"] == run["metadata"]["uid"] and owner["controller"] is True

    # Steady state on a real API server, defaults and all: nothing is written any more.
    time.sleep(RESYNC_SECONDS * 3)
    before = {c["metadata"]["name"]: c["metadata"]["resourceVersion"] for c in made}
    run_version = version(kube, namespace, name)
    time.sleep(RESYNC_SECONDS * 3)
    after = {c["metadata"]["name"]: c["metadata"]["resourceVersion"]
             for c in children(kube, namespace, name)}
    assert after == before
    assert version(kube, namespace, name) == run_version

    kube.delete(RUNS, namespace, name)
    wait_for("garbage collection", lambda: not children(kube, namespace, name), timeout=60)


def test_a_spec_edit_bumps_observed_generation(kube: ApiKube, namespace: str) -> None:
    kube.create(run_doc(namespace, "edit"))
    wait_for("a status", lambda: (kube.get(RUNS, namespace, "edit") or {}).get("status"))
    stages = copy.deepcopy(manifest()["spec"]["stages"])
    stages[0]["hyperparameters"] = {"learningRate": 2.0e-5}
    kube.patch(RUNS, namespace, "edit", {"spec": {"stages": stages}})

    def observed_generation() -> bool:
        run = kube.get(RUNS, namespace, "edit") or {}
        generation = run.get("metadata", {}).get("generation")
        observed = (run.get("status") or {}).get("observedGeneration")
        return bool(generation and observed == generation)

    wait_for("observedGeneration", observed_generation, timeout=30)
