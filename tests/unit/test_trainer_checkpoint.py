"""Checkpoints: atomic write, keep-last-K, partial folders ignored, exact round trip, a write
that fails on a full disk (1-rank FSDP2 group in this process)."""

from __future__ import annotations

import contextlib
import json
import resource
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.tensor import DTensor

from rlhf_trainer.errors import UserError
from rlhf_trainer.runtime import checkpoint
from rlhf_trainer.runtime.distributed import DistContext, shard_model

pytestmark = pytest.mark.unit


def fake_checkpoint(root: Path, name: str, complete: bool = True) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(b"x")
    if complete:
        (path / checkpoint.STATE_FILE).write_text("{}")
    return path


def test_listing_ignores_partial_and_foreign_folders(tmp_path: Path) -> None:
    assert checkpoint.list_checkpoints(tmp_path / "none") == []
    for name in ("step-5", "step-20", "step-100"):
        fake_checkpoint(tmp_path, name)
    fake_checkpoint(tmp_path, ".tmp-step-120")  # killed after writing everything but the rename
    fake_checkpoint(tmp_path, "step-110", complete=False)  # no state file: not ours, or damaged
    fake_checkpoint(tmp_path, "notes")
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [5, 20, 100]
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "step-100"
    assert checkpoint.remove_partial(tmp_path) == [tmp_path / ".tmp-step-120"]
    assert not (tmp_path / ".tmp-step-120").exists()


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    for step in (5, 10, 15, 20):
        fake_checkpoint(tmp_path, f"step-{step}")
    removed = checkpoint.prune(tmp_path, keep=2)
    assert removed == [tmp_path / "step-5", tmp_path / "step-10"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-15", "step-20"]


class TwoLayers(nn.Module):
    _no_split_modules: ClassVar[list[str]] = ["Linear"]

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.a = nn.Linear(4, width)
        self.b = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.b(torch.relu(self.a(x))))


def train_one_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(3, 4)).square().sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def full(t: object) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else torch.as_tensor(t)


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every parameter and optimizer-state tensor, unsharded and copied."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    tensors = [full(t) for t in model_sd.values()]
    optim_state = optim_sd["state"]
    assert isinstance(optim_state, dict)
    for state in optim_state.values():
        assert isinstance(state, dict)
        tensors += [full(v) for v in state.values()]
    return [t.clone() for t in tensors]


def test_save_load_round_trip_and_keep_last(tmp_path: Path, ctx: DistContext) -> None:
    torch.manual_seed(0)
    model = shard_model(TwoLayers(), bf16=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        train_one_step(model, optimizer)
        state = {"epoch": 0, "index": step * 3, "scheduler": {"last_epoch": step}}
        path = checkpoint.save_checkpoint(root, step, model, optimizer, state, ctx, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-3"]
    assert json.loads((path / checkpoint.STATE_FILE).read_text()) == {
        "epoch": 0, "index": 9, "scheduler": {"last_epoch": 3}, "step": 3, "world_size": 1,
    }  # fmt: skip
    saved = snapshot(model, optimizer)
    rng_after_save = torch.rand(3)
    train_one_step(model, optimizer)  # move away from the checkpoint
    assert any(
        not torch.equal(a, b) for a, b in zip(saved, snapshot(model, optimizer), strict=True)
    )

    state = checkpoint.load_checkpoint(path, model, optimizer, ctx)
    assert state["step"] == 3
    for a, b in zip(saved, snapshot(model, optimizer), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(torch.rand(3), rng_after_save)  # RNG restored to its state at the save


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past `limit` bytes fail with OSError EFBIG (SIGXFSZ ignored), as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path: Path, ctx: DistContext) -> None:
    torch.manual_seed(0)
    model = shard_model(TwoLayers(width=16384), bf16=False)  # ~1 MB of weights and Adam state
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    root = tmp_path / "checkpoints"
    train_one_step(model, optimizer)
    state = {"epoch": 0, "index": 3}
    checkpoint.save_checkpoint(root, 1, model, optimizer, state, ctx, keep=2)
    saved = snapshot(model, optimizer)
    before = {p.name: p.read_bytes() for p in (root / "step-1").iterdir()}

    train_one_step(model, optimizer)
    with file_size_limit(64 * 1024), pytest.raises(checkpoint.CheckpointWriteError) as caught:
        checkpoint.save_checkpoint(root, 2, model, optimizer, {**state, "index": 6}, ctx, keep=2)
    message = str(caught.value)
    print(message)
    assert str(root / ".tmp-step-2") in message
    assert "the disk is full" in message and "keepCheckpoints" in message
    assert "step-1 is intact" in message
    assert isinstance(caught.value, UserError)  # the CLI prints it as one `error:` line

    assert sorted(p.name for p in root.iterdir()) == ["step-1"]  # no partial step-2 left
    assert {p.name: p.read_bytes() for p in (root / "step-1").iterdir()} == before
    assert checkpoint.latest_checkpoint(root) == root / "step-1"
    loaded = checkpoint.load_checkpoint(root / "step-1", model, optimizer, ctx)
    assert loaded["index"] == 3 and loaded["step"] == 1
    for a, b in zip(saved, snapshot(model, optimizer), strict=True):
        assert torch.equal(a, b)
    # With room again the same save succeeds.
    checkpoint.save_checkpoint(root, 2, model, optimizer, {**state, "index": 6}, ctx, keep=2)
    assert checkpoint.latest_checkpoint(root) == root / "step-2"

