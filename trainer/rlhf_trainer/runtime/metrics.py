"""Trainer metrics (prometheus-client): the trainer half of docs/METRICS.md.

Rank 0 serves them on `$RLHF_METRICS_PORT` (default 9400, declared as the container port
`metrics`; 0 disables); `start_server` is called once by the entry point. They are fed by
`ProgressReporter.log` with the very record it appends to metrics.jsonl, through `SERIES`, a
mapping from metrics.jsonl keys to series, so the file and the endpoint never disagree. Events
that are not per-step values have helpers: `observe_weight_sync` (and `weight_sync_timer`),
`observe_parity` and `count_judge_outcome`.

No torch here: importing this module costs a trainer nothing but prometheus-client.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal, get_args
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import start_http_server

PORT_ENV = "RLHF_METRICS_PORT"
DEFAULT_PORT = 9400

# No `<name>_created` series: they are not in docs/METRICS.md and no alert or panel needs them.
disable_created_metrics()  # type: ignore[no-untyped-call]
SyncBackend = Literal["disk", "nccl", "trainer"]
JudgeOutcome = Literal["kept", "disagreed", "unparseable", "timeout", "error"]
# Disk sync of a small model on CPU takes well under a second; a 70B snapshot on a PVC takes
# minutes. The buckets span both.
WEIGHT_SYNC_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# metrics.jsonl key -> (series, its labels). Keys not listed (learning_rate, grad_norm, epoch,
# eval_loss, ...) stay in the file only. The table in docs/METRICS.md mirrors this.
SERIES: dict[str, tuple[str, dict[str, str]]] = {
    "loss": ("loss", {"kind": "total"}),
    "policy_loss": ("loss", {"kind": "policy"}),
    "value_loss": ("loss", {"kind": "value"}),
    "sft_loss": ("loss", {"kind": "sft"}),
    "reward_loss": ("loss", {"kind": "reward"}),
    "dpo_loss": ("loss", {"kind": "dpo"}),
    "rrhf_loss": ("loss", {"kind": "rrhf"}),
    "reward_mean": ("reward_mean", {"kind": "raw"}),
    "reward_std": ("reward_std", {"kind": "raw"}),
    "reward_scaled_mean": ("reward_mean", {"kind": "scaled"}),
    "reward_scaled_std": ("reward_std", {"kind": "scaled"}),
    "kl": ("kl", {}),
    "clip_fraction": ("clip_fraction", {}),
    "tokens_per_s": ("tokens_per_second", {"phase": "train"}),
    "train_tokens_per_s": ("tokens_per_second", {"phase": "train"}),
    "generate_tokens_per_s": ("tokens_per_second", {"phase": "generate"}),
    "logprob_mismatch": ("logprob_mismatch", {}),
    "episode_reward": ("episode_reward", {}),
    "episode_turns": ("episode_turns", {}),
}
# metrics.jsonl key of a step's count -> reason of rlhf_trainer_episodes_dropped_total.
EPISODES_DROPPED: dict[str, str] = {
    **{f"episodes_dropped_{r}": r for r in ("timeout", "http_status", "malformed", "connection")},
    "episodes_cut": "cut",
}
# An environment answers in milliseconds; a sandbox that runs code may take seconds.
ENV_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

log = logging.getLogger(__name__)


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(value) else None


ROLLOUT_FAILURES = ("timeout", "error", "unparseable", "malformed")


class TrainerMetrics:
    """Every trainer series of docs/METRICS.md, in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.step = Gauge("rlhf_trainer_step", "Optimizer steps done.", registry=r)
        self.total_steps = Gauge("rlhf_trainer_total_steps", "Steps planned.", registry=r)
        self.last_step = Gauge(
            "rlhf_trainer_last_step_timestamp_seconds",
            "Unix time of the last logged step.",
            registry=r,
        )
        self.gauges: dict[str, Gauge] = {
            "loss": Gauge("rlhf_trainer_loss", "Latest losses.", ["kind"], registry=r),
            "reward_mean": Gauge(
                "rlhf_trainer_reward_mean", "Mean reward of the step's batch.", ["kind"], registry=r
            ),
            "reward_std": Gauge(
                "rlhf_trainer_reward_std", "Std of the step's rewards.", ["kind"], registry=r
            ),
            "kl": Gauge("rlhf_trainer_kl", "Mean KL to the reference policy.", registry=r),
            "clip_fraction": Gauge(
                "rlhf_trainer_clip_fraction", "Share of clipped ratios.", registry=r
            ),
            "tokens_per_second": Gauge(
                "rlhf_trainer_tokens_per_second", "Throughput.", ["phase"], registry=r
            ),
            "logprob_mismatch": Gauge(
                "rlhf_trainer_logprob_mismatch",
                "Max abs logprob gap of the last parity probe.",
                registry=r,
            ),
            "episode_reward": Gauge(
                "rlhf_trainer_episode_reward", "Mean episode reward of the step.", registry=r
            ),
            "episode_turns": Gauge(
                "rlhf_trainer_episode_turns", "Mean assistant turns per episode.", registry=r
            ),
        }
        self.episodes_dropped = Counter(
            "rlhf_trainer_episodes_dropped",  # exposed with _total
            "Episodes dropped (timeout, http_status, malformed, connection) or cut at maxLength.",
            ["reason"],
            registry=r,
        )
        for reason in EPISODES_DROPPED.values():  # present at 0, so rate() works from the start
            self.episodes_dropped.labels(reason=reason)
        self.environment_requests = Histogram(
            "rlhf_trainer_environment_request_seconds",
            "Latency of one /reset or /step request to an environment server.",
            buckets=ENV_REQUEST_BUCKETS,
            registry=r,
        )
        self.weight_sync = Histogram(
            "rlhf_trainer_weight_sync_seconds",
            "Time of one weight sync to the rollout servers.",
            ["backend"],
            buckets=WEIGHT_SYNC_BUCKETS,
            registry=r,
        )
        self.parity_failures = Counter(
            "rlhf_trainer_weight_sync_parity_failures",  # exposed with _total
            "Parity probes over the threshold.",
            registry=r,
        )
        self.judge_outcomes = Counter(
            "rlhf_trainer_judge_outcomes",  # exposed with _total
            "Judge verdicts by outcome.",
            ["outcome"],
            registry=r,
        )
        for outcome in get_args(JudgeOutcome):  # present at 0, so rate() works from the start
            self.judge_outcomes.labels(outcome=outcome)
        self.rollout_failures = Counter(
            "rlhf_trainer_rollout_failures",  # exposed with _total
            "Failed rollout request attempts (retried ones included) by outcome: timeout, "
            "error, unparseable, malformed.",
            ["outcome"],
            registry=r,
        )
        for failure in ROLLOUT_FAILURES:
            self.rollout_failures.labels(outcome=failure)

    def set_total_steps(self, total: int) -> None:
        self.total_steps.set(total)

    def observe_step(self, record: Mapping[str, Any], now: float | None = None) -> None:
        """Take one metrics.jsonl record ({"step": N, "loss": ..., ...}) into the series."""
        step = record.get("step")
        if isinstance(step, int):
            self.step.set(step)
            self.last_step.set(time.time() if now is None else now)
        for key, (series, labels) in SERIES.items():
            value = _number(record.get(key))
            if value is None:
                continue
            gauge = self.gauges[series]
            (gauge.labels(**labels) if labels else gauge).set(value)
        for key, reason in EPISODES_DROPPED.items():
            count = _number(record.get(key))
            if count is not None and count >= 0:
                self.episodes_dropped.labels(reason=reason).inc(count)

    def observe_weight_sync(self, backend: SyncBackend, seconds: float) -> None:
        if backend not in get_args(SyncBackend):
            raise ValueError(f"unknown weight-sync backend {backend!r}")
        self.weight_sync.labels(backend=backend).observe(seconds)

    def observe_parity(self, mismatch: float, failed: bool) -> None:
        """One parity probe after a sync: its max abs logprob gap and whether it failed."""
        self.gauges["logprob_mismatch"].set(mismatch)
        if failed:
            self.parity_failures.inc()

    def count_judge_outcome(self, outcome: JudgeOutcome, count: int = 1) -> None:
        if outcome not in get_args(JudgeOutcome):
            raise ValueError(f"unknown judge outcome {outcome!r}")
        self.judge_outcomes.labels(outcome=outcome).inc(count)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# The process's metrics: one trainer per process, so one registry.
