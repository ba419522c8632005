"""Multi-turn episodes against an environment server (docs/ENVIRONMENTS.md).

An episode opens with the messages the environment's `/reset` returns, rendered with the
policy's chat template. Each assistant turn is generated from token ids (vLLM or the trainer's
engine; every active episode of a step in one call, so a server sees one large batch per turn)
and stops at the end-of-turn token. Its decoded text goes to `/step`, whose added messages
(user or tool turns) are rendered and appended as tokens, up to `maxTurns` assistant turns or
`done`.

The sample an episode becomes: `prompt_ids` the opening prompt, `response_ids` everything after
it. Only what the policy generated carries the loss (`Sample.trained_mask` 1); the tokens the
environment added, and an end-of-turn token closing a turn that ran out of tokens, are masked
(0) with logprob 0. The turn boundaries are the template's: the environment's messages are the
text the template renders after the assistant's end-of-turn token, so the transcript's tokens
are exactly those of the whole conversation rendered once.

Episodes of one dataset row form a GRPO group: `numGenerations` resets with the same seed. An
episode whose environment breaks the protocol or times out is dropped (counted by reason); its
sample keeps no trained token and the mean reward of its group, so it moves neither the
group's baseline nor the policy. A step fails only when every episode is lost.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, cast

from rlhf_trainer.config import StageConfig
from rlhf_trainer.data.chat_data import end_of_turn
from rlhf_trainer.data.chat_format import ChatFormat, Message, load_chat_format
from rlhf_trainer.environments.client import (
    EnvironmentClient,
    EnvironmentUnavailable,
    EpisodeDropped,
)
from rlhf_trainer.errors import UserError
from rlhf_trainer.rollout.client import RolloutError, RolloutGenerator, Sample, Sampling
from rlhf_trainer.runtime.metrics import observe_environment_request

log = logging.getLogger(__name__)

TURN_SEED_STRIDE = 100_003  # each turn's sampling seed moves by this
DROP_REASONS = ("timeout", "http_status", "malformed", "connection")


@dataclass
class Episode:
    """One episode in flight: its conversation as messages and as tokens."""

    group: int  # the dataset row (GRPO group) it belongs to
    replica: int  # the environment replica that holds its session
    session: str = ""
    opening: str = ""  # the opening messages as rendered: the prompt a reward function sees
    messages: list[Message] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    response_ids: list[int] = field(default_factory=list)
    trained: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    reward: float = 0.0
    turns: int = 0
    done: bool = False
    cut: bool = False
    dropped: str | None = None

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    def add(self, ids: Sequence[int], trained: bool, logprobs: Sequence[float] = ()) -> None:
        self.response_ids += ids
        self.trained += [int(trained)] * len(ids)
        self.logprobs += list(logprobs) if trained else [0.0] * len(ids)


class Transcript:
    """Chat messages <-> token ids with the policy's template."""

    def __init__(self, chat: ChatFormat, tokenizer: Any) -> None:
        self.chat, self.tokenizer = chat, tokenizer
        marker = end_of_turn(chat.template, chat.eos_token)
        if marker is None:
            raise ValueError(
                "environment: the policy's chat template marks no end of an assistant turn, so "
                "turns cannot be told apart; use a chat model (or set its chat template)"
            )
        self.marker = marker
        self.end_id = self._single_id(marker)

    def _single_id(self, text: str) -> int | None:
        ids = self.encode(text)
        return ids[0] if len(ids) == 1 else None

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def after_turn(self, before: list[Message], added: list[Message]) -> list[int]:
        """The tokens the template writes after the last assistant turn of `before` (from its
        end-of-turn token on, exclusive) through `added` and the next generation prompt."""
        done = self.chat.render(before, add_generation_prompt=False, keep_bos=True)
        whole = self.chat.render([*before, *added], add_generation_prompt=True, keep_bos=True)
        cut = done.rfind(self.marker)
        if cut < 0 or not whole.startswith(done[: cut + len(self.marker)]):
            raise ValueError("the chat template rendered an earlier turn differently")
        return self.encode(whole[cut + len(self.marker) :])

    def text(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))


