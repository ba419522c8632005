"""End to end: `rlhf run` stopped by a signal during an online stage leaves no process behind.

`kill` and `timeout` send SIGTERM, a closed SSH session SIGHUP; each must stop torchrun and its
workers, write a status that says the run was interrupted, and exit 128 + the signal number.
SIGKILL, which `rlhf run` never sees, must still take its children with it (their parent-death
signal), a vLLM server and its engine core included: an orphaned server holds memory for good.
A run is found by process session (each child leads its own) and by its work dir in a command
line, read from /proc.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
RLHF = [sys.executable, "-m", "rlhf_operator.cli"]
NAME = "sig"


def spec(engine: str, max_steps: int) -> dict[str, Any]:
    """A GRPO stage on the tiny model, from its first step on: a checkpoint every step."""
    rollout: dict[str, Any] = {"engine": engine}
    if engine == "vllm":
        rollout.update({"replicas": 1, "weightSync": "disk", "maxModelLen": 128})
        rollout["dtype"] = "float32"
    stage = {
        "name": "grpo",
        "type": "grpo",
        "dataset": {"path": "data/prompts.jsonl", "format": "prompts"},
        "reward": {"function": "animal_sounds"},
        "rollout": rollout,
        "hyperparameters": {
            "maxSteps": max_steps, "learningRate": 5.0e-4, "batchSize": 8, "maxLength": 48,
            "seed": 0, "saveEvery": 1,
        },
        "grpo": {"numGenerations": 4, "rolloutBatchSize": 2, "maxNewTokens": 4},
    }
    return {
        "apiVersion": "rlhf.dev/v1alpha1",
        "kind": "RLHFRun",
        "metadata": {"name": NAME},
        "spec": {"model": {"path": "models/tiny"}, "stages": [stage]},
    }


def workspace(tmp: Path, model: Path, engine: str, max_steps: int) -> Path:
    (tmp / "data").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "fixtures" / "prompts.jsonl", tmp / "data")
    shutil.copytree(model, tmp / "models" / "tiny")
    (tmp / "run.yaml").write_text(yaml.safe_dump(spec(engine, max_steps)))
    return tmp


@pytest.fixture
def start() -> Iterator[Callable[[Path], subprocess.Popen[str]]]:
    """Starts `rlhf run` in the background; one a failed test left running is stopped."""
    started: list[subprocess.Popen[str]] = []

    def run(workdir: Path) -> subprocess.Popen[str]:
        with (workdir / "rlhf.out").open("a") as out:
            started.append(subprocess.Popen(
                [*RLHF, "run", str(workdir / "run.yaml"), "--workdir", str(workdir)],
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,  # its own session: the test's signal reaches it alone
                env={**os.environ, "COLUMNS": "160"},
            ))
        return started[-1]

    yield run
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def processes() -> dict[int, tuple[int, int, str]]:
    """Live processes: pid -> (parent pid, session id, command line). Zombies are dead."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if fields[0] != "Z":
            found[int(entry.name)] = (int(fields[1]), int(fields[3]), cmdline)
    return found


def descendants(root: int) -> dict[int, tuple[int, int, str]]:
    procs = processes()
    tree, frontier = set(), {root}
    while frontier:
        tree |= frontier
        frontier = {pid for pid, (ppid, _, _) in procs.items() if ppid in frontier} - tree
    return {pid: procs[pid] for pid in tree - {root} if pid in procs}


def sessions_under(root: int) -> set[int]:
    """The sessions of `root`'s descendants: each child of `rlhf run` leads its own, and so
    does each torchrun worker."""
    return {sid for _, sid, _ in descendants(root).values()}


def worker_started(root: int) -> Callable[[], bool]:
    """True once torchrun has started the stage's worker (`python -u -m rlhf_trainer grpo`)."""
    return lambda: any(
        " -m rlhf_trainer grpo" in cmd and "torch.distributed.run" not in cmd
        for _, _, cmd in descendants(root).values()
    )


def left_over(sessions: set[int], workdir: Path) -> dict[int, str]:
    return {
        pid: cmd
        for pid, (_, sid, cmd) in processes().items()
        if sid in sessions or str(workdir) in cmd
    }


def wait_for(what: str, check: Callable[[], bool], proc: subprocess.Popen[str], timeout: float,
             workdir: Path) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log = (workdir / "rlhf.out").read_text()[-3000:]
            pytest.fail(f"never saw {what} (rlhf exited {proc.poll()}):\n{log}")
        time.sleep(0.2)


def checkpoints(workdir: Path) -> list[Path]:
    return sorted((workdir / NAME / "grpo" / "checkpoints").glob("step-*"))


