"""`dpo.sftWeight` (RPO, Pang et al. 2024): L = L_DPO + α · NLL(y_w) / |y_w| per pair.

The unit tests check the term against a naive reference, token by token, on the tiny model
through `DPOObjective` (packed pairs and padded rows). The integration test is the acceptance
test of issue 25: on an echo task whose SFT model still says a wrong answer for most prompts,
plain DPO (chosen = the echo, rejected = that wrong answer) lowers greedy accuracy while
sftWeight 1 raises it.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from rlhf_trainer.algos.losses import IGNORE_INDEX
from rlhf_trainer.algos.preference_losses import dpo_nll_term
from rlhf_trainer.config import WORKSPACE_ENV, StageConfig
from rlhf_trainer.data.batching import tokenize_pairs
from rlhf_trainer.data.inputs import StageInputs
from rlhf_trainer.data.readers import PreferenceRow
from rlhf_trainer.offline.dpo import DPOObjective
from rlhf_trainer.runtime.distributed import DistContext

# Tiers per test: the acceptance test at the end runs whole stages (integration).
unit = pytest.mark.unit

ROWS = [
    PreferenceRow("What does the cow say?\nAnswer:", " moo.", " woof."),
    PreferenceRow("Tell me the sound of the duck.\nAnswer:", " it goes quack.", " baa."),
    PreferenceRow("It was a sunny morning. What does the owl say?\nAnswer:", " hoot.", " moo."),
]


def naive_nll(model: Any, input_ids: list[int], labels: list[int]) -> float:
    """-log π(y_w | x) / |y_w| by a loop over the response tokens of one unpadded sequence."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([input_ids])).logits[0].double()
    total, count = 0.0, 0
    for pos in range(len(input_ids) - 1):
        target = labels[pos + 1]
        if target != IGNORE_INDEX:
            total -= float(logits[pos, target] - torch.logsumexp(logits[pos], 0))
            count += 1
    return total / count


@unit
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nll_term_is_minus_logp_per_token(dtype: torch.dtype) -> None:
    logps = torch.tensor([-3.0, -10.5, 0.0], dtype=dtype)
    lengths = torch.tensor([3.0, 7.0, 0.0])
    out = dpo_nll_term(logps, lengths)
    assert out.dtype == dtype and out.shape == (3,)
    assert out.tolist() == pytest.approx([1.0, 1.5, 0.0])


def objective(model: Any, tokenizer: Any, ctx: DistContext, sft_weight: float) -> DPOObjective:
    config = StageConfig.model_validate(
        {"run": "r", "stage": "dpo", "type": "dpo", "outputDir": "runs/dpo",
         "model": {"path": "/nowhere"}, "dataset": {"path": "p.jsonl", "format": "preference"},
         "dpo": {"beta": 0.1, "sftWeight": sft_weight}}
    )  # fmt: skip
    inputs = StageInputs(config, "/nowhere", list(ROWS), [], len(ROWS), 1)
    pairs = tokenize_pairs(ROWS, tokenizer, 64)
    return DPOObjective(model, model, pairs, [], inputs, ctx, int(tokenizer.pad_token_id))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@unit
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_sft_weight_adds_alpha_times_the_mean_chosen_nll(
    tiny: tuple[Any, Any],
    ctx: DistContext,
    monkeypatch: pytest.MonkeyPatch,
    alpha: float,
    packed: bool,
) -> None:
    model, tokenizer = tiny
    if not packed:  # padded rows: the path for attention without a 4D mask
        monkeypatch.setattr("rlhf_trainer.offline.dpo.supports_packing", lambda model: False)
    plain = objective(model, tokenizer, ctx, 0.0)
    rpo = objective(model, tokenizer, ctx, alpha)
    indices = list(range(len(ROWS)))
    with torch.no_grad():
        loss0, sums0 = plain._sums("train", indices, [1.0] * len(ROWS), len(ROWS))
        loss1, sums1 = rpo._sums("train", indices, [1.0] * len(ROWS), len(ROWS))
    nll = [naive_nll(model, p.chosen.input_ids, p.chosen.labels) for p in plain.splits["train"]]
    mean_nll = sum(nll) / len(nll)
    print(f"alpha {alpha} packed {packed}: L_DPO {float(loss0):.6f}, mean NLL {mean_nll:.6f}")
    assert float(loss1 - loss0) == pytest.approx(alpha * mean_nll, rel=1e-5)
    assert "sft_loss" not in sums0
    assert sums1["sft_loss"] / len(ROWS) == pytest.approx(mean_nll, rel=1e-5)
    assert len({round(x, 3) for x in nll}) == len(nll)  # the lengths differ: a real mean


@unit
def test_train_step_logs_sft_loss_only_when_weighted(
    tiny: tuple[Any, Any], ctx: DistContext
) -> None:
    model, tokenizer = tiny
    model.zero_grad()
    plain = objective(model, tokenizer, ctx, 0.0).train_step([0, 1, 2])
    rpo = objective(model, tokenizer, ctx, 1.0).train_step([0, 1, 2])
    model.zero_grad()
    assert "sft_loss" not in plain.metrics
    assert rpo.metrics["sft_loss"] > 0
    assert rpo.loss == pytest.approx(plain.loss + rpo.metrics["sft_loss"], rel=1e-5)


# -- acceptance: likelihood displacement on an echo task --------------------------------------

