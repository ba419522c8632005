"""`rlhf operator` (kopf, clusterwide, a subprocess) against a Kubernetes API emulator over HTTP.

The tests play the parts of a user (kubectl apply / edit) and of the Kubeflow training
operator (job status, pods), and watch what the operator writes. Each test uses its own
namespace, so they share one emulator and one operator process.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from helpers import load_generate, manifest
from kube_emulator import TEST_AGENT, Client, Emulator, operator_process, stop, wait_for
from rlhf_operator import backends
from rlhf_operator.api import Phase
from rlhf_trainer.runtime.kube_progress import PodAnnotator
from unit.test_backends import validate_trainjob
from unit.test_builders import K8S_VERSION, validate_pytorchjob

pytestmark = pytest.mark.integration

Obj = dict[str, Any]
ALL_RUNS = "/apis/rlhf.dev/v1alpha1/rlhfruns"
RUNS = "/apis/rlhf.dev/v1alpha1/namespaces/{ns}/rlhfruns"
JOBS = "/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs"
TRAINJOBS = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs"
CONFIGMAPS = "/api/v1/namespaces/{ns}/configmaps"
PODS = "/api/v1/namespaces/{ns}/pods"
EVENTS = "/api/v1/namespaces/{ns}/events"
EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"


@dataclass
class Cluster:
    emulator: Emulator
    client: Client
    kubeconfig: Path
    log: Path
    procs: list[Any] = field(default_factory=list)

    def start_operator(self) -> None:
        args = ("--all-namespaces", "--metrics-port", "0")
        context = operator_process(self.kubeconfig, self.log, *args)
        self.procs.append((context, context.__enter__()))

    def scrape(self) -> str:
        """The operator's /metrics (its port is in the log: it asked for any free one)."""
        ports = re.findall(r"Serving operator metrics on port (\d+)", self.log.read_text())
        url = f"http://127.0.0.1:{ports[-1]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

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
    def set_job_phase(
        self, ns: str, name: str, phase: Phase, message: str = "", kind: str = "PyTorchJob"
    ) -> None:
        """Report `phase` in the status shape of the job's own controller."""
        path = (JOBS if kind == "PyTorchJob" else TRAINJOBS).format(ns=ns)
        status = backends.for_kind(kind).status_for(phase, message)
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
    def sent(self, ns: str) -> list[Obj]:
        """Every object the operator POSTed into `ns`, as it sent it (the request bodies)."""
        out = []
        for request in list(self.emulator.handler):
            agent = request.headers.get("User-Agent", "")
            if (request.method.value == "POST" and f"/namespaces/{ns}/" in request.url.path
                    and agent != TEST_AGENT and not agent.startswith("rlhf-trainer/")):
                out.append(json.loads(request.body))
        return out

    def job(self, ns: str, name: str, kind: str = "PyTorchJob") -> Obj | None:
        path = (JOBS if kind == "PyTorchJob" else TRAINJOBS).format(ns=ns)
        return self.client.get(f"{path}/{name}")

    def event_reasons(self, ns: str) -> list[str]:
        return [e["reason"] for e in self.client.items(EVENTS.format(ns=ns))]

    def status(self, ns: str, name: str = "demo") -> Obj:
        return dict(self.run(ns, name).get("status") or {})

    def phase(self, ns: str, name: str = "demo") -> str | None:
        return self.status(ns, name).get("phase")

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
    with running_operator(tmp_path_factory.mktemp("operator")) as cluster:
        yield cluster


@contextlib.contextmanager
def running_operator(tmp: Path) -> Iterator[Cluster]:
    """An emulated API server with `rlhf operator` running against it; both stopped after."""
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
    # `kubectl delete` the test's runs, so later tests do not pay for reconciling them; kopf
    # lets go of its finalizer and the run disappears (children stay: the emulator has no GC).
    for run in cluster.client.items(ALL_RUNS):
        meta = run["metadata"]
        cluster.client.call("DELETE", f"{RUNS.format(ns=meta['namespace'])}/{meta['name']}")
    try:
        wait_for("the runs to go", lambda: not cluster.client.items(ALL_RUNS))
    except AssertionError as err:
        raise AssertionError(f"{err}\n{cluster.log_tail(60)}") from None


