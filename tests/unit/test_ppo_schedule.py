"""PPO's update schedule (online/ppo_schedule.py): during the critic's warm-up only the critic
updates; a folded critic update is not run again; otherwise both run, at once when concurrent."""

from __future__ import annotations

import threading

import pytest

from rlhf_trainer.online.ppo_schedule import UpdateSchedule

pytestmark = pytest.mark.unit


class Calls:
    def __init__(self) -> None:
        self.names: list[str] = []
        self.threads: set[int] = set()

    def update(self, name: str) -> dict[str, float]:
        self.names.append(name)
        self.threads.add(threading.get_ident())
        return {"value_loss" if name == "critic" else "policy_loss": float(len(self.names))}


def run(schedule: UpdateSchedule, step: int, folded: dict[str, float] | None = None) -> Calls:
    calls = Calls()
    critic, actor = schedule.update(
        step, lambda: calls.update("critic"), lambda: calls.update("actor"), folded
    )
    assert ("actor" in calls.names) == (actor is not None)
    if folded is not None:
        assert critic is folded
    return calls


@pytest.mark.parametrize("concurrent", [False, True])
def test_the_critic_warms_up_alone(concurrent: bool) -> None:
    schedule = UpdateSchedule(fold_values=False, concurrent=concurrent, warmup_steps=2)
    assert run(schedule, 0).names == ["critic"]
    assert run(schedule, 1).names == ["critic"]
    assert sorted(run(schedule, 2).names) == ["actor", "critic"]
    assert [schedule.actor_moves(s) for s in range(4)] == [False, False, True, True]


def test_a_folded_critic_update_is_not_run_again() -> None:
    schedule = UpdateSchedule(fold_values=True, concurrent=False, warmup_steps=1)
    folded = {"value_loss": 0.5, "grad_norm": 1.0}
    assert run(schedule, 0, folded).names == []  # warming up: the folded update was the step
    assert run(schedule, 1, folded).names == ["actor"]


def test_sequential_updates_run_critic_then_actor_on_this_thread() -> None:
    calls = run(UpdateSchedule(fold_values=False, concurrent=False, warmup_steps=0), 0)
    assert calls.names == ["critic", "actor"]
    assert calls.threads == {threading.get_ident()}


def test_concurrent_updates_run_one_of_them_on_another_thread() -> None:
    calls = run(UpdateSchedule(fold_values=False, concurrent=True, warmup_steps=0), 0)
    assert sorted(calls.names) == ["actor", "critic"]
    assert len(calls.threads) == 2
