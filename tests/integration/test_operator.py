"""`rlhf operator` (kopf, clusterwide, a subprocess) against a Kubernetes API emulator over HTTP.

The tests play the parts of a user (kubectl apply / edit) and of the Kubeflow training
operator (job status, pods), and watch what the operator writes. Each test uses its own
namespace, so they share one emulator and one operator process.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from helpers import manifest
from kube_emulator import Client, Emulator, operator_process, stop, wait_for
from rlhf_operator import backends
from rlhf_trainer.kube_progress import PodAnnotator

pytestmark = pytest.mark.integration

Obj = dict[str, Any]
RUNS = "/apis/rlhf.dev/v1alpha1/namespaces/{ns}/rlhfruns"
JOBS = "/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs"
TRAINJOBS = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs"
CONFIGMAPS = "/api/v1/namespaces/{ns}/configmaps"
PODS = "/api/v1/namespaces/{ns}/pods"
EVENTS = "/api/v1/namespaces/{ns}/events"


@dataclass
class Cluster:
    emulator: Emulator
    client: Client
    kubeconfig: Path
    log: Path
    procs: list[Any] = field(default_factory=list)

    def start_operator(self) -> None:
        context = operator_process(self.kubeconfig, self.log, "--all-namespaces")
        self.procs.append((context, context.__enter__()))

    def kill_operator(self) -> None:
        """SIGKILL: no graceful shutdown, as when a node dies."""
        _, proc = self.procs[-1]
        proc.kill()
        proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    # -- the user's side ---------------------------------------------------------------
    def apply_run(self, ns: str, doc: Obj) -> None:
        doc = copy.deepcopy(doc)
        doc["metadata"].update(namespace=ns, uid=f"uid-{ns}", resourceVersion="1")
        self.client.call("POST", RUNS.format(ns=ns), doc)

    def edit_spec(self, ns: str, name: str, spec: Obj) -> None:
        """A spec edit, with the generation bump the API server would make."""
        run = self.run(ns, name)
        generation = int(run["metadata"].get("generation") or 1) + 1
        patch = {"metadata": {"generation": generation}, "spec": spec}
        self.client.call("PATCH", f"{RUNS.format(ns=ns)}/{name}", patch)

    def run(self, ns: str, name: str = "demo") -> Obj:
        run = self.client.get(f"{RUNS.format(ns=ns)}/{name}")
        assert run is not None
        return run

    # -- the training operator's side ---------------------------------------------------
    def set_job_phase(self, ns: str, name: str, phase: str, message: str = "", kind: str = "PyTorchJob") -> None:
        backend = backends.for_kind(kind)
        path = (JOBS if kind == "PyTorchJob" else TRAINJOBS).format(ns=ns)
        status = backend.status_for(phase, message)  # type: ignore[arg-type]
        self.client.call("PATCH", f"{path}/{name}/status", {"status": status})

    def start_pod(self, ns: str, name: str, stage: str, run: str = "demo") -> None:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name, "namespace": ns, "resourceVersion": "1",
                "labels": {"rlhf.dev/run": run, "rlhf.dev/stage": stage},
            },
            "spec": {"containers": [{"name": "pytorch", "image": "trainer"}]},
        }
        self.client.call("POST", PODS.format(ns=ns), pod)

    # -- reading -----------------------------------------------------------------------
    def job(self, ns: str, name: str, kind: str = "PyTorchJob") -> Obj | None:
        path = (JOBS if kind == "PyTorchJob" else TRAINJOBS).format(ns=ns)
        return self.client.get(f"{path}/{name}")

    def event_reasons(self, ns: str) -> list[str]:
        return [e["reason"] for e in self.client.items(EVENTS.format(ns=ns))]

    def stage(self, ns: str, index: int, name: str = "demo") -> Obj:
        return dict(self.run(ns, name).get("status", {}).get("stages", [{}] * 2)[index])

    def condition(self, ns: str, ctype: str, name: str = "demo") -> Obj:
        conditions = self.run(ns, name).get("status", {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == ctype), {})

    def settle(self, quiet: float = 1.5, timeout: float = 20.0) -> None:
        """Wait until the operator has made no write for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            mark = self.emulator.request_count()
            time.sleep(quiet)
            if not self.emulator.writes(mark):
                return
        raise AssertionError("the operator kept writing: " + self.log_tail())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("operator")
    with Emulator() as emulator:
        cluster = Cluster(
            emulator=emulator,
            client=Client(emulator.url),
            kubeconfig=emulator.kubeconfig(tmp / "kubeconfig"),
            log=tmp / "operator.log",
        )
        cluster.start_operator()
        try:
            yield cluster
        finally:
            for context, proc in reversed(cluster.procs):
                stop(proc)
                context.__exit__(None, None, None)


