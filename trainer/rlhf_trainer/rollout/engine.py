"""Generation inside the trainer's process: `rollout.engine: trainer`.

The online stages normally generate on vLLM or lmdeploy servers and push every new policy to
them (`rollout/weight_sync.py`). With `engine: trainer` there are no servers: rank 0 keeps a
decoder over the policy's own weights (`rollout/decoders.py`) and samples from it, as TRL's
`use_vllm=False` or verl's `hf` rollout do. It stands in for the rollout client everywhere the
online loop uses one (`TrainerEngine`: the feed, held-out evaluation, the parity probe), and its
"weight sync" (`EngineSync`) hands the decoder the updated weights: by reference for one
unsharded process, gathered from the FSDP shards onto rank 0 otherwise. It fits models whose
full weights fit rank 0's device, on machines where a server's per-step overhead outweighs its
batching (CPUs, small models: docs/BENCHMARKS.md, "Online RL").

Sampling matches what the servers do for the trainer: per prompt, `n` samples that share one
prompt pass (the cache is forked), temperature and top-p, a stop at EOS (kept as the last
response token, finish reason "stop") or at `max_tokens` ("length"), and the logprob of every
sampled token under the model's own distribution (before temperature and top-p). The seed
makes a call reproducible. Torch only; no HTTP.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from rlhf_trainer.rollout.client import RolloutError, Sample, Sampling
from rlhf_trainer.rollout.decoders import Decoder, LlamaDecoder, build_decoder, prompt_positions
from rlhf_trainer.rollout.weight_sync import full_state_on_rank0
from rlhf_trainer.runtime.distributed import DistContext
from rlhf_trainer.runtime.metrics import SyncBackend

log = logging.getLogger(__name__)

ENGINE_URL = "trainer"  # how logs and the parity probe name the in-process engine


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest set whose probability reaches `top_p` (the most
    likely token always stays). probs (B, V) -> (B, V), not renormalised."""
    ordered, index = probs.sort(dim=-1, descending=True)
    before = ordered.cumsum(dim=-1) - ordered  # mass of the tokens ranked above each one
    ordered = ordered.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, index, ordered)


