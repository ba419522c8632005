"""Small builders shared by the tests (operator specs and jobs; a stand-in OnlineSetup)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

from rlhf_operator import api

if TYPE_CHECKING:
    from rlhf_trainer.online.setup import OnlineSetup
    from rlhf_trainer.runtime.distributed import DistContext

BASE: dict[str, Any] = {
    "apiVersion": "rlhf.dev/v1alpha1",
    "kind": "RLHFRun",
    "metadata": {"name": "demo", "namespace": "team-a", "uid": "uid-1", "generation": 1},
    "spec": {
        "model": {"path": "models/tiny-llama"},
        "stages": [
            {"name": "sft", "type": "sft", "dataset": {"path": "data/sft.jsonl"}},
            {"name": "sft2", "type": "sft", "from": "sft", "dataset": {"path": "data/sft.jsonl"}},
        ],
    },
}


def manifest(**spec_updates: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    doc["spec"].update(copy.deepcopy(spec_updates))
    return doc


def make_run(doc: dict[str, Any] | None = None, **spec_updates: Any) -> api.RLHFRun:
    return api.parse_run(doc if doc is not None else manifest(**spec_updates), "test")


def job_with(job: dict[str, Any], *conditions: str, message: str = "") -> dict[str, Any]:
    """The job as the training operator would report it, newest condition last."""
    out = copy.deepcopy(job)
    out["status"] = {
        "conditions": [
            {"type": c, "status": "True", "message": message if i == len(conditions) - 1 else ""}
            for i, c in enumerate(conditions)
        ]
    }
    return out


def merge(base: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the API server applies it."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


def save_small_llama(out: Path) -> Path:
    """A 2-layer Llama (vocabulary 64, hidden 32) with seeded random weights, saved to `out`."""
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2)  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def load_generate() -> ModuleType:
    """manifests/generate.py (a script, not a package module): renders the Helm chart."""
    path = Path(__file__).resolve().parents[1] / "manifests" / "generate.py"
    spec = importlib.util.spec_from_file_location("generate", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def minibatch_setup(ctx: DistContext, micro: int, **hyperparameters: Any) -> OnlineSetup:
    """What `online_steps.MinibatchTrainer` reads of an OnlineSetup: the context, the
    hyperparameters (spec names: batchSize, gradClip, ...) and the micro-batch size."""
    from rlhf_trainer.config import Hyperparameters

    hp = Hyperparameters.model_validate(hyperparameters)
    inputs = SimpleNamespace(config=SimpleNamespace(hyperparameters=hp), micro_batch=micro)
    return cast("OnlineSetup", SimpleNamespace(ctx=ctx, inputs=inputs))
