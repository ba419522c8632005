"""Tying a local run's processes to `rlhf run`: stop signals and the parent's death.

`rlhf run` is stopped in more ways than Ctrl-C: `kill` and `timeout` send SIGTERM, a closed
SSH session or terminal sends SIGHUP, `docker stop` and a CI cancel send SIGTERM and then
SIGKILL. `StopSignals` turns SIGINT, SIGTERM and SIGHUP into the one exception Ctrl-C raises
(`Interrupted`, a KeyboardInterrupt), so a single path stops the children, records why in
status.json (`interrupted_status`) and exits 128 + the signal number.

No handler sees SIGKILL, so each child also asks the kernel to send it SIGTERM when its parent
dies (`die_with_parent`, Linux's PR_SET_PDEATHSIG). SIGTERM, not SIGKILL: torchrun forwards it
to its workers and a vLLM server shuts down its engine core, which a SIGKILL of the direct
child would leave running. The same hook covers a child forked by `Popen` just before a signal
interrupts the executor, which the executor never got to record.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType

from rlhf_operator import api
from rlhf_operator.planner import CONDITION_TYPES

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
INTERRUPTED = "Interrupted"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGINT, SIGTERM or SIGHUP) received by `rlhf run`."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """What a shell reports for a process the signal ended: 130, 143, 129."""
        return 128 + self.signum


def report_interrupt(err: KeyboardInterrupt) -> int:
    """Say what stopped `rlhf` and return its exit status, 128 + the signal number (130 for a
    plain KeyboardInterrupt). A terminal closed by SIGHUP may take stderr with it."""
    stop = err if isinstance(err, Interrupted) else Interrupted(signal.SIGINT)
    with contextlib.suppress(OSError):
        print(f"Interrupted by {stop}; stopped the run's processes", file=sys.stderr)
    return stop.exit_code


class StopSignals:
    """While active, SIGINT, SIGTERM and SIGHUP raise `Interrupted` in the main thread.

    After `hold()`, a signal is only remembered, so that a cleanup under way (stopping the
    children, which may take their grace period) runs to its end; leaving the block then raises
    the remembered signal. A signal already ignored stays ignored (`nohup rlhf run` keeps
    running when its terminal closes). Off the main thread, where Python cannot install
    handlers, it does nothing.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.holding = False
        self._previous: dict[signal.Signals, Callable[[int, FrameType | None], object] | int] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if signal.getsignal(sig) is signal.SIG_IGN:
                    continue  # `nohup`, or `&` in a script: ignoring it was asked for
                previous = signal.signal(sig, self._handle)
                self._previous[sig] = signal.SIG_DFL if previous is None else previous
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            return  # already stopping: a second signal must not cut the cleanup short
        self.received = signum
        if not self.holding:
            raise Interrupted(signum)

    def hold(self) -> None:
        self.holding = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        if exc_type is None and self.received is not None:
            raise Interrupted(self.received)


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


# Resolved once here: the hook runs in the forked child, where it should do as little as it can.
_PRCTL = _load_prctl()


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `Popen(preexec_fn=...)` hook: the kernel sends the child `sig` when its parent dies,
    even by SIGKILL. None where there is no PR_SET_PDEATHSIG (not Linux).

    The kernel fires it when the *thread* that forked the child exits, not the process: spawn
    from a thread that outlives the child. `LocalExecutor.execute` does (it spawns on its
    calling thread, the main one under `rlhf run`, and stops every child before returning).
    The setting does not pass on to the child's own children: each program must stop those on
    `sig`, as torchrun and vLLM do on SIGTERM.
    """
    prctl = _PRCTL
    if prctl is None:
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: no signal would come
            os.kill(os.getpid(), sig)

    return hook


def stop_groups(procs: list[subprocess.Popen[bytes]], grace: float = 10.0) -> None:
    """SIGTERM the process group each of `procs` leads, SIGKILL those left after `grace`."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def interrupted_status(status: api.RunStatus, signum: int, now: str) -> api.RunStatus:
    """The status of a run whose processes `rlhf run` stopped on a signal.

    Phase Suspended, as for `spec.suspend`: the run stopped on purpose and not through a fault
    of its own, and resuming it (re-running `rlhf run`) continues each stage from its last
    checkpoint. Failed would say the run is finished and broken. The conditions carry reason
    `Interrupted` and name the signal; the stage that was running becomes Suspended too. A run
    that had already succeeded or failed keeps its status.
    """
    if status.phase in ("Succeeded", "Failed"):
        return status
    where = f" at stage {status.current_stage}" if status.current_stage else ""
    if status.step is not None:
        where += f" (step {status.step})"
    note = (
        f"Interrupted by {signal.Signals(signum).name}{where}; the run's processes were "
        "stopped. Re-running `rlhf run` resumes each stage from its last checkpoint"
    )
    stages = [
        s.model_copy(update={"phase": "Suspended", "message": note}) if s.phase == "Running" else s
        for s in status.stages
    ]
    conditions = []
    for ctype in CONDITION_TYPES:
        old = next((c for c in status.conditions if c.type == ctype), None)
        since = old.last_transition_time if old and old.status == "False" else now
        conditions.append(
            api.Condition(
                type=ctype,
                status="False",
                reason=INTERRUPTED,
                message=note,
                last_transition_time=since,
                observed_generation=status.observed_generation,
            )
        )
    return status.model_copy(
        update={"phase": "Suspended", "stages": stages, "conditions": conditions}
    )