def sample_tokens(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row: logits (B, V) float32 -> (tokens (B,) int64, their logprobs (B,)
    under softmax(logits)). Greedy at temperature 0; else inverse-CDF sampling from
    softmax(logits / temperature), cut to top-p (one uniform draw per row)."""
    norm = torch.logsumexp(logits, dim=-1, keepdim=True)
    if sampling.temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        probs = (logits - norm).exp() if sampling.temperature == 1 else torch.softmax(
            logits / sampling.temperature, dim=-1
        )
        if sampling.top_p < 1:
            probs = nucleus(probs, sampling.top_p)
        cdf = probs.cumsum(dim=-1)
        draw = torch.rand(
            (logits.size(0), 1), generator=generator, device=logits.device
        ).clamp_(min=1e-12)  # a draw of exactly 0 would pick token 0 even at probability 0
        tokens = torch.searchsorted(cdf, draw * cdf[:, -1:]).squeeze(1)
        tokens = tokens.clamp_(max=logits.size(-1) - 1)
    picked = logits.gather(1, tokens.unsqueeze(1))
    return tokens, (picked - norm).squeeze(1)


def left_padded(
    prompts: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (ids (B, P), real (B, P) bool), left-padded with token 0 (never attended)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    real = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, prompt in enumerate(prompts):
        if prompt:
            ids[i, width - len(prompt) :] = torch.tensor(list(prompt))
            real[i, width - len(prompt) :] = True
    return ids.to(device), real.to(device)


@torch.no_grad()
def generate_batch(
    decoder: Decoder,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling,
    stop: torch.Tensor,
    generator: torch.Generator | None,
) -> list[list[Sample]]:
    """`sampling.n` samples of each prompt, decoded together; [prompt][sample]. `stop`: the
    EOS token ids (1-D int64, on the decoder's device)."""
    if any(not p for p in prompts):
        raise RolloutError("a prompt has no tokens; the engine needs at least one")
    ids, real = left_padded(prompts, stop.device)
    width, new, n = ids.size(1), sampling.max_tokens, sampling.n
    logits = decoder.prefill(ids, real, width + new)
    if n > 1:
        decoder.fork(n)
        logits, real = logits.repeat_interleave(n, 0), real.repeat_interleave(n, 0)
    rows = real.size(0)
    visible = torch.ones((rows, width + new), dtype=torch.bool, device=stop.device)
    visible[:, :width] = real
    positions = prompt_positions(real)[:, -1] + 1
    tokens = torch.empty((rows, new), dtype=torch.long, device=stop.device)
    logprobs = torch.empty((rows, new), dtype=torch.float32, device=stop.device)
    done = torch.zeros(rows, dtype=torch.bool, device=stop.device)
    steps = new
    for t in range(new):
        tokens[:, t], logprobs[:, t] = sample_tokens(logits, sampling, generator)
        done |= torch.isin(tokens[:, t], stop)
        if t + 1 == new or bool(done.all()):
            steps = t + 1
            break
        logits = decoder.decode(tokens[:, t], positions, visible[:, : width + t + 1])
        positions = positions + 1
    if not bool(torch.isfinite(logprobs[:, :steps]).all()):  # as `rollout.parse_sample` asks
        raise RolloutError("the trainer's engine computed a logprob that is not a finite "
                           "number (a NaN or infinity in the policy's weights or activations)")
    return _samples(prompts, n, tokens[:, :steps].cpu(), logprobs[:, :steps].cpu(), stop.cpu())


def _samples(
    prompts: Sequence[Sequence[int]],
    n: int,
    tokens: torch.Tensor,
    logprobs: torch.Tensor,
    stop: torch.Tensor,
) -> list[list[Sample]]:
    """Cut each row after its first stop token; rows prompt-major, n per prompt."""
    stops = torch.isin(tokens, stop)
    first = torch.where(stops.any(dim=1), stops.int().argmax(dim=1) + 1, tokens.size(1))
    groups: list[list[Sample]] = []
    for i, prompt in enumerate(prompts):
        group = []
        for row in range(i * n, (i + 1) * n):
            length = int(first[row])
            reason = "stop" if bool(stops[row].any()) else "length"
            response = tuple(tokens[row, :length].tolist())
            scores = tuple(logprobs[row, :length].tolist())
            group.append(Sample(i, tuple(prompt), response, scores, reason))
        groups.append(group)
    return groups


class TrainerEngine:
    """Rank 0's stand-in for the rollout client (`rollout.RolloutClient`): same calls, served
    by a decoder over the policy's weights (`load` gives it new ones)."""

    def __init__(
        self,
        config: Any,
        stop_ids: Iterable[int],
        device: torch.device,
        dtype: torch.dtype,
        prompts_per_batch: int,
    ) -> None:
        self.config, self.device, self.dtype = config, device, dtype
        self.stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
        self.prompts_per_batch = prompts_per_batch
        self.decoder: Decoder | None = None
        self.probe_sample: Sample | None = None  # the parity probe's tokens, once generated
        self.failures: collections.Counter[str] = collections.Counter()  # never any
        self.lost_connection = False  # nothing to lose

    @property
    def urls(self) -> list[str]:
        return [ENGINE_URL]

    @property
    def fused(self) -> bool:
        return isinstance(self.decoder, LlamaDecoder)

    def wait_ready(self) -> None:
        """Nothing to wait for: the engine is ready once it has weights."""

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """New policy weights: a full state dict. The decoder reads its tensors in place where
        it can (the live model's, with one unsharded process); the online loop changes them
        only in optimizer steps, which end before the next generation and are followed by the
        next `load`."""
        first = self.decoder is None
        self.decoder = build_decoder(self.config, state, self.device, self.dtype)
        if first:
            kind = "fused Llama decoder" if self.fused else "the model's own forward"
            log.info("Generating in the trainer's process (%s, %s)", kind, self.dtype)

    def probe(self, prompt: Sequence[int], max_tokens: int, url: str) -> Sample:
        """The parity probe's sample: greedy the first time, then the same tokens scored again
        by the current weights (one pass instead of `max_tokens` decode steps)."""
        del url  # one engine
        if self.decoder is None:
            raise RolloutError("the trainer engine has no weights yet (no weight sync ran)")
        if self.probe_sample is None or self.probe_sample.prompt_ids != tuple(prompt):
            greedy = Sampling(n=1, max_tokens=max_tokens, temperature=0.0)
            self.probe_sample = self.generate([prompt], greedy)[0][0]
            return self.probe_sample
        return score_sample(self.decoder, self.probe_sample, self.device)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: Sampling,
        urls: Sequence[str] | None = None,
    ) -> list[list[Sample]]:
        """`sampling.n` samples for every prompt, `prompts_per_batch` prompts at a time."""
        del urls  # one engine
        if self.decoder is None:
            raise RolloutError("the trainer engine has no weights yet (no weight sync ran)")
        generator = None
        if sampling.temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(sampling.seed)
        out: list[list[Sample]] = []
        for start in range(0, len(prompts), self.prompts_per_batch):
            chunk = prompts[start : start + self.prompts_per_batch]
            for group in generate_batch(self.decoder, chunk, sampling, self.stop, generator):
                out.append([_renumber(s, start + s.prompt_index) for s in group])
        return out


@torch.no_grad()
def score_sample(decoder: Decoder, sample: Sample, device: torch.device) -> Sample:
    """The same tokens with the decoder's logprobs of them (one pass, teacher-forced)."""
    ids = torch.tensor([list(sample.prompt_ids) + list(sample.response_ids)], device=device)
    real = torch.ones_like(ids, dtype=torch.bool)
    logits = decoder.prefill(ids, real, ids.size(1), every=True)[0]
    start, tokens = len(sample.prompt_ids) - 1, ids[0, len(sample.prompt_ids) :]
    picked = torch.log_softmax(logits[start : start + tokens.numel()], dim=-1)
    logprobs = picked.gather(1, tokens.unsqueeze(1)).squeeze(1).cpu().tolist()
    return Sample(0, sample.prompt_ids, sample.response_ids, tuple(logprobs),
                  sample.finish_reason)  # fmt: skip


def _renumber(sample: Sample, index: int) -> Sample:
    if sample.prompt_index == index:
        return sample
    return Sample(index, sample.prompt_ids, sample.response_ids, sample.logprobs,
                  sample.finish_reason)  # fmt: skip


def live_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The policy's own tensors, shared with the decoder without a copy, when nothing needs
    gathering (one unsharded process); None otherwise."""
    if isinstance(model, FSDPModule) or any(isinstance(m, FSDPModule) for m in model.modules()):
        return None
    return {k: v.detach() for k, v in model.state_dict().items()}


class EngineSync:
    """The weight sync of `engine: trainer`: the decoder on rank 0 gets the policy's weights
    (collective: every rank takes part in gathering FSDP shards)."""

    backend: SyncBackend = "trainer"

    def __init__(self, engine: TrainerEngine | None, ctx: DistContext, dtype: torch.dtype):
        self.engine, self.ctx, self.dtype = engine, ctx, dtype

    def sync(self, model: nn.Module, step: int) -> None:
        del step
        state = live_state(model)
        if state is None:
            state = full_state_on_rank0(model, self.dtype)
        if self.ctx.is_main:
            assert self.engine is not None
            self.engine.load(state)

    def close(self) -> None:
        self.engine = None
