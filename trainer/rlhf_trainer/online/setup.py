"""Everything an online stage builds before its first step: tokenizer, the sharded policy, the
reward source (reward model, reward function or AI judge), the rollout client (rank 0) and the
weight sync with its parity probe."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast, get_args
from urllib.parse import urlsplit

import torch
from torch import nn

from rlhf_trainer.config import (
    IN_TRAINER,
    JudgeTarget,
    RolloutTarget,
    online_options,
)
from rlhf_trainer.data.batching import prompt_token_ids, stop_ids
from rlhf_trainer.data.inputs import StageInputs
from rlhf_trainer.data.readers import PromptRow
from rlhf_trainer.models.causal_lm import Exporter, load_tokenizer
from rlhf_trainer.models.online_models import ValueModel, load_policy, load_value_model
from rlhf_trainer.models.reward_model import last_token_values
from rlhf_trainer.online.episodes import EpisodeRunner, episode_runner
from rlhf_trainer.online.experience import in_chunks, scored_sequences
from rlhf_trainer.online.parity import Syncer
from rlhf_trainer.rewards.functions import ScoredFunction
from rlhf_trainer.rewards.judge import JudgeRewardSource
from rlhf_trainer.rollout.client import RolloutClient, RolloutGenerator, Sample
from rlhf_trainer.rollout.completions import wait_ready
from rlhf_trainer.rollout.engine import EngineSync, TrainerEngine
from rlhf_trainer.rollout.nccl_sync import NcclWeightSync, free_port
from rlhf_trainer.rollout.weight_sync import DiskWeightSync, LoraWeightSync, WeightSync
from rlhf_trainer.runtime.distributed import DistContext, all_reduce_sum, broadcast_object
from rlhf_trainer.runtime.metrics import JudgeOutcome

log = logging.getLogger(__name__)

SCORE_CHUNK = 16  # samples per reward-model forward


class RewardSource(Protocol):
    def score(self, samples: Sequence[Sample], prompts: Sequence[str]) -> torch.Tensor:
        """(B,) float32 rewards of `samples` (prompts[s.prompt_index] is each one's prompt).
        Collective for a reward model: every rank calls it with as many samples."""
        ...


class FunctionReward:
    """A Python reward function of (prompt as rendered, response decoded without special
    tokens, so without the end-of-turn token), called as `ScoredFunction` calls it."""

    def __init__(
        self, function: ScoredFunction, tokenizer: Any, rows: Sequence[PromptRow] = ()
    ) -> None:
        self.function, self.tokenizer = function, tokenizer
        self.messages = {r.prompt: r.messages for r in rows if r.messages is not None}

    def score(self, samples: Sequence[Sample], prompts: Sequence[str]) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(
            [list(s.response_ids) for s in samples], skip_special_tokens=True
        )
        values = []
        for s, text in zip(samples, texts, strict=True):
            prompt = prompts[s.prompt_index]
            values.append(self.function(prompt, text, self.messages.get(prompt)))
        return torch.tensor(values, dtype=torch.float32)


class ModelReward:
    """A reward model (a `reward` stage's output), sharded, read at the last token."""

    def __init__(self, model: ValueModel, tokenizer: Any, device: torch.device) -> None:
        self.model, self.device = model, device
        self.eos, self.pad = tokenizer.eos_token_id, int(tokenizer.pad_token_id)
        self.stops = stop_ids(tokenizer)

    @torch.no_grad()
    def score(self, samples: Sequence[Sample], prompts: Sequence[str]) -> torch.Tensor:
        del prompts
        ids, mask = scored_sequences(samples, self.eos, self.pad, self.device, self.stops)

        def chunk(rows: slice) -> torch.Tensor:
            values = self.model(input_ids=ids[rows], attention_mask=mask[rows])
            return last_token_values(values, mask[rows])

        return in_chunks(len(samples), SCORE_CHUNK, chunk).float().cpu()


@dataclass
class OnlineSetup:
    inputs: StageInputs[PromptRow]
    ctx: DistContext
    tokenizer: Any
    actor: nn.Module  # the policy, FSDP-sharded, in train mode
    dtype: torch.dtype  # the dtype of its checkpoint: final/ and weight snapshots use it
    reward: RewardSource
    client: RolloutGenerator | None  # rank 0 only: the servers' client, or the trainer engine
    syncer: Syncer
    max_prompt: int  # prompt tokens kept (maxLength - maxNewTokens)
    async_: bool
    backend: WeightSync
    export: Exporter  # how final/ is written (merged, or the adapter alone, with LoRA)
    episodes: EpisodeRunner | None = None  # rank 0, with an environment: multi-turn episodes

    @property
    def sampled_by_policy(self) -> bool:
        """Whether the samples' own logprobs are log π_old: the trainer generated them from
        the current weights in its own process (`engine: trainer`), so a forward pass for
        π_old would compute them again (to float rounding; the parity probe watches the gap).
        Servers' logprobs come from their own kernels and dtype, so they are recomputed."""
        return isinstance(self.backend, EngineSync)

    def close(self) -> None:
        self.backend.close()

    def reward_metrics(self) -> dict[str, float]:
        """Judge outcomes so far (`judge_<outcome>`), summed over ranks: collective when
        rewards come from the judge, {} otherwise."""
        if not isinstance(self.reward, JudgeRewardSource):
            return {}
        names = get_args(JudgeOutcome)
        counts = self.reward.rewards.outcomes
        totals = all_reduce_sum([float(counts[n]) for n in names], self.ctx.device)
        return {f"judge_{n}": total for n, total in zip(names, totals, strict=True)}


def _options(inputs: StageInputs[PromptRow]) -> tuple[int, bool]:
    """(maxNewTokens, async) of the stage's options block, defaults when it has none."""
    options = online_options(inputs.config)
    return options.max_new_tokens, options.async_


class EpisodeReward:
    """An episode's reward: the sum of its environment's step rewards (episodes.py)."""

    def score(self, samples: Sequence[Sample], prompts: Sequence[str]) -> torch.Tensor:
        del prompts
        return torch.tensor([s.reward or 0.0 for s in samples], dtype=torch.float32)


def _reward(inputs: StageInputs[PromptRow], tokenizer: Any, ctx: DistContext) -> RewardSource:
    config = inputs.config
    sources = (inputs.reward_model_ref, config.judge, config.reward_function)
    if config.environment is not None and all(s is None for s in sources):
        return EpisodeReward()
    if inputs.reward_model_ref is not None:
        model = load_value_model(inputs.reward_model_ref, trainable=False, bf16=ctx.bf16)
        return ModelReward(model, tokenizer, ctx.device)
    if config.judge is not None:
        # Pairwise mode compares with the dataset's reference answer where a row has one.
        rows = [*inputs.train_rows, *inputs.eval_rows]
        references = {r.prompt: r.answer for r in rows if r.answer is not None}
        return JudgeRewardSource(config.judge, tokenizer, references)
    assert config.reward_function is not None  # preflight: exactly one source
    function = ScoredFunction(config.reward_function)
    return FunctionReward(function, tokenizer, [*inputs.train_rows, *inputs.eval_rows])


def _wait_for_judge(judge: JudgeTarget | None) -> None:
    """Block until every judge server answers (the operator starts the trainer once they are
    available; a trainer started by hand may be early)."""
    if judge is None:
        return
    log.info("Waiting for %d judge server(s): %s", len(judge.urls), ", ".join(judge.urls))
    asyncio.run(wait_ready(judge.urls, judge.startup_timeout_seconds))


def _backend(
    target: RolloutTarget, inputs: StageInputs[PromptRow], ctx: DistContext, dtype: torch.dtype
) -> WeightSync:
    snapshots = inputs.output_dir / "weights"
    if target.lora_adapter is not None:
        return LoraWeightSync(target, snapshots, ctx, dtype)
    if target.weight_sync == "disk":
        return DiskWeightSync(target, snapshots, ctx, dtype)
    port = cast(int, broadcast_object(free_port() if ctx.is_main else 0))
    return NcclWeightSync(target, ctx, dtype, port)


LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def overlap_threads(urls: Sequence[str], device: torch.device, threads: int) -> int | None:
    """Torch threads for training that overlaps generation (`async`) on rollout servers that
    run on this machine's CPUs (loopback URLs, as `rlhf run` starts them), or None to keep
    `threads`. It leaves a core to each such server, which busies at least one while it
    generates: a trainer whose threads want those cores too waits at every op's barrier for a
    thread the OS has parked. Measured on 2 cores (tiny GRPO, docs/DESIGN.md "async"): with 2
    threads an overlapped step took 2.5 s against 0.8 s without overlap, with 1 thread 0.63 s.
    More servers than cores still leave the trainer 1 thread."""
    local = sum(1 for url in urls if urlsplit(url).hostname in LOOPBACK)
    if device.type != "cpu" or local == 0:
        return None
    return max(1, threads - local)


def stop_token_ids(tokenizer: Any, model: nn.Module) -> set[int]:
    """The tokens that end a response: the tokenizer's EOS, the chat template's end-of-turn
    token, and the model's EOS ids (config and generation config), as vLLM stops on them."""
    found: set[int] = stop_ids(tokenizer)  # EOS and the chat template's end-of-turn token
    configs = [getattr(model, "config", None), getattr(model, "generation_config", None)]
    for value in [getattr(c, "eos_token_id", None) for c in configs]:
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, list | tuple):
            found.update(v for v in value if isinstance(v, int))
    return found


def _generator(
    inputs: StageInputs[PromptRow], ctx: DistContext, tokenizer: Any, actor: nn.Module
) -> tuple[RolloutGenerator | None, WeightSync | None]:
    """Rank 0's generator and the weight sync that feeds it, when the trainer itself generates
    (`rollout.engine: trainer`; preflight refused async and LoRA); (None, None) for servers."""
    target = inputs.config.rollout
    assert target is not None
    if target.engine != IN_TRAINER:
        return None, None
    dtype = torch.bfloat16 if ctx.bf16 else torch.float32
    engine = None
    if ctx.is_main:
        stops = stop_token_ids(tokenizer, actor)
        model_config = getattr(actor, "config", None)
        engine = TrainerEngine(model_config, stops, ctx.device, dtype, target.concurrency)
    return engine, EngineSync(engine, ctx, dtype)


def _share_cpus(target: RolloutTarget, ctx: DistContext, async_: bool) -> None:
    """With `async`, leave the local rollout servers cores to generate on while this trains."""
    if not async_ or "OMP_NUM_THREADS" in os.environ:
        return
    threads = overlap_threads(target.urls, ctx.device, torch.get_num_threads())
    if threads is not None:
        log.info(
            "Training with %d torch thread(s): the rollout servers share this machine's "
            "CPUs and generate while it trains (set OMP_NUM_THREADS to choose)",
            threads,
        )
        torch.set_num_threads(threads)


def _servers(
    inputs: StageInputs[PromptRow], ctx: DistContext, tokenizer: Any, actor: nn.Module,
    dtype: torch.dtype,
) -> tuple[RolloutGenerator | None, WeightSync]:  # fmt: skip
    """Rank 0's client of the rollout servers, once they answer, and the weight sync that
    pushes the policy to them."""
    target = inputs.config.rollout
    assert target is not None
    # With LoRA, requests ask for the policy's adapter on top of the servers' base weights.
    served = target.lora_adapter or target.served_model
    requests = target.model_copy(update={"served_model": served})
    stops = stop_token_ids(tokenizer, actor)
    client = RolloutClient(requests, stop_token_ids=stops) if ctx.is_main else None
    if client is not None:
        log.info("Waiting for %d rollout server(s): %s", len(target.urls), ", ".join(target.urls))
        client.wait_ready()
    return client, _backend(target, inputs, ctx, dtype)


def prepare(inputs: StageInputs[PromptRow], ctx: DistContext) -> OnlineSetup:
    """Load and shard the policy, set up rewards, reach the servers. Collective."""
    config = inputs.config
    target = config.rollout
    assert target is not None  # preflight
    max_new, async_ = _options(inputs)
    _share_cpus(target, ctx, async_)
    tokenizer = load_tokenizer(config.model, inputs.model_ref)
    actor, dtype, export = load_policy(config, inputs.model_ref, ctx)
    reward = _reward(inputs, tokenizer, ctx)
    client, backend = _generator(inputs, ctx, tokenizer, actor)
    if backend is None:
        client, backend = _servers(inputs, ctx, tokenizer, actor, dtype)
    if ctx.is_main:
        _wait_for_judge(config.judge)
    max_prompt = config.hyperparameters.max_length - max_new
    probe = prompt_token_ids(tokenizer, [inputs.train_rows[0]], max_prompt)[0]
    pad = int(tokenizer.pad_token_id)
    return OnlineSetup(
        inputs=inputs,
        ctx=ctx,
        tokenizer=tokenizer,
        actor=actor,
        dtype=dtype,
        reward=reward,
        client=client,
        syncer=Syncer(backend, client, probe, target.parity_threshold, ctx, pad),
        max_prompt=max_prompt,
        async_=async_,
        backend=backend,
        export=export,
        episodes=episode_runner(config, tokenizer) if ctx.is_main else None,
    )
