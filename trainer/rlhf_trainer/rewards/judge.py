"""Online rewards from the AI judge for ppo and grpo (`reward: {judge: {mode: ...}}`).

- pairwise: the reward of a response is P(response beats a reference response), from the
  judge protocol of `judge.Judge.compare` in both orders (averaged; no filter, a disagreement
  just pulls the reward toward 0.5). The reference is the dataset's (a prompt row's `answer`,
  a pair's `chosen`) when the trainer passes one, else the judge's own answer to the prompt.
- pointwise: the expected 0-9 score of the response, divided by 9.

Rewards are in [0, 1]. A response the judge could not score (timeout, error, unparseable)
gets the mean reward of the batch's scored responses (0.5 when none was scored), so it moves
neither a GRPO group nor the PPO running moments much; every outcome is counted in
`rlhf_trainer_judge_outcomes_total` and in `JudgeRewards.outcomes` (which the online trainers
sum over ranks into metrics.jsonl as `judge_<outcome>`).

Hooks for a trainer:

    rewards = JudgeRewards(config.judge)               # at start-up
    scores = rewards(prompts, responses, references)   # list[float], one per response

or `await rewards.score(...)` from async code, which returns None for a failed response; or
`JudgeRewardSource`, the same behind the online trainers' `RewardSource.score(samples,
prompts) -> Tensor` protocol (each rank scores its own samples; no collective).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rlhf_trainer.config import JudgeTarget
from rlhf_trainer.data.chat_format import load_chat_format
from rlhf_trainer.rewards.judge_core import Judge, open_judge
from rlhf_trainer.rollout.completions import CallFailed
from rlhf_trainer.runtime import metrics as prom
from rlhf_trainer.runtime.metrics import JudgeOutcome

if TYPE_CHECKING:
    import torch

    from rlhf_trainer.rollout.client import Sample

NEUTRAL = 0.5


class JudgeRewards:
    """Scores responses with the judge servers of `target` (StageConfig.judge)."""

    def __init__(self, target: JudgeTarget) -> None:
        if target.mode is None:
            raise ValueError("JudgeRewards needs a judge target with `mode` set")
        self.target = target
        self.chat = load_chat_format(target.model, target.chat_template)
        self.outcomes: Counter[JudgeOutcome] = Counter()  # every call of this process

    def _count(self, outcome: JudgeOutcome) -> None:
        prom.count_judge_outcome(outcome)
        self.outcomes[outcome] += 1

    async def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        references: Sequence[str | None] | None = None,
    ) -> list[float | None]:
        """One reward per response, None where the judge failed."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        refs = list(references) if references is not None else [None] * len(prompts)
        if len(refs) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(refs)} references")
        async with open_judge(self.target, self.chat) as judge:
            triples = zip(prompts, responses, refs, strict=True)
            return list(await asyncio.gather(*(self._one(judge, *t) for t in triples)))

    async def _one(self, judge: Judge, prompt: str, response: str, ref: str | None) -> float | None:
        if self.target.mode == "pointwise":
            try:
                value = await judge.score(prompt, response)
            except CallFailed as err:
                self._count(err.outcome)
                return None
            self._count("kept")
            return value
        if ref is None:
            try:
                ref = await asyncio.shield(judge.reference(prompt))
            except CallFailed as err:
                self._count(err.outcome)
                return None
        judgement = await judge.compare(prompt, response, ref, swap=True)
        self._count(judgement.outcome)
        return judgement.p_first

    def __call__(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        references: Sequence[str | None] | None = None,
    ) -> list[float]:
        """Blocking form for a synchronous training loop; failures get the batch's mean."""
        scores = asyncio.run(self.score(prompts, responses, references))
        return fill_failures(scores)


def fill_failures(scores: Sequence[float | None]) -> list[float]:
    """Replace None by the mean of the others (NEUTRAL when there are none)."""
    known = [s for s in scores if s is not None]
    fill = sum(known) / len(known) if known else NEUTRAL
    return [fill if s is None else s for s in scores]


class JudgeRewardSource:
    """`reward: {judge: {...}}` for the online trainers: decodes each sample's response and
    asks the judge. `references` maps a prompt to its reference response (a prompts row's
    `answer`), for pairwise mode; prompts without one are compared with the judge's own answer.
    """

    def __init__(
        self, target: JudgeTarget, tokenizer: Any, references: Mapping[str, str] | None = None
    ) -> None:
        self.rewards = JudgeRewards(target)
        self.tokenizer = tokenizer
        self.references = dict(references or {})

    def score(self, samples: Sequence[Sample], prompts: Sequence[str]) -> torch.Tensor:
        import torch

        texts = self.tokenizer.batch_decode(
            [list(s.response_ids) for s in samples], skip_special_tokens=True
        )
        asked = [prompts[s.prompt_index] for s in samples]
        refs = [self.references.get(p) for p in asked]
        return torch.tensor(self.rewards(asked, texts, refs), dtype=torch.float32)
