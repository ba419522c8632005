"""SIGKILL a torchrun run the way a dying pod ends it, for the kill-and-resume tests.

`start_in_own_group` starts a command in its own session; `kill_when` waits until a condition
holds (a checkpoint folder, a metrics line) and then kills torchrun and every worker at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def start_in_own_group(argv: Sequence[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        list(argv),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def descendants(pid: int) -> list[int]:
    """Child processes, recursively, from /proc (Linux)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                out += [int(child), *descendants(int(child))]
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL torchrun and its workers at once, as when a pod dies. torchrun starts each worker
    in its own session, so killing torchrun's process group alone would orphan them."""
    victims = [pid, *descendants(pid)]
    for victim in victims:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(victim, signal.SIGKILL)
    for victim in victims[1:]:
        while not gone(victim):
            time.sleep(0.01)


def gone(pid: int) -> bool:
    """The process has exited (a zombie only waits for its parent to read its status)."""
    return not Path(f"/proc/{pid}").exists() or "zombie" in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0]
    except (OSError, IndexError):
        return "zombie"


def kill_when(
    proc: subprocess.Popen[str], ready: Callable[[], bool], timeout_s: float = 240
) -> str:
    """Wait for `ready()` while the run lives, then SIGKILL its whole tree; its stderr."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert proc.poll() is None, "the run ended before the kill:\n" + proc.communicate()[1]
        assert time.monotonic() < deadline, "the kill condition never held"
        time.sleep(0.05)
    kill_tree(proc.pid)
    return proc.communicate()[1]


def metrics(output_dir: Path) -> list[dict[str, Any]]:
    path = output_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


def logged_step(output_dir: Path, step: int) -> Callable[[], bool]:
    """A kill condition: the metrics line of `step` (or a later one) is written."""

    def ready() -> bool:
        try:
            return any(m["step"] >= step for m in metrics(output_dir))
        except ValueError:  # a line half written
            return False

    return ready
