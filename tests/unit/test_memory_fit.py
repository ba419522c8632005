"""runtime.memory: what the first step adds (gradients, AdamW state, a micro-batch's
activations), refused when the state alone cannot fit and warned about when a full micro-batch
cannot."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rlhf_trainer.config import Hyperparameters
from rlhf_trainer.errors import UserError
from rlhf_trainer.runtime.memory import (
    GIB,
    check_step_fits,
    free_bytes,
    step_memory,
    token_bytes,
)

pytestmark = pytest.mark.unit

# SmolLM2-135M-Instruct's shapes
SMOLLM2 = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          vocab_size=49152)  # fmt: skip


class Decoder(nn.Module):
    """A stand-in with a config and 1000 + 24 parameters, the 24 frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SMOLLM2
        self.trained = nn.Linear(100, 10)  # 1010
        self.extra = nn.Parameter(torch.zeros(10))  # 10 more: 1020
        self.frozen = nn.Linear(4, 4)  # 20
        self.frozen.requires_grad_(False)


def test_token_bytes_count_layers_in_the_compute_dtype_and_float32_logits() -> None:
    layer = 10 * 576 + 5 * 1536
    logits = 3 * 4 * 49152
    assert token_bytes(SMOLLM2, bf16=False) == 30 * layer * 4 + logits
    assert token_bytes(SMOLLM2, bf16=True) == 30 * layer * 2 + logits
    # SmolLM2 at batch 8 x 256 tokens: a few GiB, most of it the decoder layers
    assert 3 < 2048 * token_bytes(SMOLLM2, bf16=False) / GIB < 5


def test_state_is_twelve_bytes_per_trained_parameter_over_the_ranks() -> None:
    model = Decoder()
    one = step_memory([model], tokens=0, world_size=1, bf16=False)
    assert one.states == 12 * 1020 and one.activations == 0
    two = step_memory([model, Decoder()], tokens=10, world_size=2, bf16=False)
    assert two.states == 12 * 2040 / 2
    assert two.activations == 10 * token_bytes(SMOLLM2, bf16=False)


def hp(**kw: object) -> Hyperparameters:
    return Hyperparameters(max_steps=1, batch_size=8, max_length=256, **kw)  # type: ignore[arg-type]


def test_a_step_that_fits_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    need = check_step_fits([Decoder()], hp(), rows=8, world_size=1, device=torch.device("cpu"),
                           free=100 * GIB)  # fmt: skip
    assert need.activations == 8 * 256 * token_bytes(SMOLLM2, bf16=False)
    assert not caplog.records


def test_a_micro_batch_that_does_not_fit_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    check_step_fits([Decoder()], hp(), rows=8, world_size=1, device=torch.device("cpu"),
                    free=1 * GIB)  # fmt: skip
    (record,) = caplog.records
    text = record.getMessage()
    assert "a micro-batch of 8 rows x 256 tokens" in text
    for field in ("hyperparameters.batchSize", "hyperparameters.gradientAccumulation",
                  "hyperparameters.maxLength", "1.0 GiB free on this rank's cpu"):  # fmt: skip
        assert field in text


def test_state_that_cannot_fit_is_refused() -> None:
    with pytest.raises(UserError, match=r"gradients and AdamW state.*more ranks.*`lora`"):
        check_step_fits([Decoder()], hp(), rows=1, world_size=1, device=torch.device("cpu"),
                        free=1000.0)  # fmt: skip


def test_free_memory_on_this_machine_is_measured() -> None:
    free = free_bytes(torch.device("cpu"))
    meminfo = Path("/proc/meminfo").read_text()
    total = int(next(ln.split()[1] for ln in meminfo.splitlines() if ln.startswith("MemTotal")))
    assert free is not None and 0 < free <= total * 1024
    # two ranks on this node: each gets a share of what is free (give or take what changed)
    half = free_bytes(torch.device("cpu"), local_ranks=2)
    assert half is not None and half == pytest.approx(free / 2, rel=0.2)
