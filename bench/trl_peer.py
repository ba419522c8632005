"""Run TRL's SFTTrainer or DPOTrainer as bench/ours.py runs ours; print each step's wall time.

    python bench/trl_peer.py {sft,dpo} --model DIR --workdir DIR --steps N --batch B --max-length L

Same model, data (tests/fixtures), batch, max length, steps, learning rate and schedule (cosine,
no warmup), AdamW betas, no weight decay, grad clip 1.0, float32 on CPU. What stays TRL's own
default is TRL's: its optimizer implementation (`adamw_torch_fused`), its collators, and
logging every step as ours does. SFT data is prompt/completion, so TRL's completion-only loss
applies, as ours does. A step's time runs from the end of the previous step (or the start of
the first) to the end of this one, read in a TrainerCallback. Prints one JSON line:
{"seconds": [per step], "tokens": [non-pad tokens per step]}.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from typing import Any

from transformers import TrainerCallback

from benchlib import FIXTURES

DATA = {("sft", "plain"): FIXTURES / "sft.jsonl", ("dpo", "plain"): FIXTURES / "preference.jsonl",
        ("sft", "chat"): FIXTURES / "brief" / "brief_sft.jsonl",
        ("dpo", "chat"): FIXTURES / "brief" / "brief_pairs.jsonl"}  # fmt: skip


def as_prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
    """A chat row's last (assistant) turn as the completion and the turns before it as the
    prompt: TRL's conversational prompt/completion form, whose completion-only loss matches ours
    (loss on the assistant's tokens only; SmolLM2's template has no generation markers, so TRL's
    `assistant_only_loss` on `messages` cannot be used)."""
    messages = row["messages"]
    return {"prompt": messages[:-1], "completion": messages[-1:]}


class StepClock(TrainerCallback):
    """Per-step wall time and the step's non-pad input tokens (`num_input_tokens_seen`)."""

    def __init__(self) -> None:
        self.last = 0.0
        self.seen = 0.0
        self.seconds: list[float] = []
        self.tokens: list[float] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.last = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        now = time.perf_counter()
        self.seconds.append(now - self.last)
        seen = float(state.num_input_tokens_seen or 0)
        self.tokens.append(seen - self.seen)
        self.last, self.seen = now, seen


def common_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "output_dir": args.workdir, "max_steps": args.steps,
        "per_device_train_batch_size": args.batch, "gradient_accumulation_steps": 1,
        "learning_rate": args.lr, "lr_scheduler_type": "cosine", "warmup_steps": 0,
        "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "max_grad_norm": 1.0,
        "max_length": args.max_length, "seed": args.seed, "use_cpu": True, "bf16": args.bf16,
        "report_to": [], "save_strategy": "no", "logging_steps": 1, "disable_tqdm": True,
        "dataloader_num_workers": 0, "include_num_input_tokens_seen": "non_padding",
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("stage", choices=["dpo", "sft"])
    parser.add_argument("--data", choices=["plain", "chat"], default="plain")
    parser.add_argument("--model", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (autocast)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.ERROR)
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    data = datasets.load_dataset("json", data_files=str(DATA[args.stage, args.data]), split="train")
    clock = StepClock()
    trainer: Any
    if args.stage == "sft":
        from trl import SFTConfig, SFTTrainer  # type: ignore[attr-defined]

        if args.data == "chat":
            data = data.map(as_prompt_completion, remove_columns=["messages"])
        else:
            data = data.rename_column("response", "completion")
        sft_config = SFTConfig(**common_args(args), completion_only_loss=True, packing=False)
        trainer = SFTTrainer(model=model, args=sft_config, train_dataset=data,
                             processing_class=tokenizer, callbacks=[clock])  # fmt: skip
    else:
        from trl import DPOConfig, DPOTrainer  # type: ignore[attr-defined]

        config = DPOConfig(**common_args(args), beta=args.beta, loss_type=["sigmoid"],
                           precompute_ref_log_probs=False)  # fmt: skip
        trainer = DPOTrainer(model=model, args=config, train_dataset=data,
                             processing_class=tokenizer, callbacks=[clock])  # fmt: skip
    trainer.train()
    print(json.dumps({"seconds": clock.seconds, "tokens": clock.tokens}))


if __name__ == "__main__":
    main()
