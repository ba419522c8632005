"""`rlhf run`'s look at every stage's files before the first stage starts.

Validation (`rlhf validate`) sees only the spec. What needs the files (every dataset row, the
chat template a chat dataset is rendered with, a batch against the rows it draws from) is the
trainer's preflight, which runs when a stage's process starts: for the last stage of a
pipeline, after every earlier stage has trained. Here each stage's config is rendered as the
executor will render it and `python -m rlhf_trainer check-stages` runs those checks at once.

The first stage to run is left out: its own process checks it before it trains, so a
one-stage run pays nothing here. Stages with a `final/` folder already are left to their
stage-inputs record (a re-run checks what changed).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rlhf_operator import api, builders
from rlhf_operator.local_procs import die_with_parent

CHECK_TIMEOUT_SECONDS = 600.0


def stages_to_check(run: api.RLHFRun, workdir: Path) -> list[tuple[int, api.Stage]]:
    """(index, stage) of the stages after the first that has yet to finish."""
    pending = [
        (index, stage)
        for index, stage in enumerate(run.spec.stages)
        if not (workdir / builders.stage_output_dir(run, stage.name) / "final").exists()
    ]
    return pending[1:]


def _stand_in(run: api.RLHFRun) -> str:
    model = run.spec.model
    return model.path if model.path is not None else str(model.name)


def check_stage_files(run: api.RLHFRun, workdir: Path) -> list[str]:
    """`spec.stages[i] (name): problem` for each later stage whose files fail its check."""
    stages = stages_to_check(run, workdir)
    if not stages:
        return []
    index_of = {stage.name: index for index, stage in stages}
    trainer = run.spec.trainer
    with tempfile.TemporaryDirectory(prefix="rlhf-check-") as tmp:
        paths = []
        for _, stage in stages:
            path = Path(tmp) / builders.config_key(stage)
            path.write_text(builders.build_stage_config(run, stage).to_yaml())
            paths.append(str(path))
        argv = [
            sys.executable, "-m", "rlhf_trainer", "check-stages",
            "--world-size", str(trainer.nodes * trainer.procs_per_node),
            "--stand-in", _stand_in(run), *paths,
        ]  # fmt: skip
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT_SECONDS,
            cwd=workdir,
            env={**os.environ, "RLHF_WORKSPACE": str(workdir.resolve())},
            preexec_fn=die_with_parent(),
        )
    if result.returncode == 0:
        return []
    problems = []
    for line in result.stderr.splitlines():
        if not line.startswith("error: stage "):
            continue
        name, _, message = line.removeprefix("error: stage ").partition(": ")
        where = f"spec.stages[{index_of[name]}] ({name})" if name in index_of else name
        problems.append(f"{where}: {message}")
    return problems or [f"checking the stages' files failed: {result.stderr.strip()[-2000:]}"]