METRICS = TrainerMetrics()
_server: WSGIServer | None = None


def metrics_port(env: Mapping[str, str] | None = None) -> int:
    """The port from $RLHF_METRICS_PORT (default 9400; 0 disables)."""
    raw = (os.environ if env is None else env).get(PORT_ENV, "").strip()
    if not raw:
        return DEFAULT_PORT
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"{PORT_ENV}={raw!r}: expected a port number, or 0 to disable") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{PORT_ENV}={raw!r}: expected a port number, or 0 to disable")
    return port


def start_server(env: Mapping[str, str] | None = None, addr: str = "0.0.0.0") -> int | None:
    """Serve METRICS on the configured port, once per process; call it on rank 0 only.

    Returns the bound port, or None when disabled or the port is taken: metrics are worth a
    warning, never a failed training run.
    """
    global _server
    if _server is not None:
        return int(_server.server_port)
    try:
        port = metrics_port(env)
        if port == 0:
            return None
        _server, _thread = start_http_server(port, addr=addr, registry=METRICS.registry)
    except (OSError, ValueError) as err:
        log.warning("Failed to serve trainer metrics: %s", err)
        return None
    log.info("Serving trainer metrics on port %d", _server.server_port)
    return int(_server.server_port)


def observe_weight_sync(backend: SyncBackend, seconds: float) -> None:
    """Record one weight sync's duration (rlhf_trainer_weight_sync_seconds)."""
    METRICS.observe_weight_sync(backend, seconds)


@contextmanager
def weight_sync_timer(backend: SyncBackend) -> Iterator[None]:
    """Time a weight sync; one that raises is not observed (it did not complete)."""
    started = time.perf_counter()
    yield
    METRICS.observe_weight_sync(backend, time.perf_counter() - started)


def observe_parity(mismatch: float, failed: bool) -> None:
    """Record a parity probe (rlhf_trainer_logprob_mismatch, ..._parity_failures_total)."""
    METRICS.observe_parity(mismatch, failed)


def observe_environment_request(seconds: float) -> None:
    """One /reset or /step latency (rlhf_trainer_environment_request_seconds)."""
    METRICS.environment_requests.observe(seconds)


def count_rollout_failure(outcome: str, count: int = 1) -> None:
    """Count failed rollout attempts (rlhf_trainer_rollout_failures_total{outcome})."""
    METRICS.rollout_failures.labels(outcome=outcome).inc(count)


def count_judge_outcome(outcome: JudgeOutcome, count: int = 1) -> None:
    """Count judge verdicts (rlhf_trainer_judge_outcomes_total{outcome})."""
    METRICS.count_judge_outcome(outcome, count)
