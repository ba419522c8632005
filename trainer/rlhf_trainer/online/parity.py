"""Weight sync with a parity probe: stale weights never pass silently.

After every sync each replica answers a fixed probe prompt greedily, with the logprobs of its
tokens (the trainer's own engine, `engine: trainer`, answers once and then rescores the same
tokens with each new set of weights); the trainer computes its own logprobs of the same
tokens. The mean absolute gap of the worst replica is checked against
`rollout.parityThreshold` (an error above it); the max absolute gap is the
`rlhf_trainer_logprob_mismatch` gauge. Both go to metrics.jsonl (`logprob_mismatch`,
`logprob_mismatch_mean`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from rlhf_trainer.online.experience import collate_samples, policy_logprobs
from rlhf_trainer.rollout.client import RolloutGenerator, Sample
from rlhf_trainer.rollout.weight_sync import WeightSync, WeightSyncError
from rlhf_trainer.runtime import metrics as prom
from rlhf_trainer.runtime.distributed import DistContext, broadcast_object

log = logging.getLogger(__name__)

PROBE_TOKENS = 16


@dataclass(frozen=True)
class Parity:
    """The worst replica's logprob gap on the probe."""

    mean_abs: float
    max_abs: float
    url: str


def logprob_gap(server: torch.Tensor, trainer: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sample (mean abs gap, max abs gap) over its tokens: (B, R) x3 -> (B, 2)."""
    gap = (server - trainer).abs() * mask
    mean = gap.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return torch.stack([mean, gap.max(dim=1).values], dim=1)


class Syncer:
    """Weight sync (any backend) followed by the parity probe. Collective."""

    def __init__(
        self,
        backend: WeightSync,
        client: RolloutGenerator | None,
        probe_prompt: Sequence[int],
        threshold: float,
        ctx: DistContext,
        pad_id: int,
    ) -> None:
        self.backend, self.client, self.ctx = backend, client, ctx
        self.probe_prompt, self.threshold, self.pad_id = list(probe_prompt), threshold, pad_id

    def sync(self, model: nn.Module, step: int) -> dict[str, float]:
        started = time.perf_counter()
        self.backend.sync(model, step)
        seconds = time.perf_counter() - started
        if self.ctx.is_main:
            prom.observe_weight_sync(self.backend.backend, seconds)
        parity = self.check(model)
        log.info(
            "Synced weights of step %d to %s (%s, %.2fs); logprob gap mean %.2e, max %.2e",
            step,
            "the trainer's engine" if self.backend.backend == "trainer" else "the rollout servers",
            self.backend.backend,
            seconds,
            parity.mean_abs,
            parity.max_abs,
        )
        return {
            "weight_sync_s": seconds,
            "logprob_mismatch": parity.max_abs,
            "logprob_mismatch_mean": parity.mean_abs,
        }

    def check(self, model: nn.Module) -> Parity:
        """Probe every replica; WeightSyncError when the worst mean gap exceeds the threshold."""
        parity = self.probe(model)
        failed = parity.mean_abs > self.threshold
        if self.ctx.is_main:
            prom.observe_parity(parity.max_abs, failed)
        if failed:
            raise WeightSyncError(
                f"logprob parity probe failed on {parity.url}: mean abs gap "
                f"{parity.mean_abs:.4f} > rollout.parityThreshold {self.threshold} (max "
                f"{parity.max_abs:.4f}); the server is not serving the trainer's weights (a "
                "failed or skipped weight sync, or a dtype/model mismatch)"
            )
        return parity

    @torch.no_grad()
    def probe(self, model: nn.Module) -> Parity:
        samples: list[Sample] | None = None
        urls: list[str] = []
        if self.ctx.is_main:
            assert self.client is not None
            urls = self.client.urls
            samples = [self.client.probe(self.probe_prompt, PROBE_TOKENS, url) for url in urls]
        samples, urls = cast(
            tuple[list[Sample], list[str]], broadcast_object((samples, urls))
        )
        batch = collate_samples(samples, self.pad_id, self.ctx.device)
        was_training = model.training
        model.eval()
        logprobs, _ = policy_logprobs(model, batch)
        model.train(was_training)
        gaps = logprob_gap(batch.behaviour_logprobs, logprobs, batch.response_mask)
        worst = int(gaps[:, 0].argmax())
        return Parity(float(gaps[worst, 0]), float(gaps[:, 1].max()), urls[worst])
