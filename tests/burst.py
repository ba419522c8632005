"""Many RLHFRuns created at once against the emulator and a real `rlhf operator`.

The scenario behind tests/integration/test_operator_scale.py, which checks what the operator
did, and bench/operator_scale.py, which reports how long it took and how many API calls it
made. Everything is read from the emulator's request log: the operator's requests are those
whose User-Agent is not the tests'.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from helpers import manifest
from kube_emulator import TEST_AGENT, Client, Emulator, Obj, rbac_call, wait_for

RUNS = "/apis/rlhf.dev/v1alpha1/namespaces/{ns}/rlhfruns"
OPERATOR_ARGS = ("--all-namespaces", "--metrics-port", "0")
# Longer than a burst lasts. Every tick of the resync timer is a full reconcile of every run
# (a GET and one LIST per child kind); a 1 s timer over 200 runs would be most of the traffic.
RESYNC_SECONDS = 3600.0
WATCHED = {"rlhfruns", "pytorchjobs", "trainjobs", "deployments", "pods"}
JOB_RESOURCES = {"pytorchjobs", "trainjobs"}
READ_VERBS = {"get", "list"}


def run_doc(index: int, namespaces: int) -> Obj:
    """Run number `index` of a burst: the tests' two-stage sft run, spread over namespaces."""
    doc = manifest()
    meta = doc["metadata"]
    meta.update(name=f"run-{index:03d}", namespace=f"scale-{index % namespaces}")
    del meta["uid"]  # the emulator gives each its own
    return doc


def wait_for_operator(emulator: Emulator, timeout: float = 60.0) -> None:
    """Until the operator watches runs and every child kind it reacts to."""

    def watching() -> bool:
        seen = set()
        for request in list(emulator.handler):
            call = rbac_call(request.method.value, request.url.path, dict(request.url.query))
            if call is not None and call[2] == "watch" and _operator(request):
                seen.add(call[1])
        return seen >= WATCHED

    wait_for("the operator's watches", watching, timeout=timeout)


def _operator(request: Any) -> bool:
    agent = request.headers.get("User-Agent", "")
    return agent != TEST_AGENT and not agent.startswith("rlhf-trainer/")


@dataclass
class Burst:
    """What the operator did after `n` runs were posted at once; times from the first POST."""

    runs: list[tuple[str, str]]  # (namespace, name), in the order they were posted
    posted_s: float = 0.0  # every run posted
    first_jobs_s: float = 0.0  # every run has its first trainer job
    statuses_s: float = 0.0  # every run has its status written
    settled_s: float = 0.0  # the operator's last request before `quiet` seconds of none
    calls: Counter[str] = field(default_factory=Counter)  # 'verb resource', no watches
    created: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # resource, ns, name
    status_patches: Counter[tuple[str, str]] = field(default_factory=Counter)  # ns, run

    @property
    def reads(self) -> int:
        return sum(n for call, n in self.calls.items() if call.split()[0] in READ_VERBS)

    @property
    def writes(self) -> int:
        return sum(self.calls.values()) - self.reads

    def summary(self) -> str:
        n = len(self.runs)
        calls = ", ".join(f"{call} {count / n:.2f}" for call, count in sorted(self.calls.items()))
        return (
            f"{n} runs: posted in {self.posted_s:.1f} s, first jobs in {self.first_jobs_s:.1f} s, "
            f"statuses in {self.statuses_s:.1f} s, settled in {self.settled_s:.1f} s; "
            f"operator requests per run: {self.reads / n:.2f} reads, {self.writes / n:.2f} "
            f"writes ({calls})"
        )

    def record(self, request: Any) -> None:
        """Count one operator request."""
        call = rbac_call(request.method.value, request.url.path, dict(request.url.query))
        if call is None or call[2] == "watch":
            return  # discovery, and the long-lived watches (per operator, not per run)
        _, resource, verb = call
        self.calls[f"{verb} {resource}"] += 1
        if verb == "create":
            meta = json.loads(request.body)["metadata"]
            self.created[resource, meta.get("namespace", ""), meta.get("name", "")] += 1
        parts = request.url.path.split("/")
        if resource == "rlhfruns/status" and verb == "patch":
            self.status_patches[parts[-4], parts[-2]] += 1


def burst(
    emulator: Emulator,
    client: Client,
    n: int,
    namespaces: int = 10,
    threads: int = 16,
    quiet: float = 2.0,
    timeout: float = 300.0,
) -> Burst:
    """POST `n` runs from `threads` threads at once; return when every run has its first job
    and its status and the operator has then made no request for `quiet` seconds."""
    docs = [run_doc(i, namespaces) for i in range(n)]
    result = Burst(runs=[(d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs])
    expected = set(result.runs)
    with_job: set[tuple[str, str]] = set()
    seen = len(list(emulator.handler))
    start = last = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        posts = [pool.submit(client.call, "POST", RUNS.format(ns=ns), doc)
                 for (ns, _), doc in zip(result.runs, docs, strict=True)]
        while True:
            now = time.monotonic()
            requests = list(emulator.handler)[seen:]
            seen += len(requests)
            for request in filter(_operator, requests):
                result.record(request)
                last = now
                job = _job_of(request)
                if job is not None:
                    with_job.add(job)
            if not result.posted_s and all(p.done() for p in posts):
                for post in posts:
                    post.result()  # raises what a POST raised
                result.posted_s = now - start
            if not result.first_jobs_s and with_job >= expected:
                result.first_jobs_s = now - start
            if not result.statuses_s and set(result.status_patches) >= expected:
                result.statuses_s = now - start
            if result.statuses_s and result.first_jobs_s and now - last >= quiet:
                result.settled_s = last - start
                return result
            if now - start > timeout:
                missing = sorted(expected - with_job)[:5] or sorted(
                    expected - set(result.status_patches))[:5]
                raise AssertionError(f"timed out after {timeout:.0f}s; e.g. {missing}, "
                                     f"{result.summary()}")
            time.sleep(0.05)


def _job_of(request: Any) -> tuple[str, str] | None:
    """(namespace, run) of a trainer job this request creates."""
    call = rbac_call(request.method.value, request.url.path, dict(request.url.query))
    if call is None or call[1] not in JOB_RESOURCES or call[2] != "create":
        return None
    meta = json.loads(request.body)["metadata"]
    return meta["namespace"], meta["labels"]["rlhf.dev/run"]
