"""Whether a training step fits in memory, checked before the first step (docs/DESIGN.md,
"Memory before the first step").

By the time a trainer is ready to step, its weights (policy, reference, critic) are loaded and
sharded, so they are already out of the free memory. What the first step adds is known in
advance: each trained parameter's float32 gradient and AdamW's two float32 moments (12 bytes,
over the ranks FSDP2 shards them across), and the activations autograd keeps for the backward
pass of one micro-batch. The activations are estimated from the model's config for a
micro-batch of `maxLength`-token sequences, the longest a batch can hold: per token and decoder
layer about 10 hidden-size and 5 intermediate-size values (norm inputs, q/k/v, attention output,
MLP gate, up, product and down input, as Hugging Face's decoder layers keep them without
gradient checkpointing) in the compute dtype, plus float32 logits, their log-softmax and its
gradient over the vocabulary.

- The gradients and optimizer state alone exceed the free memory: refused (`UserError`), since
  no batch size can help; the message says to shard over more ranks, use LoRA or a smaller model.
- With the activations of a full micro-batch it exceeds: a warning naming `batchSize`,
  `gradientAccumulation` and `maxLength`, since batches of shorter rows may still fit.

Free memory: the GPU's `mem_get_info`, or on CPU the kernel's `MemAvailable` capped by the
cgroup's limit (a container's `memory.max`), which is what an OOM kill is measured against,
shared by the node's ranks (`LOCAL_WORLD_SIZE`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf_trainer.config import Hyperparameters
from rlhf_trainer.errors import UserError
from rlhf_trainer.runtime.launch_env import env_local_world_size

log = logging.getLogger(__name__)

GIB = 2**30
STATE_BYTES = 12  # per trained parameter: float32 gradient, AdamW's exp_avg and exp_avg_sq
LOGIT_COPIES = 3  # float32 logits, their log-softmax, and its gradient
CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class StepMemory:
    """Bytes the first step adds on one rank."""

    states: float  # gradients and optimizer state of the trained parameters
    activations: float  # one micro-batch's saved activations

    @property
    def total(self) -> float:
        return self.states + self.activations


def token_bytes(config: Any, bf16: bool) -> float:
    """Activation bytes one token keeps through the forward pass, from a decoder's config."""
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    inner = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    width = 2 if bf16 else 4
    return layers * (10 * hidden + 5 * inner) * width + LOGIT_COPIES * 4 * vocab


def step_memory(
    models: Sequence[nn.Module], tokens: int, world_size: int, bf16: bool
) -> StepMemory:
    """What the first step adds on a rank that runs micro-batches of `tokens` tokens."""
    trained = sum(p.numel() for m in models for p in m.parameters() if p.requires_grad)
    config = getattr(models[0], "config", None)
    activations = tokens * token_bytes(config, bf16) if config is not None else 0.0
    return StepMemory(STATE_BYTES * trained / world_size, float(activations))


def _cgroup_room() -> float | None:
    """The cgroup v2 limit minus its usage, when a limit is set."""
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        used = (CGROUP / "memory.current").read_text().strip()
    except OSError:
        return None
    return None if limit == "max" else float(int(limit) - int(used))


def free_bytes(device: torch.device, local_ranks: int = 1) -> float | None:
    """Memory a step of one rank can still take on `device`; None when nothing says. On CPU the
    node's `local_ranks` processes share it, each with a step of its own to take."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    available = next((int(ln.split()[1]) * 1024 for ln in lines if ln.startswith("MemAvailable")),
                     None)  # fmt: skip
    if available is None:
        return None
    room = _cgroup_room()
    return float(available if room is None else min(available, room)) / max(local_ranks, 1)


def check_step_fits(
    models: Sequence[nn.Module],
    hp: Hyperparameters,
    rows: int,
    world_size: int,
    device: torch.device,
    bf16: bool = False,
    free: float | None = None,
) -> StepMemory:
    """Refuse a step whose gradients and optimizer state cannot fit; warn when a micro-batch of
    `rows` sequences of `maxLength` tokens would not. `bf16`: the compute dtype the trainer
    settled on (`DistContext.bf16`); `free`: bytes free (default: measured)."""
    need = step_memory(models, rows * hp.max_length, world_size, bf16)
    free = free_bytes(device, env_local_world_size()) if free is None else free
    if free is None:
        return need
    where = f"{free / GIB:.1f} GiB free on this rank's {device.type}"
    if need.states > free:
        raise UserError(
            f"model: training it on {world_size} rank(s) needs about {need.states / GIB:.1f} GiB "
            f"more per rank for gradients and AdamW state, and {where}; shard it over more ranks "
            "(FSDP splits that state), train LoRA adapters (`lora`), or train a smaller model"
        )
    if need.total > free:
        log.warning(
            "hyperparameters: a micro-batch of %d rows x %d tokens (batchSize / (ranks x "
            "gradientAccumulation), at maxLength) needs about %.1f GiB of activations on top of "
            "%.1f GiB for gradients and AdamW state, and %s; a batch of rows that long will run "
            "out of memory. Lower hyperparameters.batchSize, raise "
            "hyperparameters.gradientAccumulation, or lower hyperparameters.maxLength",
            rows, hp.max_length, need.activations / GIB, need.states / GIB, where,
        )  # fmt: skip
    return need