@pytest.fixture(autouse=True)
def operator_log(cluster: Cluster) -> Iterator[None]:
    yield
    print("--- operator log ---\n" + cluster.log_tail(60))  # shown when a test fails


def running(cluster: Cluster, ns: str, doc: Obj | None = None) -> None:
    """A run whose first stage's job the training operator reports Running."""
    cluster.apply_run(ns, doc or manifest())
    wait_for("the stage-1 PyTorchJob", lambda: cluster.job(ns, "demo-sft"))
    cluster.set_job_phase(ns, "demo-sft", "Running")
    wait_for("phase Running", lambda: cluster.run(ns).get("status", {}).get("phase") == "Running")


def test_run_progresses_through_stages(cluster: Cluster) -> None:
    ns = "progress"
    cluster.apply_run(ns, manifest())
    job = wait_for("the stage-1 PyTorchJob", lambda: cluster.job(ns, "demo-sft"))
    configmap = cluster.client.get(f"{CONFIGMAPS.format(ns=ns)}/demo-sft-config")
    assert configmap is not None and "sft.yaml" in configmap["data"]
    for child in (job, configmap):
        meta = child["metadata"]
        assert meta["labels"]["rlhf.dev/run"] == "demo"
        assert meta["labels"]["rlhf.dev/stage"] == "sft"
        [owner] = meta["ownerReferences"]
        assert owner["uid"] == f"uid-{ns}" and owner["kind"] == "RLHFRun" and owner["controller"]
    assert cluster.job(ns, "demo-sft2") is None, "stage 2 waits for stage 1"

    cluster.set_job_phase(ns, "demo-sft", "Running")
    wait_for("phase Running", lambda: cluster.run(ns).get("status", {}).get("phase") == "Running")
    status = cluster.run(ns)["status"]
    assert status["currentStage"] == "sft"
    assert status["stages"][0]["phase"] == "Running" and status["stages"][0]["jobName"] == "demo-sft"
    assert cluster.condition(ns, "Ready")["status"] == "True"

    # The trainer's rank 0 reports progress on its own pod, exactly as in a cluster.
    cluster.start_pod(ns, "demo-sft-master-0", "sft")
    annotator = PodAnnotator(cluster.emulator.url, ns, "demo-sft-master-0", min_interval=0)
    progress = {"step": 7, "totalSteps": 20, "metrics": {"loss": 1.25}, "updatedAt": "t7"}
    assert annotator.report(progress)
    metrics = wait_for("progress in status", lambda: cluster.stage(ns, 0).get("metrics"))
    assert metrics == {"step": 7, "totalSteps": 20, "loss": 1.25}
    assert cluster.run(ns)["status"]["step"] == 7

    cluster.set_job_phase(ns, "demo-sft", "Succeeded")
    wait_for("the stage-2 PyTorchJob", lambda: cluster.job(ns, "demo-sft2"))
    wait_for("stage 2 current", lambda: cluster.run(ns)["status"].get("currentStage") == "sft2")
    first = cluster.stage(ns, 0)
    assert first["phase"] == "Succeeded" and first["output"] == "/workspace/demo/sft/final"
    assert cluster.job(ns, "demo-sft") is not None, "a finished job stays as the stage record"
    cluster.set_job_phase(ns, "demo-sft2", "Succeeded")
    wait_for("phase Succeeded", lambda: cluster.run(ns)["status"]["phase"] == "Succeeded")
    assert cluster.condition(ns, "Succeeded")["status"] == "True"
    reasons = wait_for("events", lambda: "RunSucceeded" in cluster.event_reasons(ns) and cluster.event_reasons(ns))
    assert reasons.count("StageStarted") == 1 and reasons.count("StageSucceeded") == 2


