"""Sharded, atomic checkpoints with automatic resume.

Layout: `<output_dir>/checkpoints/step-N/` holds the model and optimizer as a
torch.distributed.checkpoint (each rank writes its own shards; loading reshards, so a run can resume
on a different world size), `trainer_state.json` (step, data position, scheduler) and one
`rng-rank<R>.pt` per rank. Every rank writes into `.tmp-step-N/`; after a barrier rank 0 renames it
to `step-N/`, so a `step-N/` folder is always complete and a run killed mid-write leaves only a
`.tmp-*` folder, which resume ignores and deletes.
"""

from __future__ import annotations

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
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from rlhf_trainer.distributed import DistContext, barrier

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
TMP_PREFIX = ".tmp-step-"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# One optimizer, or several (e.g. PPO's actor and critic, whose models sit in one ModuleDict).
Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer]


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
    dcp_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng-rank{ctx.rank}.pt")
    if ctx.is_main:
        state = {**trainer_state, "step": step, "world_size": ctx.world_size}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    barrier()
    if ctx.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        removed = prune(root, keep)
        note = f" and removed {', '.join(p.name for p in removed)}" if removed else ""
        log.info("Saved checkpoint %s%s", final.name, note)
    barrier()
    return final


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