# 31 words the tiny tokenizer knows (animals and their sounds, 2-6 tokens each); WRONG is what
# the SFT data mostly answers for the words the SFT model gets wrong.
WRONG = "moo"


def all_words() -> list[str]:
    from rlhf_trainer.tasks import animal_sounds as tasks

    return [*tasks.SOUNDS, *tasks.SOUNDS.values()]


def echo_words() -> list[str]:
    return [w for w in all_words() if w != WRONG]


def echo_prompt(word: str) -> str:
    return f"Echo: {word}\nAnswer:"


def echo_data(seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """SFT rows, 8 passes over 32 words: 12 of them answered right 90% of the time, the others
    15%, and " moo." otherwise; DPO pairs: each word but "moo", chosen its echo, rejected
    " moo."."""
    rng = random.Random(seed)
    words = all_words()
    right = set(rng.sample(words, int(0.4 * len(words))))
    sft = []
    for _ in range(8):
        for w in words:
            p = 0.9 if w in right else 0.15
            answer = w if rng.random() < p else WRONG
            sft.append({"prompt": echo_prompt(w), "response": f" {answer}."})
    pairs = [{"prompt": echo_prompt(w), "chosen": f" {w}.", "rejected": f" {WRONG}."}
             for w in echo_words()]  # fmt: skip
    return sft, pairs


def greedy_accuracy(model_dir: Path) -> tuple[float, list[str]]:
    """Share of the echo prompts whose greedy answer (6 new tokens) is exactly " <word>."."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    words = echo_words()
    batch = tokenizer([echo_prompt(w) for w in words], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :],
                                     skip_special_tokens=True)  # fmt: skip
    right = [a.strip() == f"{w}." for w, a in zip(words, answers, strict=True)]
    return sum(right) / len(right), answers


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A workspace, no metrics port, and one torch thread (as torchrun gives each worker): on
    a busy 2-core machine two threads made the stages 5-10x slower."""
    monkeypatch.setenv(WORKSPACE_ENV, str(tmp_path))
    monkeypatch.setenv("RLHF_METRICS_PORT", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def run_stage(workspace: Path, name: str, stage: str, model: Path, **fields: Any) -> Path:
    """`python -m rlhf_trainer <stage> --config` in this process; returns its output dir."""
    from rlhf_trainer.__main__ import main

    hp = {"maxLength": 32, "seed": 0, "logEvery": 10, "saveEvery": 1000,
          **fields.pop("hyperparameters")}  # fmt: skip
    config = StageConfig.model_validate(
        {"run": "echo", "stage": name, "type": stage, "outputDir": f"runs/{name}",
         "model": {"path": str(model)}, "hyperparameters": hp, **fields}
    )  # fmt: skip
    path = workspace / f"{name}.yaml"
    path.write_text(config.to_yaml())
    assert main([stage, "--config", str(path)]) == 0
    return workspace / "runs" / name


@pytest.mark.integration
def test_sft_weight_keeps_dpo_from_displacing_the_right_answer(
    one_thread: Path, tiny_model_dir: Path
) -> None:
    """Measured (seed 0, one thread, deterministic): greedy accuracy on the 31 echo prompts
    SFT 0.32 (" moo." for 19), plain DPO 0.16 (answers degenerate: " wolf.", "row.",
    byte garbage), DPO + sftWeight 1 0.55. Other data seeds (1-3): SFT 0.32-0.35, plain DPO
    0.13-0.35, sftWeight 1 0.48-0.71. About 15 s on 2 cores."""
    workspace = one_thread
    sft_rows, pairs = echo_data()
    for name, rows in (("sft.jsonl", sft_rows), ("pairs.jsonl", pairs)):
        (workspace / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    start = time.perf_counter()
    sft = run_stage(
        workspace,
        "sft",
        "sft",
        tiny_model_dir,
        dataset={"path": "sft.jsonl"},
        hyperparameters={"maxSteps": 150, "learningRate": 3e-3, "batchSize": 16},
    )
    accuracy = {"sft": greedy_accuracy(sft / "final")}
    data = {"path": "pairs.jsonl", "format": "preference"}
    for name, alpha in (("dpo", 0.0), ("rpo", 1.0)):
        out = run_stage(workspace, name, "dpo", sft / "final", dataset=data,
                        hyperparameters={"maxSteps": 100, "learningRate": 2e-4, "batchSize": 8},
                        dpo={"beta": 0.1, "sftWeight": alpha})  # fmt: skip
        accuracy[name] = greedy_accuracy(out / "final")
        last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        assert ("sft_loss" in last) == (alpha > 0) and math.isfinite(last["loss"])
    for name, (acc, answers) in accuracy.items():
        print(f"{name}: greedy accuracy {acc:.2f}, answers {answers[:6]}")
    print(f"sft + 2 dpo stages: {time.perf_counter() - start:.0f}s")
    sft_acc, dpo_acc, rpo_acc = (accuracy[k][0] for k in ("sft", "dpo", "rpo"))
    assert 0.2 <= sft_acc <= 0.45  # the wrong answer dominates after SFT
    assert rpo_acc >= sft_acc + 0.15  # sftWeight 1 lifts the right answer
    assert dpo_acc <= sft_acc  # plain DPO does not (it displaced it here)
    assert rpo_acc >= dpo_acc + 0.25