def assert_valid(objects: list[Obj]) -> list[str]:
    """Each object against the upstream Kubernetes schemas (kubernetes-validate, strict: no
    unknown fields), PyTorchJobs and TrainJobs against the Kubeflow APIs as the unit tests
    check the builders. Returns the kinds, so a caller can see that its scenario sent them."""
    for obj in objects:
        if obj["kind"] == "PyTorchJob":
            validate_pytorchjob(obj)
        elif obj["kind"] == "TrainJob":
            validate_trainjob(obj)
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    return sorted({obj["kind"] for obj in objects})


def running(cluster: Cluster, ns: str, doc: Obj | None = None) -> None:
    """A run whose first stage's job the training operator reports Running."""
    cluster.apply_run(ns, doc or manifest())
    wait_for("the stage-1 PyTorchJob", lambda: cluster.job(ns, "demo-sft"))
    cluster.set_job_phase(ns, "demo-sft", "Running")
    wait_for("phase Running", lambda: cluster.phase(ns) == "Running")


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
    wait_for("phase Running", lambda: cluster.phase(ns) == "Running")
    status = cluster.run(ns)["status"]
    assert status["currentStage"] == "sft"
    assert status["stages"][0]["phase"] == "Running"
    assert status["stages"][0]["jobName"] == "demo-sft"
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
    wait_for("stage 2 current", lambda: cluster.status(ns).get("currentStage") == "sft2")
    first = cluster.stage(ns, 0)
    assert first["phase"] == "Succeeded" and first["output"] == "/workspace/demo/sft/final"
    assert cluster.job(ns, "demo-sft") is not None, "a finished job stays as the stage record"
    cluster.set_job_phase(ns, "demo-sft2", "Succeeded")
    wait_for("phase Succeeded", lambda: cluster.phase(ns) == "Succeeded")
    assert cluster.condition(ns, "Succeeded")["status"] == "True"
    metrics = cluster.scrape()
    assert 'rlhf_run_info{model="models/tiny-llama",namespace="progress",run="demo"} 1.0' in metrics
    assert "rlhf_reconcile_duration_seconds_count" in metrics
    wait_for("a RunSucceeded event", lambda: "RunSucceeded" in cluster.event_reasons(ns))
    reasons = cluster.event_reasons(ns)
    assert reasons.count("StageStarted") == 1 and reasons.count("StageSucceeded") == 2