def stop_and_check_nothing_is_left(
    proc: subprocess.Popen[str], sig: int, workdir: Path, sessions: set[int]
) -> float:
    """Send `sig`; return how long until no process of the run was left (at most 30 s)."""
    assert sessions, "the run's children were seen"
    sent = time.monotonic()
    os.kill(proc.pid, sig)
    while left_over(sessions, workdir) and time.monotonic() - sent < 30:
        time.sleep(0.2)
    gone = time.monotonic() - sent
    assert not left_over(sessions, workdir), f"left after {sig!r}: {left_over(sessions, workdir)}"
    proc.wait(timeout=30)  # waited for above: the children were gone first
    return gone


def interrupted_status(workdir: Path) -> dict[str, Any]:
    status = json.loads((workdir / NAME / "status.json").read_text())
    assert status["phase"] == "Suspended"
    [stage] = status["stages"]
    assert stage["phase"] == "Suspended"
    assert {c["reason"] for c in status["conditions"]} == {"Interrupted"}
    assert {c["status"] for c in status["conditions"]} == {"False"}
    return status


def test_sigterm_stops_the_trainer_says_so_and_a_rerun_resumes(
    tiny_model_dir: Path, tmp_path: Path, start: Callable[[Path], subprocess.Popen[str]]
) -> None:
    workdir = workspace(tmp_path, tiny_model_dir, engine="trainer", max_steps=6)
    proc = start(workdir)
    wait_for("a checkpoint", lambda: bool(checkpoints(workdir)), proc, 180, workdir)
    sessions = sessions_under(proc.pid)
    gone = stop_and_check_nothing_is_left(proc, signal.SIGTERM, workdir, sessions)
    assert proc.returncode == 128 + signal.SIGTERM, (workdir / "rlhf.out").read_text()[-2000:]
    assert gone < 30
    status = interrupted_status(workdir)
    message = status["conditions"][0]["message"]
    assert "Interrupted by SIGTERM at stage grpo" in message
    assert "resumes each stage from its last checkpoint" in message
    assert "Interrupted by SIGTERM; stopped" in (workdir / "rlhf.out").read_text()
    last = int(checkpoints(workdir)[-1].name.removeprefix("step-"))
    assert last < 6, "interrupted before the stage finished"

    rerun = subprocess.run(
        [*RLHF, "run", str(workdir / "run.yaml"), "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = (workdir / NAME / "logs" / f"{NAME}-grpo-0.log").read_text()
    assert "Resumed from checkpoint step-" in log
    final = json.loads((workdir / NAME / "status.json").read_text())
    assert final["phase"] == "Succeeded"
    assert final["stages"][0]["metrics"]["step"] == 6


def test_sighup_stops_the_trainer(
    tiny_model_dir: Path, tmp_path: Path, start: Callable[[Path], subprocess.Popen[str]]
) -> None:
    workdir = workspace(tmp_path, tiny_model_dir, engine="trainer", max_steps=200)
    proc = start(workdir)
    wait_for("the trainer's worker", worker_started(proc.pid), proc, 180, workdir)
    sessions = sessions_under(proc.pid)
    stop_and_check_nothing_is_left(proc, signal.SIGHUP, workdir, sessions)
    assert proc.returncode == 128 + signal.SIGHUP
    status = interrupted_status(workdir)
    assert "Interrupted by SIGHUP" in status["conditions"][0]["message"]
    assert not (workdir / NAME / "grpo" / "final").exists()


def test_sigkill_takes_the_vllm_server_and_trainer_along(
    tiny_model_dir: Path, tmp_path: Path, start: Callable[[Path], subprocess.Popen[str]]
) -> None:
    """No handler runs on SIGKILL: the children's parent-death signal (SIGTERM) must stop the
    vLLM API server, which stops its engine core, and torchrun, which stops its worker. The
    trainer starts once the server is ready: both are up when the signal is sent."""
    workdir = workspace(tmp_path, tiny_model_dir, engine="vllm", max_steps=200)
    proc = start(workdir)
    wait_for("the trainer's worker", worker_started(proc.pid), proc, 300, workdir)
    sessions = sessions_under(proc.pid)
    commands = " | ".join(cmd for _, _, cmd in descendants(proc.pid).values())
    for part in ("vllm.entrypoints.openai.api_server", "EngineCore", "torch.distributed.run"):
        assert part in commands
    stop_and_check_nothing_is_left(proc, signal.SIGKILL, workdir, sessions)
    assert proc.returncode == -signal.SIGKILL
