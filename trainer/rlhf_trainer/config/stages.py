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
    online: bool  # samples from the policy while it trains (rrhf: only with rrhf.online)
    needs_dataset: bool
    needs_reward: bool  # reward: {from|judge|function} (grpo: or an environment's episodes)
    lora: bool  # takes a `lora` block
    check: str  # its check in rlhf_trainer.preflight: every input, before torch loads
    run: str  # "module:function" of its trainer
    blocks: tuple[str, ...] = ()  # other blocks only this type takes


def _kind(
    options: str,
    *,
    policy: bool,
    online: bool,
    needs_reward: bool = False,
    lora: bool = True,
    blocks: tuple[str, ...] = (),
    trainer: str = "",
) -> StageKind:
    """A row: every stage type needs a dataset; its check and trainer are named after its
    trainer module (`trainer`, default its options field)."""
    module = trainer or options
    return StageKind(
        options=options,
        trains_policy=policy,
        online=online,
        needs_dataset=True,
        needs_reward=needs_reward,
        lora=lora,
        check=f"check_{module}",
        run=f"rlhf_trainer.{module}:run_{module}",
        blocks=blocks,
    )


# In the order of `StageType`; the CRD lists option blocks in this order.
STAGES: dict[str, StageKind] = {
    "sft": _kind("sft", policy=True, online=False),
    "reward": _kind("reward_model", policy=False, online=False, trainer="reward"),
    "dpo": _kind("dpo", policy=True, online=False),
    "rrhf": _kind("rrhf", policy=True, online=False),
    "ppo": _kind("ppo", policy=True, online=True, needs_reward=True),
    "grpo": _kind("grpo", policy=True, online=True, needs_reward=True, blocks=("environment",)),
    "feedback": _kind("feedback", policy=False, online=False, lora=False),
    "evaluate": _kind("evaluate", policy=False, online=False, lora=False),
}


def stage_types(where: Callable[[StageKind], bool]) -> frozenset[str]:
    """The stage types whose row satisfies `where`, e.g. `stage_types(lambda k: k.lora)`."""
    return frozenset(name for name, kind in STAGES.items() if where(kind))


def option_blocks() -> dict[str, str]:
    """Block field -> the one stage type that takes it: every type's options block, then the
    other blocks a type owns (grpo's `environment`)."""
    owners = {kind.options: name for name, kind in STAGES.items()}
    return owners | {block: name for name, kind in STAGES.items() for block in kind.blocks}