@dataclass(frozen=True)
class EpisodeSettings:
    max_turns: int
    max_length: int  # prompt + every turn, in tokens
    concurrency: int


class EpisodeRunner:
    """Plays a step's episodes: rank 0 only (it holds the generator and the environment)."""

    def __init__(
        self,
        client: EnvironmentClient,
        transcript: Transcript,
        settings: EpisodeSettings,
    ) -> None:
        self.client, self.transcript, self.settings = client, transcript, settings

    def play(
        self,
        rows: Sequence[Mapping[str, Any]],
        seed: int,
        n: int,
        generator: RolloutGenerator,
        sampling: Sampling,
    ) -> tuple[list[str], list[Sample], dict[str, float]]:
        """(each row's opening prompt as text, `n` samples per row prompt-major, metrics)."""
        episodes = [Episode(group=i, replica=i * n + j) for i in range(len(rows)) for j in range(n)]
        self._each(episodes, lambda e: self._reset(e, rows[e.group], seed + e.group))
        for turn in range(self.settings.max_turns):
            active = [e for e in episodes if not (e.done or e.dropped or e.cut)]
            if not active:
                break
            self._generate(active, generator, replace(sampling, n=1), seed, turn)
            last = turn + 1 == self.settings.max_turns
            generated = [e for e in active if not e.cut]
            self._each(generated, functools.partial(self._step, last=last))
        return self._finish(rows, episodes, n)

    def _each(self, episodes: list[Episode], call: Callable[[Episode], None]) -> None:
        """`call` on every episode, `concurrency` at a time; a protocol failure drops one."""

        def guarded(episode: Episode) -> None:
            try:
                call(episode)
            except EpisodeDropped as err:
                episode.dropped = err.reason
                log.debug("Dropped an episode of row %d: %s", episode.group, err)

        if not episodes:
            return
        with ThreadPoolExecutor(min(self.settings.concurrency, len(episodes))) as pool:
            list(pool.map(guarded, episodes))

    def _reset(self, episode: Episode, row: Mapping[str, Any], seed: int) -> None:
        opened = self.client.reset(episode.replica, dict(row), seed)
        episode.session = opened.session
        episode.messages = [cast(Message, m) for m in opened.messages]
        episode.opening = self.transcript.chat.render(episode.messages, keep_bos=True)
        episode.prompt_ids = self.transcript.encode(episode.opening)
        if len(episode.prompt_ids) >= self.settings.max_length:
            episode.cut = True

    def _generate(
        self,
        active: list[Episode],
        generator: RolloutGenerator,
        sampling: Sampling,
        seed: int,
        turn: int,
    ) -> None:
        """One assistant turn of every active episode, in one generate call."""
        room = []
        for episode in active:
            if len(episode.ids) + sampling.max_tokens <= self.settings.max_length:
                room.append(episode)
            else:
                episode.cut = True  # no room for another turn under maxLength
        if not room:
            return
        call = replace(sampling, seed=seed + turn * TURN_SEED_STRIDE)
        groups = generator.generate([e.ids for e in room], call)
        for episode, [sample] in zip(room, groups, strict=True):
            episode.add(sample.response_ids, True, sample.logprobs)
            episode.turns += 1
            end = self.transcript.end_id
            if end is not None and sample.response_ids[-1:] != (end,):
                # Cut at maxNewTokens, or stopped at EOS: close the turn as the template does.
                episode.add([end], False)
            reply: Message = {
                "role": "assistant",
                "content": self.transcript.text(sample.response_ids),
            }
            episode.messages.append(reply)

    def _step(self, episode: Episode, last: bool) -> None:
        step = self.client.step(episode.replica, episode.session, episode.messages[-1]["content"])
        episode.reward += step.reward or 0.0
        if step.done or last:
            episode.done = True
            return
        added = [cast(Message, {"role": m["role"], "content": m["content"]}) for m in step.messages]
        try:
            ids = self.transcript.after_turn(episode.messages, added)
        except ValueError as err:
            raise EpisodeDropped("malformed", str(err)) from None
        episode.messages += added
        episode.add(ids, False)
        if len(episode.ids) >= self.settings.max_length:
            episode.cut = True

    def _finish(
        self, rows: Sequence[Mapping[str, Any]], episodes: list[Episode], n: int
    ) -> tuple[list[str], list[Sample], dict[str, float]]:
        kept = [e for e in episodes if e.dropped is None]
        if not kept:
            reasons = Counter(e.dropped for e in episodes)
            raise RolloutError(
                f"every episode of the step was dropped ({dict(reasons)}): check the "
                "environment's logs and that it speaks the protocol (docs/ENVIRONMENTS.md)"
            )
        samples = [self._sample(e, episodes[e.group * n : (e.group + 1) * n]) for e in episodes]
        prompts = [
            next((e.opening for e in episodes[i * n : (i + 1) * n] if e.opening), "")
            for i in range(len(rows))
        ]
        return prompts, samples, self._metrics(episodes, kept)

    def _sample(self, episode: Episode, group: list[Episode]) -> Sample:
        if episode.dropped is None:
            return Sample(
                episode.group,
                tuple(episode.prompt_ids),
                tuple(episode.response_ids),
                tuple(episode.logprobs),
                "length" if episode.cut else "stop",
                trained_mask=tuple(episode.trained),
                reward=episode.reward,
            )
        # A dropped episode: no trained token, the mean reward of its group's other episodes.
        others = [e.reward for e in group if e.dropped is None]
        reward = sum(others) / len(others) if others else 0.0
        ids = tuple(episode.response_ids) or (self.transcript.end_id or 0,)
        prompt = next((e.prompt_ids for e in group if e.prompt_ids), list(ids))
        return Sample(
            episode.group,
            tuple(episode.prompt_ids or prompt),
            ids,
            (0.0,) * len(ids),
            "dropped",
            trained_mask=(0,) * len(ids),
            reward=reward,
        )

    def _metrics(self, episodes: list[Episode], kept: list[Episode]) -> dict[str, float]:
        reasons = Counter(e.dropped for e in episodes if e.dropped is not None)
        latencies = self.client.take_latencies()
        for seconds in latencies:
            observe_environment_request(seconds)
        out = {
            "episode_reward": sum(e.reward for e in kept) / len(kept),
            "episode_turns": sum(e.turns for e in kept) / len(kept),
            "episodes_cut": float(sum(e.cut for e in kept)),
            "env_latency_s": sum(latencies) / len(latencies) if latencies else 0.0,
        }
        out |= {f"episodes_dropped_{r}": float(reasons.get(r, 0)) for r in DROP_REASONS}
        if not all(math.isfinite(v) for v in out.values()):
            raise RolloutError(f"an environment sent non-finite rewards: {out}")
        return out