def test_failed_job_fails_the_run_with_degraded_and_a_warning(cluster: Cluster) -> None:
    ns = "failing"
    running(cluster, ns)
    cluster.set_job_phase(ns, "demo-sft", "Failed", "OOMKilled")
    wait_for("phase Failed", lambda: cluster.run(ns)["status"]["phase"] == "Failed")
    degraded = cluster.condition(ns, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "StageFailed"
    assert "OOMKilled" in degraded["message"]
    events = wait_for(
        "a StageFailed event",
        lambda: [e for e in cluster.client.items(EVENTS.format(ns=ns)) if e["reason"] == "StageFailed"],
    )
    assert events[0]["type"] == "Warning" and "OOMKilled" in events[0]["message"]
    assert events[0]["involvedObject"]["kind"] == "RLHFRun"
    assert cluster.job(ns, "demo-sft2") is None


def test_suspend_and_resume(cluster: Cluster) -> None:
    ns = "suspend"
    running(cluster, ns)
    cluster.edit_spec(ns, "demo", {"suspend": True})
    wait_for("a suspended job", lambda: cluster.job(ns, "demo-sft")["spec"]["runPolicy"]["suspend"])
    wait_for("phase Suspended", lambda: cluster.run(ns)["status"]["phase"] == "Suspended")
    assert cluster.run(ns)["status"]["observedGeneration"] == 2
    assert cluster.stage(ns, 0)["phase"] == "Suspended"
    cluster.edit_spec(ns, "demo", {"suspend": False})
    wait_for("a resumed job", lambda: not cluster.job(ns, "demo-sft")["spec"]["runPolicy"]["suspend"])
    wait_for("phase Running", lambda: cluster.run(ns)["status"]["phase"] == "Running")
    assert cluster.run(ns)["status"]["observedGeneration"] == 3


def test_spec_edit_mid_run_replaces_the_job_and_bumps_observed_generation(cluster: Cluster) -> None:
    ns = "edit"
    running(cluster, ns)
    old = cluster.job(ns, "demo-sft")
    assert old is not None
    old_hash = old["metadata"]["annotations"]["rlhf.dev/config-hash"]
    stages = copy.deepcopy(manifest()["spec"]["stages"])
    stages[0]["hyperparameters"] = {"learningRate": 5.0e-5}
    cluster.edit_spec(ns, "demo", {"stages": stages})

    def replaced() -> Obj | None:
        job = cluster.job(ns, "demo-sft")
        fresh = job and job["metadata"]["annotations"]["rlhf.dev/config-hash"] != old_hash
        return job if fresh else None

    job = wait_for("the replaced PyTorchJob", replaced)
    assert "status" not in job, "a new job, not the old one patched"
    configmap = cluster.client.get(f"{CONFIGMAPS.format(ns=ns)}/demo-sft-config")
    assert configmap is not None and "5.0e-05" in configmap["data"]["sft.yaml"]
    wait_for("observedGeneration 2", lambda: cluster.run(ns)["status"]["observedGeneration"] == 2)
    assert all(c["observedGeneration"] == 2 for c in cluster.run(ns)["status"]["conditions"])


def test_steady_state_makes_no_writes(cluster: Cluster) -> None:
    ns = "steady"
    running(cluster, ns)
    cluster.start_pod(ns, "demo-sft-master-0", "sft")
    PodAnnotator(cluster.emulator.url, ns, "demo-sft-master-0", min_interval=0).report(
        {"step": 3, "totalSteps": 9, "metrics": {"loss": 2.0}, "updatedAt": "t3"}
    )
    wait_for("progress in status", lambda: cluster.stage(ns, 0).get("metrics"))
    cluster.settle()
    mark = cluster.emulator.request_count()
    # Children change in ways that do not matter (as the training operator does), and the
    # 1 s resync timer fires a few times: each is a full reconcile with nothing to write.
    cluster.client.call("PATCH", f"{JOBS.format(ns=ns)}/demo-sft/status",
                        {"status": {"replicaStatuses": {"Master": {"active": 1}}}})
    cluster.client.call("PATCH", f"{PODS.format(ns=ns)}/demo-sft-master-0/status",
                        {"status": {"phase": "Running"}})
    time.sleep(3.5)
    reads = [r for r in list(cluster.emulator.handler)[mark:]
             if r.method.value == "GET" and r.url.path.endswith("/rlhfruns/demo")]
    assert len(reads) >= 3, "the operator reconciled during the window"
    assert cluster.emulator.writes(mark) == []


def test_restart_mid_run_creates_no_duplicates_and_continues(cluster: Cluster) -> None:
    ns = "restart"
    running(cluster, ns)
    cluster.settle()
    cluster.kill_operator()
    cluster.set_job_phase(ns, "demo-sft", "Succeeded")  # finishes while the operator is down
    mark = cluster.emulator.request_count()
    cluster.start_operator()
    wait_for("the stage-2 PyTorchJob", lambda: cluster.job(ns, "demo-sft2"), timeout=30)
    wait_for("stage 2 current", lambda: cluster.run(ns)["status"].get("currentStage") == "sft2")
    cluster.settle()
    creates = [w for w in cluster.emulator.writes(mark) if w.startswith("POST")]
    children = [w for w in creates if "/events" not in w]
    assert sorted(children) == sorted([
        f"POST {CONFIGMAPS.format(ns=ns)}", f"POST {JOBS.format(ns=ns)}"
    ]), f"only stage 2's children are created: {creates}"
    stages = cluster.run(ns)["status"]["stages"]
    assert [s["phase"] for s in stages] == ["Succeeded", "Pending"]
    assert stages[0]["startTime"] and stages[0]["completionTime"]
    reasons = cluster.event_reasons(ns)
    assert reasons.count("StageStarted") == 1 and reasons.count("StageSucceeded") == 1


def test_bad_spec_is_degraded_naming_the_field(cluster: Cluster) -> None:
    ns = "bad"
    doc = manifest()
    doc["spec"]["stages"][0]["hyperparameters"] = {"learningRate": -1}
    cluster.apply_run(ns, doc)
    degraded = wait_for("Degraded", lambda: cluster.condition(ns, "Degraded"))
    assert degraded["status"] == "True" and degraded["reason"] == "InvalidSpec"
    assert "spec.stages[0].hyperparameters.learningRate" in degraded["message"]
    assert cluster.client.items(JOBS.format(ns=ns)) == []
    assert cluster.client.items(CONFIGMAPS.format(ns=ns)) == []
    wait_for("an InvalidSpec event", lambda: "InvalidSpec" in cluster.event_reasons(ns))
    cluster.settle()
    assert cluster.event_reasons(ns).count("InvalidSpec") == 1, "announced once"
    assert cluster.procs[-1][1].poll() is None, "the operator is still running"


def test_trainjob_backend_runs_through_trainer_v2(cluster: Cluster) -> None:
    ns = "trainjob"
    doc = manifest(trainer={"backend": "trainjob", "nodes": 2, "serviceAccountName": "trainer"})
    doc["spec"]["stages"] = doc["spec"]["stages"][:1]
    cluster.apply_run(ns, doc)
    job = wait_for("the TrainJob", lambda: cluster.job(ns, "demo-sft", kind="TrainJob"))
    assert job["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert job["spec"]["trainer"]["numNodes"] == 2
    assert cluster.client.items(JOBS.format(ns=ns)) == []
    cluster.set_job_phase(ns, "demo-sft", "Running", kind="TrainJob")
    wait_for("phase Running", lambda: cluster.run(ns)["status"]["phase"] == "Running")
    cluster.set_job_phase(ns, "demo-sft", "Succeeded", kind="TrainJob")
    wait_for("phase Succeeded", lambda: cluster.run(ns)["status"]["phase"] == "Succeeded")
    assert json.dumps(cluster.stage(ns, 0)).count("Succeeded") == 1
