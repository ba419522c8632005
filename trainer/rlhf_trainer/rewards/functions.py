"""Python reward functions for online stages (`reward: {function: NAME}`): verifiable rewards.

NAME is either a function registered in `tasks.REWARD_FUNCTIONS` (e.g. `animal_sounds`), or
`module:callable`. A module is imported only when it is on the trainer's allow-list, the
comma-separated module prefixes in `$RLHF_REWARD_FUNCTION_MODULES` (empty by default). The
allow-list belongs to whoever builds the trainer image or starts the trainer, not to the
RLHFRun spec, so a spec alone cannot make a trainer import arbitrary code.

A reward function takes (prompt, response) strings and returns a float. With chat data the
prompt is as the policy's template rendered it and the response is decoded without its
end-of-turn token; a function that has a `messages` parameter (or **kwargs) also gets the chat
prompt's messages, a list of {role, content} (None for a plain prompt). Torch-free.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rlhf_trainer.errors import UserError
from rlhf_trainer.tasks import animal_sounds as tasks

RewardFunction = Callable[[str, str], float]
ALLOW_ENV = "RLHF_REWARD_FUNCTION_MODULES"


def allowed_modules(env: Mapping[str, str] | None = None) -> list[str]:
    raw = (os.environ if env is None else env).get(ALLOW_ENV, "")
    return [item.strip() for item in raw.split(",") if item.strip()]


def _allowed(module: str, prefixes: list[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def resolve_reward_function(name: str, env: Mapping[str, str] | None = None) -> RewardFunction:
    """The function `name` refers to; UserError naming the field and the fix otherwise."""
    registered = tasks.REWARD_FUNCTIONS.get(name)
    if registered is not None:
        return registered
    if ":" not in name:
        raise UserError(
            f"reward.function: unknown reward function {name!r}; use a registered one "
            f"({', '.join(sorted(tasks.REWARD_FUNCTIONS))}) or `module:callable`"
        )
    module_name, _, attr = name.partition(":")
    prefixes = allowed_modules(env)
    if not _allowed(module_name, prefixes):
        raise UserError(
            f"reward.function: module {module_name!r} is not on the trainer's allow-list "
            f"(${ALLOW_ENV}={','.join(prefixes) or '<empty>'}); add its package to "
            f"{ALLOW_ENV} in the trainer's environment, or use a registered function"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"reward.function: cannot import {module_name!r}: {err}") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise UserError(f"reward.function: {module_name!r} has no callable {attr!r}")
    return function  # type: ignore[no-any-return]


def accepts_messages(function: RewardFunction) -> bool:
    """Whether `function` takes a `messages` keyword (by name or through **kwargs)."""
    try:
        params = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return any(p.name == "messages" or p.kind is p.VAR_KEYWORD for p in params)


class ScoredFunction:
    """A resolved reward function, called the same way by every stage (online sampling, offline
    RRHF scoring, evaluation): a function with a `messages` parameter also gets a chat prompt's
    messages (None for a plain prompt)."""

    def __init__(self, name: str, env: Mapping[str, str] | None = None) -> None:
        self.function = resolve_reward_function(name, env)
        self.wants_messages = accepts_messages(self.function)

    def __call__(
        self, prompt: str, response: str, messages: Sequence[Mapping[str, Any]] | None = None
    ) -> float:
        if self.wants_messages:
            extra = None if messages is None else list(messages)
            return float(self.function(prompt, response, messages=extra))  # type: ignore[call-arg]
        return float(self.function(prompt, response))