def test_failed_job_fails_the_run_with_degraded_and_a_warning(cluster: Cluster) -> None:
    ns = "failing"
    running(cluster, ns)
    cluster.set_job_phase(ns, "demo-sft", "Failed", "OOMKilled")
    wait_for("phase Failed", lambda: cluster.phase(ns) == "Failed")
    degraded = cluster.condition(ns, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "StageFailed"
    assert "OOMKilled" in degraded["message"]

    def failed_events() -> list[Obj]:
        events = cluster.client.items(EVENTS.format(ns=ns))
        return [e for e in events if e["reason"] == "StageFailed"]

    events = wait_for("a StageFailed event", failed_events)
    assert events[0]["type"] == "Warning" and "OOMKilled" in events[0]["message"]
    assert events[0]["involvedObject"]["kind"] == "RLHFRun"
    assert cluster.job(ns, "demo-sft2") is None


def test_sft_reward_ppo_runs_to_success_and_removes_its_servers(cluster: Cluster) -> None:
    """The shipped sft -> reward -> ppo example, end to end, with the test as the training
    operator and the Deployment controller."""
    ns = "happy"
    doc = yaml.safe_load((EXAMPLES / "sft-reward-ppo.yaml").read_text())
    run = doc["metadata"]["name"]
    cluster.apply_run(ns, doc)
    for index, stage in enumerate(("sft", "rm")):
        wait_for(f"the {stage} PyTorchJob", lambda s=stage: cluster.job(ns, f"{run}-{s}"))
        assert cluster.client.get(f"{CONFIGMAPS.format(ns=ns)}/{run}-{stage}-config")
        assert names(cluster, DEPLOYMENTS.format(ns=ns)) == [], "no servers before ppo"
        cluster.set_job_phase(ns, f"{run}-{stage}", "Running")
        # The stage's own phase: a stage the operator never saw running gets no StageStarted.
        wait_for(f"{stage} running", lambda s=stage, i=index: cluster.status(ns, run).get(
            "currentStage") == s and cluster.stage(ns, i, run).get("phase") == "Running")
        cluster.set_job_phase(ns, f"{run}-{stage}", "Succeeded")
    server = f"{run}-ppo-rollout-0"
    wait_for("the rollout Deployment", lambda: names(cluster, DEPLOYMENTS.format(ns=ns))
             == [server])
    wait_for("its Service", lambda: names(cluster, SERVICES.format(ns=ns)) == [server])
    configmap = cluster.client.get(f"{CONFIGMAPS.format(ns=ns)}/{run}-ppo-config")
    assert configmap is not None
    assert f"http://{server}.{ns}.svc:8000" in configmap["data"]["ppo.yaml"]
    cluster.settle()
    assert cluster.job(ns, f"{run}-ppo") is None, "the trainer waits for its server"
    assert "Waiting for rollout servers: 0/1" in (cluster.stage(ns, 2, run).get("message") or "")
    available(cluster, ns, server)
    wait_for("the ppo PyTorchJob", lambda: cluster.job(ns, f"{run}-ppo"))
    cluster.set_job_phase(ns, f"{run}-ppo", "Running")
    wait_for("ppo running", lambda: cluster.stage(ns, 2, run).get("phase") == "Running")
    cluster.set_job_phase(ns, f"{run}-ppo", "Succeeded")
    wait_for("phase Succeeded", lambda: cluster.phase(ns, run) == "Succeeded")
    wait_for("the servers deleted", lambda: not names(cluster, DEPLOYMENTS.format(ns=ns))
             and not names(cluster, SERVICES.format(ns=ns)))
    status = cluster.status(ns, run)
    assert [s["phase"] for s in status["stages"]] == ["Succeeded"] * 3
    assert status["stages"][2]["output"] == f"/workspace/{run}/ppo/final"
    assert cluster.condition(ns, "Succeeded", run)["status"] == "True"
    wait_for("a RunSucceeded event", lambda: "RunSucceeded" in cluster.event_reasons(ns))
    reasons = cluster.event_reasons(ns)
    assert sorted(reasons) == sorted(["StageStarted"] * 3 + ["StageSucceeded"] * 3
                                     + ["RunSucceeded"]), reasons
    assert len(cluster.client.items(JOBS.format(ns=ns))) == 3, "the jobs stay as the record"
    # Everything the operator sent over HTTP, not just what the builders return.
    kinds = assert_valid(cluster.sent(ns))
    assert kinds == ["ConfigMap", "Deployment", "Event", "PyTorchJob", "Service"]


def test_failed_stage_is_retried_up_to_backoff_limit_then_fails_the_run(cluster: Cluster) -> None:
    ns = "retry"
    running(cluster, ns, manifest(backoffLimit=1))
    first = cluster.job(ns, "demo-sft")
    assert first is not None
    cluster.set_job_phase(ns, "demo-sft", "Failed", "OOMKilled")

    def replaced() -> Obj | None:
        job = cluster.job(ns, "demo-sft")
        return job if job and job["metadata"]["uid"] != first["metadata"]["uid"] else None

    second = wait_for("a new PyTorchJob", replaced)
    assert "status" not in second, "a new job, not the failed one"
    assert second["metadata"]["annotations"]["rlhf.dev/attempt"] == "2"
    stage = wait_for("attempt 2 in status", lambda: (s := cluster.stage(ns, 0)).get("attempts")
                     == 2 and s)
    assert stage["message"] == "Attempt 1 of 2 failed: OOMKilled"
    assert cluster.phase(ns) == "Running"
    wait_for("a StageRetrying event", lambda: "StageRetrying" in cluster.event_reasons(ns))

    cluster.set_job_phase(ns, "demo-sft", "Running")
    wait_for("attempt 2 running", lambda: cluster.stage(ns, 0).get("phase") == "Running")
    cluster.set_job_phase(ns, "demo-sft", "Failed", "NCCL timeout")
    wait_for("phase Failed", lambda: cluster.phase(ns) == "Failed")
    stage = cluster.stage(ns, 0)
    assert stage["attempts"] == 2 and stage["message"] == "NCCL timeout (attempt 2 of 2)"
    degraded = cluster.condition(ns, "Degraded")
    assert degraded["reason"] == "StageFailed" and "NCCL timeout" in degraded["message"]
    cluster.settle()
    job = cluster.job(ns, "demo-sft")
    assert job is not None and job["metadata"]["uid"] == second["metadata"]["uid"], "no third"
    reasons = cluster.event_reasons(ns)
    assert reasons.count("StageRetrying") == 1 and reasons.count("StageFailed") == 1
    assert reasons.count("RunFailed") == 1 and cluster.job(ns, "demo-sft2") is None


def test_suspend_and_resume(cluster: Cluster) -> None:
    ns = "suspend"
    running(cluster, ns)
    cluster.edit_spec(ns, "demo", {"suspend": True})
    wait_for("a suspended job", lambda: suspended(cluster.job(ns, "demo-sft")))
    wait_for("phase Suspended", lambda: cluster.phase(ns) == "Suspended")
    assert cluster.run(ns)["status"]["observedGeneration"] == 2
    assert cluster.stage(ns, 0)["phase"] == "Suspended"
    cluster.edit_spec(ns, "demo", {"suspend": False})
    wait_for("a resumed job", lambda: not suspended(cluster.job(ns, "demo-sft")))
    wait_for("phase Running", lambda: cluster.phase(ns) == "Running")
    assert cluster.run(ns)["status"]["observedGeneration"] == 3


def suspended(job: Obj | None) -> bool:
    assert job is not None
    return backends.is_suspended(job)


def test_edit_to_the_running_stage_is_degraded_and_later_stages_take_edits(
    cluster: Cluster,
) -> None:
    ns = "edit"
    running(cluster, ns)
    old = cluster.job(ns, "demo-sft")
    assert old is not None
    stages = copy.deepcopy(manifest()["spec"]["stages"])
    stages[0]["hyperparameters"] = {"learningRate": 5.0e-5}
    stages[1]["hyperparameters"] = {"learningRate": 7.0e-5}
    cluster.edit_spec(ns, "demo", {"stages": stages})

    def degraded() -> Obj | None:
        condition = cluster.condition(ns, "Degraded")
        return condition if condition.get("status") == "True" else None

    condition = wait_for("Degraded", degraded)
    assert condition["reason"] == "RunningStageEdited"
    assert "spec.stages[0] (sft)" in condition["message"]
    assert "PyTorchJob demo-sft keeps running" in condition["message"]
    assert condition["observedGeneration"] == 2
    wait_for("a RunningStageEdited event",
             lambda: "RunningStageEdited" in cluster.event_reasons(ns))
    cluster.settle()
    job = cluster.job(ns, "demo-sft")
    assert job is not None and job["metadata"]["uid"] == old["metadata"]["uid"], "not replaced"
    assert job["metadata"]["annotations"] == old["metadata"]["annotations"]
    configmap = cluster.client.get(f"{CONFIGMAPS.format(ns=ns)}/demo-sft-config")
    assert configmap is not None and "5.0e-05" not in configmap["data"]["sft.yaml"]
    assert cluster.phase(ns) == "Running" and cluster.status(ns)["observedGeneration"] == 2
    assert cluster.event_reasons(ns).count("RunningStageEdited") == 1

    # The stage that had not started runs the edited spec.
    cluster.set_job_phase(ns, "demo-sft", "Succeeded")
    wait_for("the stage-2 PyTorchJob", lambda: cluster.job(ns, "demo-sft2"))
    configmap = cluster.client.get(f"{CONFIGMAPS.format(ns=ns)}/demo-sft2-config")
    assert configmap is not None and "7.0e-05" in configmap["data"]["sft2.yaml"]
    wait_for("Degraded cleared", lambda: cluster.condition(ns, "Degraded")["status"] == "False")


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
    wait_for("stage 2 current", lambda: cluster.status(ns).get("currentStage") == "sft2")
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
    wait_for("phase Running", lambda: cluster.phase(ns) == "Running")
    cluster.set_job_phase(ns, "demo-sft", "Succeeded", kind="TrainJob")
    wait_for("phase Succeeded", lambda: cluster.phase(ns) == "Succeeded")
    assert json.dumps(cluster.stage(ns, 0)).count("Succeeded") == 1
    assert assert_valid(cluster.sent(ns)) == ["ConfigMap", "Event", "TrainJob"]


DEPLOYMENTS = "/apis/apps/v1/namespaces/{ns}/deployments"
SERVICES = "/api/v1/namespaces/{ns}/services"


def names(cluster: Cluster, path: str) -> list[str]:
    return sorted(o["metadata"]["name"] for o in cluster.client.items(path))


def available(cluster: Cluster, ns: str, name: str) -> None:
    """Report a Deployment available, as the Deployment controller would."""
    status = {
        "availableReplicas": 1,
        "readyReplicas": 1,
        "conditions": [
            {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}
        ],
    }
    cluster.client.call("PATCH", f"{DEPLOYMENTS.format(ns=ns)}/{name}/status", {"status": status})


def test_servers_live_only_while_their_stage_runs_and_drift_is_repaired(cluster: Cluster) -> None:
    """A feedback stage's rollout and judge servers come first, the trainer once they are
    available; a hand edit to a server is put back; when the stage ends they are deleted."""
    ns = "servers"
    doc = manifest()
    doc["spec"]["judge"] = {"engine": "vllm", "model": {"path": "models/judge"}}
    doc["spec"]["stages"] = [
        {"name": "fb", "type": "feedback", "rollout": {"replicas": 1},
         "dataset": {"path": "data/prompts.jsonl", "format": "prompts"}},
    ]
    cluster.apply_run(ns, doc)
    deployments = wait_for("the rollout and judge servers", lambda: (
        found if len(found := names(cluster, DEPLOYMENTS.format(ns=ns))) == 2 else None
    ))
    wait_for("their Services", lambda: len(names(cluster, SERVICES.format(ns=ns))) == 2)
    assert cluster.job(ns, "demo-fb") is None, "the trainer waits for its servers"
    service = cluster.client.items(SERVICES.format(ns=ns))[0]
    ports = copy.deepcopy(service["spec"]["ports"])
    cluster.client.call("PATCH", f"{SERVICES.format(ns=ns)}/{service['metadata']['name']}",
                        {"spec": {"ports": [{**ports[0], "port": 1}]}})
    wait_for("the Service put back", lambda: cluster.client.get(
        f"{SERVICES.format(ns=ns)}/{service['metadata']['name']}")["spec"]["ports"] == ports)
    deployment = f"{DEPLOYMENTS.format(ns=ns)}/{deployments[0]}"
    replicas = cluster.client.get(deployment)["spec"]["replicas"]
    cluster.client.call("PATCH", deployment, {"spec": {"replicas": replicas + 3}})
    wait_for("the Deployment put back",
             lambda: cluster.client.get(deployment)["spec"]["replicas"] == replicas)
    # What the repairing merge patches left is still valid, not just what was created.
    for path in (deployment, f"{SERVICES.format(ns=ns)}/{service['metadata']['name']}"):
        kubernetes_validate.validate(cluster.client.get(path), K8S_VERSION, strict=True)
    for name in deployments:
        available(cluster, ns, name)
    wait_for("the trainer", lambda: cluster.job(ns, "demo-fb"))
    cluster.set_job_phase(ns, "demo-fb", "Succeeded")
    wait_for("phase Succeeded", lambda: cluster.phase(ns) == "Succeeded")
    wait_for("servers deleted", lambda: not names(cluster, DEPLOYMENTS.format(ns=ns))
             and not names(cluster, SERVICES.format(ns=ns)))
    kinds = assert_valid(cluster.sent(ns))
    assert kinds == ["ConfigMap", "Deployment", "Event", "PyTorchJob", "Service"]


def test_trainjob_edits_suspension_and_removed_stages(cluster: Cluster) -> None:
    """TrainJobs are patched for suspension and replaced on a spec edit; a stage removed from
    the spec loses its ConfigMap."""
    ns = "tj-edit"
    doc = manifest(trainer={"backend": "trainjob"})
    cluster.apply_run(ns, doc)
    first = wait_for("the TrainJob", lambda: cluster.job(ns, "demo-sft", kind="TrainJob"))
    cluster.set_job_phase(ns, "demo-sft", "Running", kind="TrainJob")
    wait_for("phase Running", lambda: cluster.phase(ns) == "Running")
    cluster.edit_spec(ns, "demo", {**doc["spec"], "suspend": True})
    wait_for("the TrainJob suspended", lambda: (cluster.job(ns, "demo-sft", kind="TrainJob")
                                                or {}).get("spec", {}).get("suspend") is True)
    # As Trainer reports it; a suspended stage is not running, so an edit replaces its job.
    cluster.set_job_phase(ns, "demo-sft", "Suspended", kind="TrainJob")
    edited = copy.deepcopy(doc["spec"])
    edited["stages"] = [{**edited["stages"][0], "hyperparameters": {"seed": 9}}]
    cluster.edit_spec(ns, "demo", edited)

    def replaced() -> Obj | None:
        job = cluster.job(ns, "demo-sft", kind="TrainJob")
        return job if job and job["metadata"]["uid"] != first["metadata"]["uid"] else None

    wait_for("the TrainJob replaced", replaced)
    edited["stages"] = [{**edited["stages"][0], "name": "tune"}]
    cluster.edit_spec(ns, "demo", edited)
    wait_for("the renamed stage's objects", lambda: cluster.job(ns, "demo-tune", kind="TrainJob"))
    wait_for("the old stage's ConfigMap and TrainJob gone", lambda: (
        "demo-sft-config" not in names(cluster, CONFIGMAPS.format(ns=ns))
        and cluster.job(ns, "demo-sft", kind="TrainJob") is None))


def granted(rules: list[Obj]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


# Granted, never called: admission checks it (OwnerReferencesPermissionEnforcement lets only
# who may update the owner's finalizers set blockOwnerDeletion on a child's ownerReference).
ADMISSION_ONLY = {("rlhf.dev", "rlhfruns/finalizers", "update")}


def test_rbac_grants_exactly_the_calls_the_operator_made(cluster: Cluster) -> None:
    """Last in the module: the emulator has seen every scenario above (stages, failure,
    suspension, edits, restarts, TrainJobs, bad specs), so the operator's API calls are all
    in its request log. The chart's cluster-wide ClusterRole must grant exactly those."""
    rendered = load_generate().render_chart({}, name="rlhf", namespace="rlhf")
    [role] = [d for docs in rendered.values() for d in docs if d["kind"] == "ClusterRole"]
    made = cluster.emulator.api_calls()
    grants = granted(role["rules"])
    assert made - grants == set(), "calls the chart does not grant"
    assert grants >= ADMISSION_ONLY and not ADMISSION_ONLY & made
    unused = sorted(grants - made - ADMISSION_ONLY)
    assert unused == [], f"grants the operator never used: {unused}"
    assert not any("*" in part for call in grants for part in call)
