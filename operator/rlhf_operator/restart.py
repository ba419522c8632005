"""`rlhf run FILE --restart STAGE`: train a stage, and every stage after it, again from the start.

A stage whose inputs changed since its checkpoint or final output refuses to run (the trainer
exits 2, naming the changed fields; see rlhf_trainer/runtime/stage_inputs.py). Restarting moves
the old outputs of that stage and of every later stage aside, to `<stage>.old-<UTC time>`
beside them, so nothing the user trained is deleted; later stages go too because they were
trained from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rlhf_operator import api

# Must match rlhf_trainer.runtime.stage_inputs.REFUSAL_MARK (a unit test checks it); the operator
# imports nothing of the trainer but its config.
REFUSAL_MARK = "the stage's inputs changed since"
EXIT_INPUTS_CHANGED = 2


@dataclass(frozen=True)
class Moved:
    stage: str
    source: Path
    target: Path


def stages_from(run: api.RLHFRun, name: str) -> list[str]:
    """`name` and the stages after it, in spec order; ValueError naming the choices if unknown."""
    names = [stage.name for stage in run.spec.stages]
    if name not in names:
        raise ValueError(
            f"--restart {name}: run {run.metadata.name} has no stage {name}; "
            f"choose one of {', '.join(names)}"
        )
    return names[names.index(name) :]


def move_aside(run_dir: Path, stages: list[str], now: datetime | None = None) -> list[Moved]:
    """Rename `run_dir/<stage>` to `<stage>.old-<time>` for each stage that has outputs."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    moved = []
    for stage in stages:
        source = run_dir / stage
        if not source.exists():
            continue
        target = run_dir / f"{stage}.old-{stamp}"
        n = 1
        while target.exists():  # two restarts within a second
            n += 1
            target = run_dir / f"{stage}.old-{stamp}-{n}"
        source.rename(target)
        moved.append(Moved(stage, source, target))
    return moved


def inputs_refused(status: api.RunStatus) -> bool:
    """Whether the run failed because a stage refused inputs that changed since its outputs."""
    return status.phase == "Failed" and any(
        s.phase == "Failed" and REFUSAL_MARK in (s.message or "") for s in status.stages
    )


def exit_code(status: api.RunStatus) -> int:
    """`rlhf run`'s exit status: 0 succeeded, 2 refused changed inputs, 1 failed otherwise."""
    if status.phase == "Succeeded":
        return 0
    return EXIT_INPUTS_CHANGED if inputs_refused(status) else 1
