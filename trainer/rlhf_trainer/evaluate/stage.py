"""Evaluation of policies and reward models: the `evaluate` stage and `rlhf eval`.

For each policy, on held-out prompts, with greedy decoding (`maxNewTokens`):
- `reward_model_score`: mean score of its responses by the reward model;
- `reward_function_score`: mean of a registered reward function (verifiable rewards);
- `perplexity`: exp of the token-mean NLL of a reference set's responses (the two columns of
  the RRHF paper's table, with the reward);
- `kl`: KL to a reference policy along the policy's own greedy responses: the sum over response
  tokens of the full-vocabulary KL(pi(.|x, y<t) || pi_ref(.|x, y<t)), averaged over prompts;
- `response_tokens`: mean response length.
For a reward model, on held-out pairs: `pairwise_accuracy` (ties count half).

Models are plain (not sharded): each rank takes every world_size-th prompt and the sums are
all-reduced, so the stage runs under torchrun like the others and `rlhf eval` as one process.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import torch
from torch import nn

from rlhf_trainer.algos.losses import count_targets, pairwise_accuracy, sft_loss_sum
from rlhf_trainer.config import ModelSource
from rlhf_trainer.data.batching import collate, n_targets, stop_ids, tokenize_sft
from rlhf_trainer.data.inputs import FINAL_DIR, EvalInputs
from rlhf_trainer.data.readers import PromptRow, SFTRow
from rlhf_trainer.models.causal_lm import _replace_dir, load_causal_lm, load_tokenizer
from rlhf_trainer.models.reward_model import RewardScorer, load_reward_model
from rlhf_trainer.rewards.functions import ScoredFunction
from rlhf_trainer.rollout.client import Sampling
from rlhf_trainer.rollout.engine import TrainerEngine, live_state
from rlhf_trainer.runtime.distributed import (
    DistContext,
    all_reduce_sum,
    close_distributed,
    init_distributed,
)
from rlhf_trainer.runtime.progress import ProgressReporter, write_json_atomic

log = logging.getLogger(__name__)
REPORT_FILE = "eval.json"


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sequence, sum over response positions of KL(softmax(logits) || softmax(ref_logits)).

    logits, ref_logits: (B, T, V); labels: (B, T) with -100 off the response (the position t
    predicting labels[t + 1] counts, as in `losses.sft_loss_sum`). Returns (B,) float32.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    logq = torch.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    per_token = (logp.exp() * (logp - logq)).sum(-1)
    return (per_token * (labels[:, 1:] != -100)).sum(-1)


def _mine(items: list[Any], ctx: DistContext) -> list[Any]:
    return items[ctx.rank :: ctx.world_size]


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    chat: bool = False,
) -> list[str]:
    """Greedy completions, cut at EOS or the chat template's end-of-turn token, decoded without
    special tokens. `chat`: the prompts were rendered by the template (no special tokens added).

    Decoded by `engine: trainer`'s decoder over the model's own tensors (the fused Llama
    decoder where it is exact, else the model's forward with a KV cache): the same tokens as
    HF `generate`, in about 0.7 of its time on SmolLM2 (docs/BENCHMARKS.md, "Real model")."""
    weight = next(model.parameters())
    engine = TrainerEngine(model.config, stop_ids(tokenizer), weight.device, weight.dtype,
                           prompts_per_batch=batch_size)  # fmt: skip
    state = live_state(model)
    assert state is not None, "evaluation loads plain models, never sharded ones"
    engine.load(state)
    ids = [list(tokenizer(p, add_special_tokens=not chat)["input_ids"]) for p in prompts]
    groups = engine.generate(ids, Sampling(n=1, max_tokens=max_new_tokens, temperature=0.0))
    return [str(tokenizer.decode(list(g[0].response_ids), skip_special_tokens=True))
            for g in groups]  # fmt: skip


def response_tokens(rows: list[SFTRow], tokenizer: Any, max_length: int) -> float:
    """The response tokens `nll_and_kl` would score for `rows` (with the EOS it appends),
    counted without a forward pass."""
    return float(sum(n_targets(ex) for ex in tokenize_sft(rows, tokenizer, max_length)))


@torch.no_grad()
def nll_and_kl(
    model: nn.Module, ref: nn.Module | None, rows: list[SFTRow], tokenizer: Any, inputs: EvalInputs
) -> dict[str, float]:
    """Sums over `rows`: response NLL, response tokens, and KL to `ref` when given."""
    sums = {"nll": 0.0, "tokens": 0.0, "kl": 0.0}
    for start in range(0, len(rows), inputs.batch_size):
        examples = tokenize_sft(
            rows[start : start + inputs.batch_size], tokenizer, inputs.max_length
        )
        t = collate(examples, int(tokenizer.pad_token_id))
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
        sums["nll"] += float(sft_loss_sum(logits, t["labels"]))
        sums["tokens"] += count_targets(t["labels"])
        if ref is not None:
            ref_logits = ref(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
            sums["kl"] += float(token_kl(logits, ref_logits, t["labels"]).sum())
    return sums


def _reduce(sums: dict[str, float], ctx: DistContext) -> dict[str, float]:
    keys = sorted(sums)
    return dict(zip(keys, all_reduce_sum([sums[k] for k in keys], ctx.device), strict=True))


def _policy_report(
    name: str,
    inputs: EvalInputs,
    ctx: DistContext,
    ref: nn.Module | None,
    scorer: RewardScorer | None,
) -> tuple[dict[str, float], list[str]]:
    """The policy's metrics, and its greedy answers to this rank's first SAMPLES prompts."""
    source = ModelSource(path=inputs.policies[name])
    tokenizer = load_tokenizer(source, inputs.policies[name])
    model, _ = load_causal_lm(source, inputs.policies[name])
    model.eval()
    mine = _mine(inputs.prompts, ctx)
    prompts, chat = [r.prompt for r in mine], any(r.chat for r in mine)
    responses = generate(model, tokenizer, prompts, inputs.max_new_tokens, inputs.batch_size, chat)
    rows = [SFTRow(p, r, chat=chat) for p, r in zip(prompts, responses, strict=True)]
    sums = {"n": float(len(rows)), "kl": 0.0}
    if ref is not None:  # the KL needs both models' logits along the responses
        own = nll_and_kl(model, ref, rows, tokenizer, inputs)
        sums |= {"kl": own["kl"], "response_tokens": own["tokens"]}
    else:
        sums["response_tokens"] = response_tokens(rows, tokenizer, inputs.max_length)
    if scorer is not None:
        sums["rm"] = sum(scorer.score(prompts, responses, inputs.batch_size, chat))
    if inputs.reward_function is not None:
        function = ScoredFunction(inputs.reward_function)
        sums["fn"] = sum(
            function(row.prompt, r, row.messages) for row, r in zip(mine, responses, strict=True)
        )
    reference = nll_and_kl(model, None, _mine(inputs.reference_rows, ctx), tokenizer, inputs)
    sums |= {"ref_nll": reference["nll"], "ref_tokens": reference["tokens"]}
    total = _reduce(sums, ctx)
    n = max(total["n"], 1.0)
    report = {"kl": total["kl"] / n, "response_tokens": total["response_tokens"] / n}
    if ref is None:
        del report["kl"]
    if "rm" in total:
        report["reward_model_score"] = total["rm"] / n
    if "fn" in total:
        report["reward_function_score"] = total["fn"] / n
    if inputs.reference_rows:
        mean_nll = total["ref_nll"] / max(total["ref_tokens"], 1.0)
        report["perplexity"] = float(torch.tensor(mean_nll).exp())
    return report, responses[:SAMPLES]


def _pairs_report(inputs: EvalInputs, scorer: RewardScorer, ctx: DistContext) -> dict[str, float]:
    pairs = _mine(inputs.pairs, ctx)
    prompts, chat = [p.prompt for p in pairs], any(p.chat for p in pairs)
    chosen = scorer.score(prompts, [p.chosen for p in pairs], inputs.batch_size, chat)
    rejected = scorer.score(prompts, [p.rejected for p in pairs], inputs.batch_size, chat)
    correct = float(pairwise_accuracy(torch.tensor(chosen), torch.tensor(rejected)).sum())
    total = _reduce({"correct": correct, "n": float(len(pairs))}, ctx)
    return {"pairwise_accuracy": total["correct"] / max(total["n"], 1.0), "pairs": total["n"]}


def evaluate_policies(inputs: EvalInputs) -> dict[str, Any] | None:
    """The report on rank 0 (None on the others). Collective: every rank calls it."""
    ctx = init_distributed(False)
    try:
        scorer = (
            load_reward_model(inputs.reward_model, max_length=inputs.max_length)
            if (inputs.reward_model)
            else None
        )
        ref = None
        if inputs.reference_model is not None:
            ref, _ = load_causal_lm(
                ModelSource(path=inputs.reference_model), inputs.reference_model
            )
            ref.eval()
        report: dict[str, Any] = {"prompts": len(inputs.prompts), "policies": {}}
        if inputs.reward_function:
            report["reward_function"] = inputs.reward_function
        answers: dict[str, list[str]] = {}
        for name in inputs.policies:
            report["policies"][name], answers[name] = _policy_report(name, inputs, ctx, ref, scorer)
            log.info("Evaluated policy %s: %s", name, report["policies"][name])
        if answers:  # rank 0's first prompts, as each policy answers them
            asked = inputs.prompts[: len(next(iter(answers.values())))]
            report["samples"] = [
                {"prompt": _shown(r), **{n: a[i] for n, a in answers.items()}}
                for i, r in enumerate(asked)
            ]
        if inputs.pairs and scorer is not None:
            report["reward_model"] = _pairs_report(inputs, scorer, ctx)
        return report if ctx.is_main else None
    finally:
        close_distributed()


SAMPLES = 2  # greedy answers per policy shown in the report


def _shown(row: PromptRow) -> str:
    """A prompt as a person reads it: a chat row's last message, else the prompt text."""
    return row.messages[-1]["content"] if row.messages else row.prompt


COLUMNS = (
    ("reward_model_score", "RM score"),
    ("reward_function_score", "fn reward"),
    ("perplexity", "perplexity"),
    ("kl", "KL to ref"),
    ("response_tokens", "tokens"),
)


def comparison_table(report: dict[str, Any]) -> str:
    """The policies side by side, one row each; then the reward model's accuracy."""
    policies: dict[str, dict[str, float]] = report.get("policies", {})
    shown = [(k, title) for k, title in COLUMNS if any(k in p for p in policies.values())]
    width = max([len("policy"), *(len(n) for n in policies)])
    lines = ["  ".join([f"{'policy':<{width}}", *(f"{t:>10}" for _, t in shown)])]
    for name, metrics in policies.items():
        cells = [f"{metrics[k]:>10.4f}" if k in metrics else f"{'-':>10}" for k, _ in shown]
        lines.append("  ".join([f"{name:<{width}}", *cells]))
    for sample in report.get("samples", []):
        lines.append(f"\nprompt: {sample['prompt']}")
        lines += [f"  {n}: {a}" for n, a in sample.items() if n != "prompt"]
    if "reward_model" in report:
        rm = report["reward_model"]
        lines.append(
            f"reward model: pairwise accuracy {rm['pairwise_accuracy']:.1%} "
            f"on {int(rm['pairs'])} pairs"
        )
    return "\n".join(lines)


def run_evaluate(inputs: EvalInputs) -> None:
    """The evaluate stage: the report to `final/eval.json` (and stdout), the last policy's score
    and KL to progress.json, which the executors copy into status.stages[].metrics."""
    out = inputs.output_dir
    assert out is not None
    if (out / FINAL_DIR).is_dir():
        log.info("Found %s; the stage is complete, so nothing ran", out / FINAL_DIR)
        return
    report = evaluate_policies(inputs)
    if report is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-{FINAL_DIR}"
    tmp.mkdir(exist_ok=True)
    write_json_atomic(tmp / REPORT_FILE, report)
    (tmp / "eval.txt").write_text(comparison_table(report) + "\n")
    _replace_dir(tmp, out / FINAL_DIR)
    last = list(report["policies"].values())[-1] if report["policies"] else {}
    metrics = {f"{name}/{k}": v for name, p in report["policies"].items() for k, v in p.items()}
    score = last.get("reward_model_score", last.get("reward_function_score"))
    if score is not None:
        metrics["reward_mean"] = score
    if "kl" in last:
        metrics["kl"] = last["kl"]
    ProgressReporter(out, 1, True).log(1, 1.0, metrics)
    print(comparison_table(report), file=sys.stderr, flush=True)
    print(json.dumps(report), flush=True)
