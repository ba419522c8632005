"""A synthetic task with a checkable answer: "which sound does this animal make?".

Every prompt is some random filler context (farm-yard sentences that mention no animal, sometimes a
note number) followed by one question about one animal, in one of several phrasings, and ends with
the cue "Answer:". The right response is " <sound>." (" moo." for a cow). Because the animal in the
question is always the last animal the prompt names, `check` can score any response from the prompt
alone, which makes it a verifiable reward function for the RL stages as well as the SFT metric.

A 2-layer model with 128 hidden units learns the mapping in about a hundred optimizer steps, and
held-out prompts (new filler around a known animal) measure whether it learned the mapping rather
than the strings.

Torch-free: the tokenizer of the tiny model trains on `corpus()`, so the vocabulary covers the task.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from rlhf_trainer.tasks import brief

SOUNDS: dict[str, str] = {
    "cow": "moo",
    "dog": "woof",
    "cat": "meow",
    "duck": "quack",
    "sheep": "baa",
    "pig": "oink",
    "horse": "neigh",
    "owl": "hoot",
    "lion": "roar",
    "frog": "ribbit",
    "bee": "buzz",
    "snake": "hiss",
    "mouse": "squeak",
    "crow": "caw",
    "goat": "bleat",
    "wolf": "howl",
}

QUESTIONS: tuple[str, ...] = (
    "What does the {animal} say?",
    "Which sound does a {animal} make?",
    "Tell me the sound of the {animal}.",
    "What noise comes from a {animal}?",
    "Listen to the {animal}. What do you hear?",
    "The {animal} opens its mouth. What sound comes out?",
)

FILLERS: tuple[str, ...] = (
    "It was a sunny morning on the farm.",
    "The farmer walked slowly to the barn.",
    "Someone left the gate open again.",
    "A red truck drove along the dusty road.",
    "The wind moved through the tall grass.",
    "Rain had fallen all night long.",
    "Children were playing near the old well.",
    "The tractor would not start today.",
    "Fresh bread was cooling in the kitchen.",
    "A storm was coming from the west.",
    "The fence by the river needed paint.",
    "Apples were ripe in the orchard.",
    "The sun set behind the green hills.",
    "Grandma told a story by the fire.",
    "The market in town opened at nine.",
    "A bell rang somewhere in the valley.",
)

ANSWER_CUE = "Answer:"
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class Example:
    """One task instance: the prompt, the animal it asks about and the right response."""

    prompt: str
    animal: str

    @property
    def answer(self) -> str:
        """The expected sound, e.g. "moo"."""
        return SOUNDS[self.animal]

    @property
    def response(self) -> str:
        """The target completion, with the leading space the prompt leaves out."""
        return f" {self.answer}."


def make_prompt(rng: random.Random, animal: str) -> str:
    """Filler context (0-3 sentences, sometimes a note number), the question, then the cue."""
    parts: list[str] = []
    if rng.random() < 0.3:
        parts.append(f"Note {rng.randint(1, 99)}.")
    parts.extend(rng.sample(FILLERS, rng.randint(0, 3)))
    parts.append(rng.choice(QUESTIONS).format(animal=animal))
    return " ".join(parts) + f"\n{ANSWER_CUE}"


def examples(seed: int) -> Iterator[Example]:
    """An endless, seeded stream of examples; the animals cycle so each appears equally often."""
    rng = random.Random(seed)
    animals = sorted(SOUNDS)
    while True:
        order = animals[:]
        rng.shuffle(order)
        for animal in order:
            yield Example(make_prompt(rng, animal), animal)


def unique_examples(seed: int, count: int, exclude: set[str] | None = None) -> list[Example]:
    """`count` examples with distinct prompts, none of them in `exclude`."""
    seen = set(exclude or ())
    out: list[Example] = []
    for ex in examples(seed):
        if ex.prompt in seen:
            continue
        seen.add(ex.prompt)
        out.append(ex)
        if len(out) == count:
            return out
    raise AssertionError("unreachable: the example stream is endless")


def asked_animal(prompt: str) -> str | None:
    """The animal the prompt asks about: the last known animal word in it."""
    found = [w for w in _WORD.findall(prompt.lower()) if w in SOUNDS]
    return found[-1] if found else None


def check(prompt: str, response: str) -> float:
    """Score a response: 1.0 when its first word is the right sound, 0.5 when the sound comes
    later, 0.0 otherwise (including prompts that ask about no known animal)."""
    animal = asked_animal(prompt)
    if animal is None:
        return 0.0
    words = _WORD.findall(response.lower())
    if not words:
        return 0.0
    if words[0] == SOUNDS[animal]:
        return 1.0
    return 0.5 if SOUNDS[animal] in words else 0.0


def wrong_sound(rng: random.Random, animal: str) -> str:
    """A sound of some other animal, for rejected responses."""
    return rng.choice(sorted(s for a, s in SOUNDS.items() if a != animal))


# A judge that knows the task: the principle and the judge prompts with which an `sft` stage
# teaches a tiny judge the verdict (tests/fixtures/judge_sft.jsonl), and with which the feedback
# stage then asks it (examples/rlaif-tiny.yaml). For this task the response that is best for
# humanity is the one that gives the asked animal's sound. Keys are the spec's camelCase names of
# `judge.templates`. The principle comes first and the verdict turn is empty, so the judge's own
# answer and the two responses sit a few tokens before the verdict; with a separate verdict
# question after the pair, the tiny 2-layer judge did not learn the task (docs/BENCHMARKS.md,
# "AI feedback").
JUDGE_PRINCIPLE = "Which response is best for humanity?"
JUDGE_TEMPLATES: dict[str, str] = {"compare": "{principle}\nA: {a}\nB: {b}", "verdict": ""}


@dataclass(frozen=True)
class JudgePair:
    """A prompt with a right and a wrong response; the programmatic label says `right` wins."""

    example: Example
    wrong: str

    @property
    def right(self) -> str:
        return self.example.response


def judge_pairs(seed: int, count: int, exclude: set[str] | None = None) -> list[JudgePair]:
    """`count` pairs on distinct prompts: the right sound against another animal's sound."""
    rng = random.Random(seed)
    return [
        JudgePair(ex, f" {wrong_sound(rng, ex.animal)}.")
        for ex in unique_examples(seed, count, exclude)
    ]


def corpus(seed: int = 0, size: int = 2000) -> list[str]:
    """Text that covers the task's vocabulary, for training the tiny model's tokenizer."""
    lines = [ex.prompt + ex.response for ex in unique_examples(seed, size)]
    lines += [
        f"\n\nHuman: {q}\n\nAssistant: The {a} says {s}."
        for a, s in SOUNDS.items()
        for q in (QUESTIONS[0].format(animal=a),)
    ]
    lines += list(FILLERS)
    return lines


# Reward functions by name, for `reward: {function: <name>}` in a stage.
REWARD_FUNCTIONS: dict[str, Callable[[str, str], float]] = {
    "animal_sounds": check,
    "brief": brief.brief,  # brief answers from a real instruct model (brief.py)
}
