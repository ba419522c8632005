"""Sharded, atomic checkpoints with automatic resume.

Layout: `<output_dir>/checkpoints/step-N/` holds the model and optimizer as a
torch.distributed.checkpoint (each rank writes its own shards; loading reshards, so a run can resume
on a different world size), `trainer_state.json` (step, data position, scheduler) and one
`rng-rank<R>.pt` per rank. Every rank writes into `.tmp-step-N/`; after a barrier rank 0 renames it
to `step-N/`, so a `step-N/` folder is always complete and a run killed mid-write leaves only a
`.tmp-*` folder, which resume ignores and deletes. A write that fails (a full disk, a quota, a
file-size limit) removes its `.tmp-*` folder and raises `CheckpointWriteError` on every rank,
naming the folder and what to free; the previous checkpoint stays as it was.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from rlhf_trainer.errors import UserError
from rlhf_trainer.runtime.distributed import DistContext, all_reduce_sum, barrier

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
TMP_PREFIX = ".tmp-step-"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# One optimizer, or several (e.g. PPO's actor and critic, whose models sit in one ModuleDict).
Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer]
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
PROBE_BYTES = 1 << 20  # written to tell a full disk from other write failures


class CheckpointWriteError(UserError):
    """A checkpoint could not be written; the message names the folder and what to free."""


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root` as (step, path), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def remove_partial(root: Path) -> list[Path]:
    """Delete `.tmp-step-*` folders left by a run killed mid-write; return what was removed."""
    if not root.is_dir():
        return []
    partial = sorted(p for p in root.iterdir() if p.name.startswith(TMP_PREFIX))
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return partial


def prune(root: Path, keep: int) -> list[Path]:
    """Keep the newest `keep` complete checkpoints; return the removed ones."""
    old = [path for _, path in list_checkpoints(root)[:-keep]]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: Optimizers,
    trainer_state: dict[str, Any],
    ctx: DistContext,
    keep: int,
) -> Path:
    """Collective: every rank calls it. Returns the final `step-N` path."""
    tmp, final = root / f"{TMP_PREFIX}{step}", root / f"step-{step}"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    failure: OSError | None = None
    try:
        dcp_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        torch.save(_rng_state(), tmp / f"rng-rank{ctx.rank}.pt")
        if ctx.is_main:
            state = {**trainer_state, "step": step, "world_size": ctx.world_size}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    except (OSError, RuntimeError, CheckpointException) as err:
        # torch's zip writer reports a short write as RuntimeError, without the errno.
        failure = _os_error(err, tmp)
    # Every rank learns whether any rank failed, so none waits forever at the next barrier.
    if all_reduce_sum([float(failure is not None)], ctx.device)[0] > 0:
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(_write_failure_message(root, tmp, failure)) from None
    if ctx.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        removed = prune(root, keep)
        note = f" and removed {', '.join(p.name for p in removed)}" if removed else ""
        log.info("Saved checkpoint %s%s", final.name, note)
    barrier()
    return final


def _os_error(err: BaseException, folder: Path) -> OSError:
    """The OSError behind a failed write. DCP wraps each rank's error in CheckpointException,
    and torch's zip writer turns a short write into a RuntimeError; then a probe write into
    the same folder recovers the errno (ENOSPC, EDQUOT, EFBIG) when the disk is the cause."""
    if isinstance(err, OSError):
        return err
    if isinstance(err, CheckpointException):
        for exc, _ in err.failures.values():
            if isinstance(exc, OSError):
                return exc
    probe = folder / ".write-probe"
    try:
        with probe.open("wb") as out:
            out.write(bytes(PROBE_BYTES))
    except OSError as found:
        return found
    finally:
        probe.unlink(missing_ok=True)
    return OSError(str(err).strip().splitlines()[-1])


def _write_failure_message(root: Path, tmp: Path, failure: OSError | None) -> str:
    previous = latest_checkpoint(root)
    kept = (
        f"the previous checkpoint {previous.name} is intact and a restart resumes from it"
        if previous is not None
        else "there is no earlier checkpoint, so a restart begins at step 0"
    )
    if failure is None:  # this rank wrote its part; another one failed and said why
        what = "another rank failed to write its part"
    elif failure.errno in DISK_FULL:
        what = (
            f"the disk is full ({failure.strerror or failure}); free space on the volume that "
            f"holds {root} (remove old runs or weight snapshots, or enlarge the workspace PVC) "
            "or lower hyperparameters.keepCheckpoints"
        )
    else:
        what = f"{failure.strerror or failure}; check that {root} is writable"
    return f"{tmp}: could not write the checkpoint: {what}; {kept}"


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: Optimizers, ctx: DistContext
) -> dict[str, Any]:
    """Collective: restore model, optimizer and this rank's RNG; return the trainer state."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    # dcp_load fills the (sharded) tensors of these dicts in place.
    dcp_load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    rng_file = path / f"rng-rank{ctx.rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        log.warning("Found no RNG state for rank %d in %s; kept fresh seeds", ctx.rank, path.name)
    trainer_state: dict[str, Any] = json.loads((path / STATE_FILE).read_text())
    return trainer_state
