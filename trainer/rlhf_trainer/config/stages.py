"""The stage table: each stage type, declared once, with the facts about it that the operator
and the trainer derive their rules and dispatch from.

- the operator: `api.py`'s field rules (which types need a dataset or a reward, take `lora`,
  train a policy, own which option block), the CRD's CEL rules built from them (crd.py), the
  planner's supported types and the builders' online predicate;
- the trainer: `python -m rlhf_trainer TYPE` runs the type's preflight check, then its trainer.

A new stage type is a row here, its options class (and `StageType` entry) in this package, and
its own trainer module; tests/unit/test_stage_table.py holds the rest of the code to this table.
Torch-free, as all of `rlhf_trainer.config`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class StageKind:
    """What a stage type is, as the spec and the trainer see it."""

    options: str  # the field of its options block in `StageConfig` and the RLHFRun's stage
    trains_policy: bool  # its output is a causal LM: what `from` and evaluate.policies may name
    trains: bool  # trains a model at all (a policy, or the reward model): an optimizer, batches
    online: bool  # samples from the policy while it trains (rrhf: only with rrhf.online)
    needs_dataset: bool
    needs_reward: bool  # reward: {from|judge|function} (grpo: or an environment's episodes)
    lora: bool  # takes a `lora` block
    check: str  # its check in rlhf_trainer.preflight: every input, before torch loads
    run: str  # "module:function" of its trainer
    blocks: tuple[str, ...] = ()  # other blocks only this type takes
    # The trainer when its options block turns on sampling from the policy (`rrhf.online`).
    online_run: str | None = None


def _kind(
    options: str,
    run: str,
    *,
    policy: bool,
    online: bool,
    needs_reward: bool = False,
    lora: bool = True,
    blocks: tuple[str, ...] = (),
    online_run: str | None = None,
) -> StageKind:
    """A row: every stage type needs a dataset; its check is named after its trainer function
    (`run_sft` -> `check_sft`)."""
    function = run.rpartition(":")[2]
    return StageKind(
        options=options,
        trains_policy=policy,
        trains=policy or options == "reward_model",
        online=online,
        needs_dataset=True,
        needs_reward=needs_reward,
        lora=lora,
        check=function.replace("run_", "check_", 1),
        run=f"rlhf_trainer.{run}",
        blocks=blocks,
        online_run=f"rlhf_trainer.{online_run}" if online_run else None,
    )


# In the order of `StageType`; the CRD lists option blocks in this order.
STAGES: dict[str, StageKind] = {
    "sft": _kind("sft", "offline.sft:run_sft", policy=True, online=False),
    "reward": _kind("reward_model", "offline.reward:run_reward", policy=False, online=False),
    "dpo": _kind("dpo", "offline.dpo:run_dpo", policy=True, online=False),
    "rrhf": _kind(
        "rrhf", "offline.rrhf:run_rrhf", policy=True, online=False,
        online_run="online.rrhf:run_online_rrhf",
    ),
    "ppo": _kind("ppo", "online.ppo:run_ppo", policy=True, online=True, needs_reward=True),
    "grpo": _kind(
        "grpo", "online.grpo:run_grpo", policy=True, online=True, needs_reward=True,
        blocks=("environment",),
    ),
    "feedback": _kind(
        "feedback", "feedback.stage:run_feedback", policy=False, online=False, lora=False
    ),
    "evaluate": _kind(
        "evaluate", "evaluate.stage:run_evaluate", policy=False, online=False, lora=False
    ),
}  # fmt: skip


def stage_types(where: Callable[[StageKind], bool]) -> frozenset[str]:
    """The stage types whose row satisfies `where`, e.g. `stage_types(lambda k: k.lora)`."""
    return frozenset(name for name, kind in STAGES.items() if where(kind))


def option_blocks() -> dict[str, str]:
    """Block field -> the one stage type that takes it: every type's options block, then the
    other blocks a type owns (grpo's `environment`)."""
    owners = {kind.options: name for name, kind in STAGES.items()}
    return owners | {block: name for name, kind in STAGES.items() for block in kind.blocks}
