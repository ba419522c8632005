"""A real Prometheus scrapes a local run: the operator metrics of `rlhf run --metrics-port` and
the rank-0 trainer endpoint, queried through Prometheus's HTTP API. The run's plots are checked
against its metrics.jsonl too.

The Prometheus binary comes from the Debian package `prometheus` (`make` installs it); without
it this test fails, never skips.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STEPS = 80  # long enough for several 1 s scrapes while the trainer steps
RUN_TIMEOUT_S = 150


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def prometheus_bin() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("prometheus not found: install the Debian package `prometheus` (make does)")
    return path


class Prometheus:
    """A Prometheus server on a free port with a temp config and storage; always killed."""

    def __init__(self, binary: str, folder: Path, targets: dict[str, tuple[int, dict[str, str]]]):
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [
                {"job_name": job, "static_configs": [
                    {"targets": [f"127.0.0.1:{port}"], "labels": labels}
                ]}
                for job, (port, labels) in targets.items()
            ],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = folder / "prometheus.log"
        argv = [
            binary,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)

    def get(self, path: str, timeout: float = 5) -> bytes:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body: bytes = response.read()
            return body

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            with contextlib.suppress(OSError):
                self.get("/-/ready", timeout=1)
                return
            time.sleep(0.2)
        raise AssertionError(f"Prometheus not ready in {timeout}s: {self.log.read_text()[-2000:]}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; returns the vector's results."""
        data = json.loads(self.get("/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
        assert data["status"] == "success", data
        result: list[dict[str, Any]] = data["data"]["result"]
        return result

    def value(self, expr: str) -> float:
        """The single value of an instant query that must return exactly one series."""
        result = self.query(expr)
        assert len(result) == 1, f"{expr}: expected one series, got {result}"
        return float(result[0]["value"][1])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def workdir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    out = tmp_path / "work"
    (out / "data").mkdir(parents=True)
    for path in (ROOT / "tests" / "fixtures").glob("*.jsonl"):
        shutil.copy(path, out / "data" / path.name)
    shutil.copytree(tiny_model_dir, out / "models" / "tiny-llama")
    return out


def longer_quickstart(folder: Path) -> Path:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    hp = doc["spec"]["stages"][0]["hyperparameters"]
    hp.update({"maxSteps": STEPS, "saveEvery": STEPS})
    path = folder / "quickstart.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@contextlib.contextmanager
def started(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "COLUMNS": "160"}
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()  # `rlhf run` stops its trainers on SIGTERM/KeyboardInterrupt
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def watch(prom: Prometheus, run: subprocess.Popen[bytes]) -> list[float]:
    """Poll the trainer's step through Prometheus while the run lasts; returns what was seen."""
    seen: list[float] = []
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while run.poll() is None and time.monotonic() < deadline:
        seen.extend(float(r["value"][1]) for r in prom.query("rlhf_trainer_step"))
        time.sleep(1)
    assert run.poll() is not None, f"the run did not finish in {RUN_TIMEOUT_S}s"
    return seen


def test_prometheus_scrapes_operator_and_trainer_during_a_run(
    prometheus_bin: str, workdir: Path, tmp_path: Path
) -> None:
    operator_port, trainer_port = free_port(), free_port()
    prom = Prometheus(prometheus_bin, tmp_path, {
        "rlhf-operator": (operator_port, {}),
        "rlhf-trainer": (trainer_port, {"run": "quickstart", "stage": "sft"}),
    })
    argv = [
        sys.executable, "-m", "rlhf_operator.cli", "run", str(longer_quickstart(tmp_path)),
        "--workdir", str(workdir), "--metrics-port", str(operator_port),
        "--trainer-metrics-port", str(trainer_port),
    ]
    started_at = time.time()
    try:
        prom.wait_ready()
        with started(argv, tmp_path / "run.log") as run:
            seen = watch(prom, run)
        assert run.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
        assert any(0 < step <= STEPS for step in seen), f"no mid-run trainer step seen: {seen}"
        check_series(prom, started_at)
    finally:
        prom.stop()
    trainer_logs = "".join(p.read_text() for p in (workdir / "quickstart" / "logs").iterdir())
    assert trainer_logs.count("Serving trainer metrics on port") == 1, "rank 0 only"
    assert "Failed to serve trainer metrics" not in trainer_logs
    check_plots(workdir / "quickstart")


def check_series(prom: Prometheus, started_at: float) -> None:
    """Range functions, so the samples still count after the run's endpoints went away."""
    def last(expr: str) -> float:
        return prom.value(f"last_over_time({expr}[5m])")

    def highest(expr: str) -> float:
        return prom.value(f"max_over_time({expr}[5m])")

    assert highest('up{job="rlhf-trainer"}') == 1 and highest('up{job="rlhf-operator"}') == 1
    assert 0 < highest("rlhf_trainer_step") <= STEPS
    assert last("rlhf_trainer_total_steps") == STEPS
    loss = last('rlhf_trainer_loss{kind="total"}')
    assert math.isfinite(loss) and 0 < loss < 20
    assert last('rlhf_trainer_tokens_per_second{phase="train"}') > 0
    assert started_at <= last("rlhf_trainer_last_step_timestamp_seconds") <= time.time()
    assert highest('rlhf_runs{phase="Running"}') == 1
    stage = 'namespace="default",run="quickstart",stage="sft"'
    assert highest(f'rlhf_run_stage_phase{{{stage},phase="Running"}}') == 1
    assert 0 < highest(f"rlhf_run_stage_step{{{stage}}}") <= STEPS
    assert highest('rlhf_run_info{run="quickstart",model="models/tiny-llama"}') == 1
    assert last("rlhf_reconcile_duration_seconds_count") > 0
    assert last("rlhf_reconcile_errors_total") == 0


def check_plots(run_dir: Path) -> None:
    png = run_dir / "plots" / "sft.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((run_dir / "plots" / "sft.json").read_text())
    records = [json.loads(line) for line in (run_dir / "sft" / "metrics.jsonl").open()]
    assert data["series"]["loss"] == {
        "steps": [r["step"] for r in records],
        "values": [r["loss"] for r in records],
    }
    assert data["series"]["loss"]["steps"] == list(range(1, STEPS + 1))
