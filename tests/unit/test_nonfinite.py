"""A non-finite gradient norm stops training before the optimizer step (issue: a run that
"succeeded" with NaN weights in final/, which later stages started from)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rlhf_trainer.errors import NonFiniteError, UserError
from rlhf_trainer.training.loop import grad_norm_and_clip

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_norm_raises_and_leaves_the_weights(bad: float) -> None:
    model = nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.ones(1, 3)).sum() * bad
    loss.backward()
    with pytest.raises(NonFiniteError, match=r"gradient norm is (nan|inf)") as err:
        grad_norm_and_clip(model, 1.0)
    assert isinstance(err.value, UserError)  # one `error:` line and exit status 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_a_finite_norm_is_returned_and_clipped() -> None:
    model = nn.Linear(3, 2)
    (model(torch.ones(1, 3)).sum() * 100).backward()
    norm = grad_norm_and_clip(model, 1.0)
    assert norm > 1.0
    clipped = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    assert float(clipped.norm()) == pytest.approx(1.0, rel=1e-5)