def episode_runner(config: StageConfig, tokenizer: Any) -> EpisodeRunner | None:
    """Rank 0's runner for a stage with an environment, once every replica answers /health
    (EnvironmentUnavailable naming them after `startupTimeoutSeconds`); None without one."""
    target = config.environment
    if target is None:
        return None
    client = EnvironmentClient(target.urls, target.timeout_seconds, target.startup_timeout_seconds)
    log.info("Waiting for %d environment server(s): %s", len(target.urls), ", ".join(target.urls))
    try:
        client.wait_healthy()
    except EnvironmentUnavailable as err:
        raise UserError(f"environment: {err}") from None
    settings = EpisodeSettings(
        target.max_turns, config.hyperparameters.max_length, target.concurrency
    )
    return EpisodeRunner(client, Transcript(load_chat_format(config.model), tokenizer), settings)


def check_environment(config: StageConfig) -> None:
    """Episodes need turns the template tells apart, and the rollouts of the current policy."""
    if config.type != "grpo":
        raise UserError(f"environment: episodes run in grpo stages, not {config.type}")
    if config.grpo is not None and config.grpo.async_:
        raise UserError(
            "grpo.async: episodes against an environment are generated turn by turn with the "
            "current policy; set async to false"
        )
    chat = load_chat_format(config.model)
    if end_of_turn(chat.template, chat.eos_token) is None:
        raise UserError(
            "environment: the model has no chat template that ends an assistant turn, so an "
            "episode's turns cannot be rendered; start from a chat model (e.g. an SFT stage on "
            "chat data)"
        )
