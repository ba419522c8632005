"""The AI judge: self-reference feedback with one general principle (Bao et al. 2024).

For a prompt x and two responses, in one chat with the judge:
1. (self-reference) the judge answers x itself; that answer is its reference;
2. it sees `A: ... B: ...` and the principle and critiques both (against its own answer);
3. it gives a verdict, constrained to the single letter A or B.

The pair is judged in both orders (A, B) and (B, A); the self-consistency filter keeps it only
when both verdicts name the same response. The preference strength is ours (the paper's exact
formula is not public): P(A) and P(B) come from the verdict token's logprobs, normalised over
the two letters, and are averaged over both orders; `margin = P(chosen) - P(rejected)`.

The server lists only the top `TOP_LOGPROBS` tokens, so a letter can be missing from them. Its
probability is then not 0 but unknown, below a bound (`unlisted_bound`): at most the smallest
listed probability, and at most the mass the listed tokens leave. A missing letter gets that
bound, so the margin is a lower bound on the listed letter's lead, never the maximum 1 it would
be with P = 0. With neither letter listed nothing bounds the strength: the verdict keeps its
parsed letter and gets P(A) = 0.5 with `strength_known` False; averages leave it out, and a pair
without any known strength gets P(first) = 0.5, margin 0 (the minimum), `pA` null in its row.

The constrained choice is vLLM's structured outputs (`structured_outputs: {choice: [A, B]}`);
lmdeploy answers one greedy token and the verdict is the likelier letter among its first-token
logprobs. The verdict turn is greedy (temperature 0), so the letter and the probabilities agree.
The direct protocol (no self-reference) is the same chat without step 1, the baseline.

Failures never raise out of `compare`: a timeout, an error or an answer that is not A or B
becomes a `Judgement` with that outcome, so the pair is dropped and counted.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from rlhf_trainer.config import JudgeProtocol, JudgeTarget
from rlhf_trainer.data.chat_format import ChatFormat, Message, load_chat_format
from rlhf_trainer.rollout.completions import CallFailed, Completion, CompletionsClient, top_logprobs
from rlhf_trainer.runtime.metrics import JudgeOutcome

LETTERS: tuple[str, str] = ("A", "B")
DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))
TOP_LOGPROBS = 20  # vLLM's default --max-logprobs
NEUTRAL = 0.5  # P(A) of a verdict whose strength is unknown
Letter = Literal["A", "B"]


def unlisted_bound(top: dict[str, float]) -> float:
    """An upper bound on the probability of a token missing from a top-k list: each listed
    token is at least as likely (min exp(logprob)), and all tokens sum to 1 (1 - listed mass).
    0 for an empty list, which bounds nothing (no caller uses it then)."""
    probs = [math.exp(lp) for lp in top.values() if lp > -math.inf]
    if not probs:
        return 0.0
    return min(min(probs), max(0.0, 1.0 - sum(probs)))


def choice_probabilities(
    top: dict[str, float], options: Sequence[str], bound_missing: bool = False
) -> dict[str, float]:
    """P(option) from one position's top logprobs, normalised over the options.

    Tokens are matched after stripping whitespace (" A" counts for "A"); several tokens of one
    option add up. {} when no option is among the tokens. `bound_missing`: an option missing
    from the list gets `unlisted_bound(top)` instead of 0 (module docstring; meant for two
    options: several missing ones would each get the whole bound).
    """
    mass = dict.fromkeys(options, 0.0)
    listed: set[str] = set()
    for token, logprob in top.items():
        key = token.strip()
        if key in mass and logprob > -math.inf:
            mass[key] += math.exp(logprob)
            listed.add(key)
    if not sum(mass.values()) > 0:
        return {}
    if bound_missing:
        bound = unlisted_bound(top)
        mass = {o: p if o in listed else bound for o, p in mass.items()}
    total = sum(mass.values())
    return {option: p / total for option, p in mass.items()}


def read_choice(
    completion: Completion, options: Sequence[str], bound_missing: bool = False
) -> tuple[str, dict[str, float]]:
    """The chosen option and the probabilities of all options, from a constrained answer.

    The answer text decides when it is an option (vLLM's constrained choice); otherwise the
    likeliest listed option among the first-token logprobs (lmdeploy). Raises
    CallFailed("unparseable") when neither gives an option. `bound_missing` as in
    `choice_probabilities`; it changes the probabilities, never the choice.
    """
    options = tuple(options)  # a string of letters is a sequence too; `in` must not match "AB"
    top = top_logprobs(completion)
    listed = choice_probabilities(top, options)
    probs = choice_probabilities(top, options, bound_missing) if bound_missing else listed
    text = completion.text.strip()
    if text in options:
        return text, probs
    if listed:
        return max(options, key=lambda o: listed[o]), probs
    raise CallFailed(
        "unparseable",
        f"the judge answered {completion.text[:40]!r}, not one of {', '.join(options)}",
    )


@dataclass(frozen=True)
class Verdict:
    """One order's verdict: the letter and P(A) (P(B) = 1 - P(A)); with `strength_known`
    False neither letter was among the top logprobs, and P(A) is the neutral 0.5."""

    winner: Letter
    p_a: float
    critique: str | None = None
    strength_known: bool = True


@dataclass(frozen=True)
class Judgement:
    """A pair judged in one or both orders. `first` was shown as A in the first order."""

    prompt: str
    first: str
    second: str
    outcome: JudgeOutcome
    verdicts: tuple[Verdict, ...] = ()
    reference: str | None = None
    detail: str = ""

    @property
    def strength_known(self) -> bool:
        """Whether some order's verdict came with letter probabilities."""
        return any(v.strength_known for v in self.verdicts)

    @property
    def p_first(self) -> float | None:
        """P(first is better), averaged over the orders judged whose strength is known; 0.5
        when none is (the verdict then says which, not by how much)."""
        if not self.verdicts:
            return None
        ps = [v.p_a if i == 0 else 1.0 - v.p_a for i, v in enumerate(self.verdicts)]
        known = [p for p, v in zip(ps, self.verdicts, strict=True) if v.strength_known]
        return sum(known) / len(known) if known else NEUTRAL

    def preference_row(self, protocol: str) -> dict[str, Any] | None:
        """A `preference` dataset row with judge metadata; None unless the pair was kept."""
        p_first = self.p_first
        if self.outcome != "kept" or p_first is None:
            return None
        first_wins = self.verdicts[0].winner == "A"
        p_chosen = p_first if first_wins else 1.0 - p_first
        return {
            "prompt": self.prompt,
            "chosen": self.first if first_wins else self.second,
            "rejected": self.second if first_wins else self.first,
            "margin": round(max(0.0, 2.0 * p_chosen - 1.0), 6),
            "judge": {
                "protocol": protocol,
                "pChosen": round(p_chosen, 6),
                "pA": [round(v.p_a, 6) if v.strength_known else None for v in self.verdicts],
                "reference": self.reference,
                "critiques": [v.critique for v in self.verdicts],
            },
        }


def agreement(verdicts: Sequence[Verdict]) -> bool:
    """Self-consistency: order 2 shows the pair swapped, so its letter must be the other one."""
    return len(verdicts) < 2 or verdicts[0].winner != verdicts[1].winner


def reference_chat(protocol: JudgeProtocol, prompt: str) -> list[Message]:
    """Turn 1: the chat in which the judge answers the prompt itself."""
    return [{"role": "user", "content": protocol.templates.reference.format(prompt=prompt)}]


def compare_chat(
    protocol: JudgeProtocol, prompt: str, a: str, b: str, reference: str | None
) -> list[Message]:
    """Turn 2: the pair and the principle, after turn 1 when there is a reference."""
    t = protocol.templates
    fields = {"prompt": prompt, "a": a, "b": b, "principle": protocol.principle}
    chat: list[Message] = []
    if reference is not None:
        chat += [*reference_chat(protocol, prompt), {"role": "assistant", "content": reference}]
    compare = t.compare if reference is not None else t.compare_direct
    chat.append({"role": "user", "content": compare.format(**fields)})
    return chat


def verdict_chat(
    protocol: JudgeProtocol,
    prompt: str,
    a: str,
    b: str,
    reference: str | None,
    critique: str | None = None,
) -> list[Message]:
    """The whole chat whose next assistant turn is the verdict letter.

    The one place the verdict prompt is built: `Judge.verdict` sends it, and training data for
    a judge (an `sft` stage that teaches it a task) renders the very same chat.
    """
    chat = compare_chat(protocol, prompt, a, b, reference)
    if critique is not None:
        chat.append({"role": "assistant", "content": critique})
    verdict = protocol.templates.verdict.format(principle=protocol.principle)
    if not verdict and critique is None:
        return chat  # an empty verdict template: the comparison turn itself asks for it
    return [*chat, {"role": "user", "content": verdict}]


@dataclass
class Judge:
    """The judge protocol over a completions client; one instance per stage."""

    target: JudgeTarget
    chat: ChatFormat
    client: CompletionsClient
    _references: dict[str, asyncio.Task[str]] = field(default_factory=dict)

    @property
    def protocol(self) -> str:
        return "self-reference" if self.target.self_reference else "direct"

    async def _generate(self, messages: list[Message]) -> str:
        payload = {
            "prompt": self.chat.render(messages),
            "max_tokens": self.target.max_new_tokens,
            "temperature": self.target.temperature,
            "top_p": self.target.top_p,
        }
        return (await self.client.complete(payload))[0].text.strip()

    async def _choose(
        self, messages: list[Message], options: Sequence[str], bound_missing: bool = False
    ) -> tuple[str, dict[str, float]]:
        payload: dict[str, Any] = {
            "prompt": self.chat.render(messages),
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": TOP_LOGPROBS,
        }
        if self.target.engine == "vllm":
            payload["structured_outputs"] = {"choice": list(options)}
        else:
            payload["top_k"] = 1  # lmdeploy: greedy for sure, whatever it makes of temperature 0
        return read_choice((await self.client.complete(payload))[0], options, bound_missing)

    def reference(self, prompt: str) -> asyncio.Task[str]:
        """Turn 1: the judge's own answer to the prompt, generated once per prompt."""
        task = self._references.get(prompt)
        if task is None:
            task = asyncio.ensure_future(self._generate(reference_chat(self.target, prompt)))
            self._references[prompt] = task
        return task

    def forget(self, prompt: str) -> None:
        self._references.pop(prompt, None)

    async def verdict(self, prompt: str, a: str, b: str, reference: str | None) -> Verdict:
        """Turns 2-3 of one order: the pair and the principle, a critique, then A or B."""
        critique = None
        if self.target.critique:
            critique = await self._generate(compare_chat(self.target, prompt, a, b, reference))
        chat = verdict_chat(self.target, prompt, a, b, reference, critique)
        letter, probs = await self._choose(chat, LETTERS, bound_missing=True)
        winner: Letter = "A" if letter == "A" else "B"
        if not probs:  # neither letter listed: which one, but not by how much
            return Verdict(winner, NEUTRAL, critique, strength_known=False)
        return Verdict(winner, probs["A"], critique)

    async def compare(self, prompt: str, first: str, second: str, swap: bool = True) -> Judgement:
        """Judge a pair in both orders (or one); never raises for a failed call."""
        reference = None
        try:
            if self.target.self_reference:
                reference = await asyncio.shield(self.reference(prompt))
        except CallFailed as err:
            return Judgement(prompt, first, second, err.outcome, detail=str(err))
        orders = [(first, second), (second, first)] if swap else [(first, second)]
        results = await asyncio.gather(
            *(self.verdict(prompt, a, b, reference) for a, b in orders), return_exceptions=True
        )
        verdicts: list[Verdict] = []
        for result in results:
            if isinstance(result, CallFailed):
                return Judgement(
                    prompt, first, second, result.outcome, reference=reference, detail=str(result)
                )
            if isinstance(result, BaseException):
                raise result
            verdicts.append(result)
        outcome: JudgeOutcome = "kept" if agreement(verdicts) else "disagreed"
        return Judgement(prompt, first, second, outcome, tuple(verdicts), reference)

    async def score(self, prompt: str, response: str) -> float:
        """Pointwise: the expected 0-9 score of a response, divided by 9 (in [0, 1])."""
        content = self.target.templates.score.format(
            prompt=prompt, response=response, principle=self.target.principle
        )
        digit, probs = await self._choose([{"role": "user", "content": content}], DIGITS)
        if not probs:
            return int(digit) / 9.0
        return sum(int(d) * p for d, p in probs.items()) / 9.0


@asynccontextmanager
async def open_judge(target: JudgeTarget, chat: ChatFormat | None = None) -> AsyncIterator[Judge]:
    """A Judge on the target's servers, with the judge model's chat format unless given."""
    if chat is None:
        chat = load_chat_format(target.model, target.chat_template)
    requests = target.requests
    async with CompletionsClient(
        target.urls,
        target.served_model,
        concurrency=requests.concurrency,
        timeout_s=requests.timeout_seconds,
        max_retries=requests.max_retries,
    ) as client:
        yield Judge(target, chat, client)
