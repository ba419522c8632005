"""What bench/online.py gives both sides: the Setup (steps, prompts, samples, lengths, learning
rate, PPO's KL, precision, task) and each task's prompts file and reward function."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import FIXTURES


@dataclass(frozen=True)
class Task:
    """Prompts and the registered reward function (`tasks.REWARD_FUNCTIONS`) that scores them."""

    prompts: Path
    format: str  # our dataset format: plain prompt text, or chat rows {"prompt": [messages]}
    reward: str


TASKS = {
    # the tiny models: animal-sound questions as plain text
    "animal_sounds": Task(FIXTURES / "prompts.jsonl", "prompts", "animal_sounds"),
    # a real instruct model: open questions as chat rows, short answers rewarded
    "brief": Task(FIXTURES / "brief" / "brief_prompts.jsonl", "chat", "brief"),
}
PROMPTS = TASKS["animal_sounds"].prompts


def text_of(value: Any) -> str:
    """A prompt or completion as text: TRL passes chat rows as lists of messages, whose last
    message is the user's question (a prompt) or the assistant's answer (a completion)."""
    return str(value[-1]["content"]) if isinstance(value, list) else str(value)


@dataclass(frozen=True)
class Setup:
    """What both sides are given."""

    steps: int
    prompts: int  # GRPO: prompts per step
    generations: int  # GRPO: samples per prompt (G)
    ppo_prompts: int  # PPO: prompts per step, one sample each
    max_new_tokens: int
    lr: float
    ppo_kl: float  # PPO: β of the per-token KL penalty against the reference
    seed: int = 42
    bf16: bool = False  # bf16 mixed precision on both sides; else float32
    task: str = "animal_sounds"  # a TASKS key

    def reward(self, prompt: Any, completion: Any) -> float:
        from rlhf_trainer.tasks.animal_sounds import REWARD_FUNCTIONS

        return REWARD_FUNCTIONS[TASKS[self.task].reward](text_of(prompt), text_of(completion))

    @property
    def dtype(self) -> str:
        """The compute dtype's name, as vLLM's `--dtype` takes it."""
        return "bfloat16" if self.bf16 else "float32"

    def per_step(self, algo: str) -> tuple[int, int]:
        """(prompts, samples per prompt) of one step; all of them make one optimizer step."""
        return (self.prompts, self.generations) if algo == "grpo" else (self.ppo_prompts, 1)
