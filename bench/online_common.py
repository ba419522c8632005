"""What bench/online.py gives both sides: the Setup (steps, prompts, samples, lengths, learning
rate, PPO's KL, precision) and the prompts file."""

from __future__ import annotations

from dataclasses import dataclass

from benchlib import FIXTURES

PROMPTS = FIXTURES / "prompts.jsonl"


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

    @property
    def dtype(self) -> str:
        """The compute dtype's name, as vLLM's `--dtype` takes it."""
        return "bfloat16" if self.bf16 else "float32"

    def per_step(self, algo: str) -> tuple[int, int]:
        """(prompts, samples per prompt) of one step; all of them make one optimizer step."""
        return (self.prompts, self.generations) if algo == "grpo" else (self.ppo_prompts, 1)
