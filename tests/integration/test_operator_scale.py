"""200 RLHFRuns created at once: every one reaches its first job, once, with its status.

`rlhf operator --all-namespaces` (a subprocess) against its own Kubernetes API emulator. The
test asserts what the operator did, never how fast: the timings it prints are measured
properly, with repeats, by bench/operator_scale.py (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from burst import OPERATOR_ARGS, RESYNC_SECONDS, burst, wait_for_operator
from kube_emulator import Client, Emulator, operator_process

pytestmark = pytest.mark.integration

N = 200
ALL_RUNS = "/apis/rlhf.dev/v1alpha1/rlhfruns"
ALL_JOBS = "/apis/kubeflow.org/v1/pytorchjobs"
ALL_CONFIGMAPS = "/api/v1/configmaps"


def test_200_runs_at_once_each_reach_their_first_job_once(tmp_path: Path) -> None:
    log = tmp_path / "operator.log"
    with Emulator() as emulator, operator_process(
        emulator.kubeconfig(tmp_path / "kubeconfig"), log, *OPERATOR_ARGS,
        resync_seconds=RESYNC_SECONDS,
    ) as proc:
        client = Client(emulator.url)
        wait_for_operator(emulator)
        result = burst(emulator, client, N, timeout=600)
        print(result.summary())
        assert proc.poll() is None, "the operator is still running"
        runs = {(r["metadata"]["namespace"], r["metadata"]["name"]): r
                for r in client.items(ALL_RUNS)}
        jobs = client.items(ALL_JOBS)
        configmaps = client.items(ALL_CONFIGMAPS)

    assert sorted(runs) == sorted(result.runs)
    for (_, name), run in runs.items():
        status = run.get("status") or {}
        assert status.get("phase") in ("Pending", "Running"), (name, status)
        assert status["currentStage"] == "sft" and status["observedGeneration"] == 1
        first, second = status["stages"]
        assert first["name"] == "sft" and first["jobName"] == f"{name}-sft"
        assert second["phase"] == "Pending" and "jobName" not in second

    # Each run's first job and its ConfigMap, created once each, owned by that run.
    uids = {key: run["metadata"]["uid"] for key, run in runs.items()}
    for kind, children, suffix in (("PyTorchJob", jobs, "-sft"),
                                   ("ConfigMap", configmaps, "-sft-config")):
        owners = Counter()
        for child in children:
            meta = child["metadata"]
            run = meta["labels"]["rlhf.dev/run"]
            assert meta["name"] == run + suffix, f"only the first stage's {kind}"
            [owner] = meta["ownerReferences"]
            assert owner["uid"] == uids[meta["namespace"], run]
            owners[meta["namespace"], run] += 1
        assert owners == Counter(result.runs), f"one {kind} per run"
    creates = Counter(resource for resource, _, _ in result.created)
    assert creates["pytorchjobs"] == creates["configmaps"] == N
    assert set(result.created.values()) == {1}, "nothing POSTed twice"
    assert result.status_patches == Counter(result.runs), "each status written once"
    deletes = [call for call in result.calls if call.startswith(("delete", "deletecollection"))]
    assert deletes == []
