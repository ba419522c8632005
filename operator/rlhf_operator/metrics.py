"""Operator metrics (prometheus-client): the operator half of docs/METRICS.md.

`RunMetrics` holds the latest known status of every RLHFRun and renders the per-run series
from it at scrape time, so a run's series are exactly those of its current status: a stage that
moved on leaves no stale phase behind, and `forget_run` (on deletion) removes every series of
the run. Cardinality stays bounded by the number of runs and their stages.

Both executors use it: the kopf operator (`rlhf operator`) and the local executor
(`rlhf run --metrics-port`), so a local run is observable like a cluster one.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import get_args
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from rlhf_operator import api

PHASES: tuple[str, ...] = get_args(api.Phase)
PORT_ENV = "RLHF_METRICS_PORT"  # set by the chart on the operator Deployment
DEFAULT_PORT = 8080
# No `<name>_created` series: they are not in docs/METRICS.md and no alert or panel needs them.
disable_created_metrics()  # type: ignore[no-untyped-call]
# A reconcile is a plan plus a handful of API calls: milliseconds normally, seconds when the
# API server is slow. The upper buckets catch a stuck call before its timeout.
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class _RunState:
    namespace: str
    name: str
    model: str
    status: api.RunStatus


def model_label(run: api.RLHFRun) -> str:
    """The `model` label of rlhf_run_info: the hub id, or the folder of a local model."""
    model = run.spec.model
    return model.name if model.name is not None else str(model.path)


class _RunCollector(Collector):
    """Renders rlhf_runs, rlhf_run_info and the rlhf_run_stage_* series from run states."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[tuple[str, str], _RunState] = {}

    def put(self, state: _RunState) -> None:
        with self._lock:
            self._runs[(state.namespace, state.name)] = state

    def drop(self, namespace: str, name: str) -> None:
        with self._lock:
            self._runs.pop((namespace, name), None)

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            states = sorted(self._runs.values(), key=lambda s: (s.namespace, s.name))
        return _families(states)


def _families(states: list[_RunState]) -> Iterator[Metric]:
    runs = GaugeMetricFamily("rlhf_runs", "RLHFRuns by phase.", labels=["phase"])
    counts = dict.fromkeys(PHASES, 0)
    for state in states:
        counts[state.status.phase] += 1
    for name, count in counts.items():
        runs.add_metric([name], count)
    yield runs

    info = GaugeMetricFamily(
        "rlhf_run_info", "One series per RLHFRun (always 1).", labels=["namespace", "run", "model"]
    )
    stage_labels = ["namespace", "run", "stage"]
    phase = GaugeMetricFamily(
        "rlhf_run_stage_phase",
        "1 for the stage's current phase, 0 for the others.",
        labels=[*stage_labels, "phase"],
    )
    step = GaugeMetricFamily(
        "rlhf_run_stage_step", "The stage's latest optimizer step.", labels=stage_labels
    )
    reward = GaugeMetricFamily(
        "rlhf_run_stage_reward", "The stage's latest mean reward.", labels=stage_labels
    )
    for state in states:
        info.add_metric([state.namespace, state.name, state.model], 1)
        for stage in state.status.stages:
            where = [state.namespace, state.name, stage.name]
            for candidate in PHASES:
                phase.add_metric([*where, candidate], 1 if stage.phase == candidate else 0)
            metrics = stage.metrics
            if metrics is not None and metrics.step is not None:
                step.add_metric(where, metrics.step)
            if metrics is not None and metrics.reward is not None:
                reward.add_metric(where, metrics.reward)
    yield from (info, phase, step, reward)


class RunMetrics:
    """The operator's metrics in their own registry.

    observe_run(run, status)   after every reconcile (the status it computed)
    forget_run(ns, name)       when the run is deleted
    with reconcile_timer():    around each reconcile: duration, and errors when it raises
    serve(port)                start the /metrics HTTP endpoint (a daemon thread)
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._runs = _RunCollector()
        self.registry.register(self._runs)
        self.reconcile_duration = Histogram(
            "rlhf_reconcile_duration_seconds",
            "Time of one reconcile of an RLHFRun.",
            buckets=RECONCILE_BUCKETS,
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "rlhf_reconcile_errors",  # exposed as rlhf_reconcile_errors_total
            "Reconciles that raised.",
            registry=self.registry,
        )

    def observe_run(self, run: api.RLHFRun, status: api.RunStatus | None = None) -> None:
        """Record the run's status (default: `run.status`); replaces what was known of it."""
        current = status if status is not None else (run.status or api.RunStatus())
        self._runs.put(
            _RunState(run.metadata.namespace, run.metadata.name, model_label(run), current)
        )

    def forget_run(self, namespace: str, name: str) -> None:
        """Drop every series of a deleted run."""
        self._runs.drop(namespace, name)

    @contextmanager
    def reconcile_timer(self) -> Iterator[None]:
        """Time the block into rlhf_reconcile_duration_seconds; count it as an error if it
        raises (the exception propagates)."""
        started = time.perf_counter()
        try:
            yield
        except BaseException:
            self.reconcile_errors.inc()
            raise
        finally:
            self.reconcile_duration.observe(time.perf_counter() - started)

    def exposition(self) -> bytes:
        """The text a scrape of /metrics returns now."""
        return generate_latest(self.registry)

    def serve(self, port: int, addr: str = "0.0.0.0") -> WSGIServer:
        """Serve /metrics on `addr:port` from a daemon thread; port 0 picks a free one (read
        it from `server.server_port`). Stop it with `server.shutdown()`."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server


def port_from_env(env: Mapping[str, str] | None = None) -> int:
    """The operator's metrics port: $RLHF_METRICS_PORT, default 8080 (docs/METRICS.md)."""
    raw = (os.environ if env is None else env).get(PORT_ENV, "").strip()
    if not raw:
        return DEFAULT_PORT
    if not raw.isdigit() or int(raw) > 65535:
        raise ValueError(f"{PORT_ENV}={raw!r}: expected a port number")
    return int(raw)
