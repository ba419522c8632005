"""Terms added to the DPO loss (pure functions, torch only).

`losses.dpo_loss` is the preference term; the functions here are what an option adds to it.
"""

from __future__ import annotations

import torch


def dpo_nll_term(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """RPO's NLL term: the chosen response's negative log-likelihood per token, per pair.

        nll_i = -log π(y_w,i | x_i) / |y_w,i|

    and the stage's loss is `L = mean_i [L_DPO,i + α · nll_i]` with α = `dpo.sftWeight`
    (Pang et al. 2024, "Iterative Reasoning Preference Optimization", eq. 3, which names the
    length-normalised NLL). Plain DPO only widens the margin between chosen and rejected and
    can lower log π(y_w) while it does ("likelihood displacement", Razin et al. 2024); the NLL
    term holds y_w up. TRL's `loss_type=["sigmoid", "sft"]` adds the same term but averages it
    over all chosen tokens of the batch rather than per pair; the two agree when every chosen
    response has the same length.

    chosen_logps: (B,) log π(y_w | x) summed over completion tokens (`losses.sequence_logprobs`);
    chosen_lengths: (B,) the number of those tokens (a length 0 counts as 1, so an empty
    completion gives 0, not NaN). Returns (B,) in the dtype of `chosen_logps`.
    """
    return -chosen_logps / chosen_lengths.clamp(min=1).to(chosen_logps.dtype)
