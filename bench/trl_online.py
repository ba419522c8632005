"""TRL's side of bench/online.py: GRPOTrainer and TRL 1.12.0's PPOTrainer on the same model,
prompts, batch and reward function as ours, one repeat per process:

    python bench/trl_online.py trl-grpo|trl-ppo --model DIR --workdir DIR --setup JSON

prints {"seconds": [...], "tokens": [...], "mixed_precision": ..., "dtypes": [...]}: each step's
wall time between TrainerCallback events, the completion tokens its reward function received,
the trainer's accelerate mixed-precision mode and the dtypes the policy's output layer computed
in (bf16 among them when TRL's autocast is in effect). Also `probe_trl_vllm`: TRL's
`use_vllm=True, vllm_mode="server"` tried once, reported in a line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchlib import median, run_json
from online_common import TASKS, Setup

BENCH = Path(__file__).resolve().parent
COLOCATE = "colocate"  # --vllm-url's value for vLLM inside TRL's process


def generated_clock() -> Any:
    from trl_peer import StepClock

    class GeneratedClock(StepClock):  # type: ignore[misc]
        """bench/trl_peer.py's step clock, counting the completion tokens the reward function
        saw during the step (`generated`) in place of input tokens."""

        generated = 0

        def __init__(self) -> None:
            super().__init__()
            self.dtypes: set[str] = set()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            super().on_train_begin(args, state, control, **kw)
            model = kw["model"]
            if not hasattr(model, "get_output_embeddings"):  # TRL's PPO: policy and critic
                model = model.policy
            head = model.get_output_embeddings()
            head.register_forward_hook(lambda _m, _i, out: self.dtypes.add(str(out.dtype)))

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            super().on_step_end(args, state, control, **kw)
            self.tokens[-1], self.generated = float(self.generated), 0

    return GeneratedClock()


def trl_common(setup: Setup, workdir: str) -> dict[str, Any]:
    return {
        "output_dir": workdir, "learning_rate": setup.lr, "lr_scheduler_type": "cosine",
        "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
        "gradient_accumulation_steps": 1, "temperature": 1.0, "seed": setup.seed,
        "use_cpu": True, "bf16": setup.bf16, "report_to": [], "save_strategy": "no",
        "logging_steps": 1, "disable_tqdm": True, "dataloader_num_workers": 0,
    }  # fmt: skip


def trl_grpo(model_dir: str, workdir: str, setup: Setup, vllm_url: str | None) -> Any:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer  # type: ignore[attr-defined]

    clock = generated_clock()

    def reward(prompts: list[Any], completions: list[Any],
               completion_ids: list[list[int]], **kw: Any) -> list[float]:  # fmt: skip
        clock.generated += sum(len(ids) for ids in completion_ids)  # EOS included
        return [setup.reward(p, c) for p, c in zip(prompts, completions, strict=True)]

    prompts, samples = setup.per_step("grpo")
    prompts_file = TASKS[setup.task].prompts
    server: dict[str, Any] = {"use_vllm": False}
    if vllm_url == COLOCATE:
        server = {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.15,
                  "vllm_enable_sleep_mode": False}  # fmt: skip
    elif vllm_url:
        server = {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": vllm_url,
                  "vllm_server_timeout": 60}  # fmt: skip
    config = GRPOConfig(**trl_common(setup, workdir), **server, max_steps=setup.steps,
                        per_device_train_batch_size=prompts * samples, num_generations=samples,
                        max_completion_length=setup.max_new_tokens, top_p=1.0, beta=0.0,
                        epsilon=0.2, loss_type="dapo", scale_rewards="group",
                        log_completions=False)  # fmt: skip
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        reward_funcs=reward, args=config, callbacks=[clock],
        train_dataset=datasets.load_dataset("json", data_files=str(prompts_file), split="train"),
        processing_class=AutoTokenizer.from_pretrained(model_dir, padding_side="left"),
    )  # fmt: skip
    trainer.train()
    return clock, trainer.accelerator.mixed_precision


def function_reward_model(tokenizer: Any, clock: Any, ppo_module: Any, setup: Setup) -> Any:
    """A module in the place of PPOTrainer's reward model: `ppo_module.get_reward` is wrapped
    so that, given this module, it decodes the prompts and the responses (cut after EOS and
    padded by TRL) and scores them with the reward function; other models go through as-is."""
    import torch

    reward = torch.nn.Module()
    original = ppo_module.get_reward

    def get_reward(model: Any, query_responses: Any, pad_token_id: int, context: int) -> Any:
        if model is not reward:
            return original(model, query_responses, pad_token_id, context)
        responses = query_responses[:, context:]
        clock.generated += int((responses != pad_token_id).sum())  # EOS included
        decode = tokenizer.batch_decode
        pairs = zip(decode(query_responses[:, :context], skip_special_tokens=True),
                    decode(responses, skip_special_tokens=True), strict=True)  # fmt: skip
        scores = torch.tensor([setup.reward(p, r) for p, r in pairs], dtype=torch.float32)
        return None, scores.to(query_responses.device), None

    ppo_module.get_reward = get_reward
    return reward


def trl_ppo(model_dir: str, workdir: str, setup: Setup) -> Any:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM as CausalLM
    from transformers import AutoModelForSequenceClassification as ValueHead
    from transformers import AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    clock = generated_clock()
    data = datasets.load_dataset("json", data_files=str(TASKS[setup.task].prompts), split="train")

    def tokenize(row: dict[str, Any]) -> dict[str, Any]:
        prompt = row["prompt"]
        if isinstance(prompt, list):  # chat rows, through the model's template as ours does
            prompt = tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                                   tokenize=False)  # fmt: skip
            return {"input_ids": tokenizer(prompt, add_special_tokens=False)["input_ids"]}
        return {"input_ids": tokenizer(prompt)["input_ids"]}

    data = data.map(tokenize, remove_columns=data.column_names)
    prompts = setup.per_step("ppo")[0]
    config = PPOConfig(**trl_common(setup, workdir), per_device_train_batch_size=prompts,
                       num_mini_batches=1, num_ppo_epochs=1, total_episodes=prompts * setup.steps,
                       local_rollout_forward_batch_size=prompts,
                       response_length=setup.max_new_tokens, stop_token="eos",
                       missing_eos_penalty=None, num_sample_generations=0, kl_coef=setup.ppo_kl,
                       kl_estimator="k1", cliprange=0.2, cliprange_value=0.2, gamma=1.0,
                       lam=0.95)  # fmt: skip

    def load(cls: Any, **kw: Any) -> Any:
        return cls.from_pretrained(model_dir, dtype=torch.float32, **kw)

    trainer = PPOTrainer(
        args=config, processing_class=tokenizer, model=load(CausalLM), ref_model=load(CausalLM),
        reward_model=function_reward_model(tokenizer, clock, ppo_trainer, setup),
        value_model=load(ValueHead, num_labels=1), train_dataset=data, eval_dataset=data,
        callbacks=[clock],
    )  # fmt: skip
    trainer.train()
    return clock, trainer.accelerator.mixed_precision


def worker(argv: list[str]) -> None:
    import logging
    import warnings

    parser = argparse.ArgumentParser(prog="trl_online.py trl-grpo|trl-ppo")
    parser.add_argument("arm", choices=["trl-grpo", "trl-ppo"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--setup", required=True, help="a Setup as JSON")
    parser.add_argument("--vllm-url", help="trl-grpo: generate on this `trl vllm-serve` server, "
                        f"or {COLOCATE!r}: on vLLM in this process")  # fmt: skip
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.ERROR)
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    setup = Setup(**json.loads(args.setup))
    if setup.bf16:  # as `accelerate launch --mixed_precision bf16` sets it: TRL 1.12.0's
        # PPOTrainer builds its own Accelerator, which ignores `bf16=True` and reads only this
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    if args.arm == "trl-grpo":
        clock, precision = trl_grpo(args.model, args.workdir, setup, args.vllm_url)
    else:
        clock, precision = trl_ppo(args.model, args.workdir, setup)
    print(json.dumps({"seconds": clock.seconds, "tokens": clock.tokens,
                      "mixed_precision": precision, "dtypes": sorted(clock.dtypes)}))  # fmt: skip


# --- TRL with vLLM: tried once --------------------------------------------------------------


def last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if re.match(r"^[\w.]+(Error|Exception)\b", ln)]
    return lines[-1] if lines else text.strip().splitlines()[-1]


def probe_trl_vllm(model: Path, root: Path, setup: Setup) -> str:
    """Start the server `trl vllm-serve` would (its `build_command`), then the same flags on
    vLLM's OpenAI entry point, and run one GRPOTrainer(use_vllm=True, vllm_mode="server") step
    on it; what happened, in a line."""
    from trl.scripts.vllm_serve import ScriptArguments, build_command

    from rollout import _port, started

    port = _port()
    url, env = f"http://127.0.0.1:{port}", {"VLLM_SERVER_DEV_MODE": "1"}
    script = ScriptArguments(model=str(model), host="127.0.0.1", port=port, dtype="float32",
                             enforce_eager=True, gpu_memory_utilization=0.15,
                             max_model_len=256, distributed_executor_backend="uni")  # fmt: skip
    command = build_command(script)
    try:
        with started(command, root / "trl-serve.log", url, env):
            said = "`trl vllm-serve` started"
    except RuntimeError as err:
        said = f"`trl vllm-serve` exited: {last_error(str(err))}"
    api = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
           *command[command.index("serve") + 1 :]]  # fmt: skip
    one = json.dumps(asdict(Setup(**{**asdict(setup), "steps": 1})))
    argv = [sys.executable, str(BENCH / "trl_online.py"), "trl-grpo", "--model", str(model),
            "--workdir", str(root / "trl-vllm"), "--setup", one, "--vllm-url", url]  # fmt: skip
    try:
        with started(api, root / "trl-vllm.log", url, env):
            run_json(argv)
    except RuntimeError as err:
        return f"{said}; with its flags on vLLM's OpenAI entry point, {last_error(str(err))}"
    return f"{said}; with its flags on vLLM's OpenAI entry point, a step ran"


def probe_trl_colocate(model: Path, root: Path, setup: Setup, steps: int = 3) -> str:
    """GRPOTrainer(use_vllm=True, vllm_mode="colocate"), vLLM inside TRL's process, for a few
    steps; what happened, in a line: its median step after the first and its tokens/s."""
    few = json.dumps(asdict(Setup(**{**asdict(setup), "steps": steps})))
    argv = [sys.executable, str(BENCH / "trl_online.py"), "trl-grpo", "--model", str(model),
            "--workdir", str(root / "trl-colocate"), "--setup", few,
            "--vllm-url", COLOCATE]  # fmt: skip
    try:
        result = run_json(argv)
    except RuntimeError as err:
        return f"it failed: {last_error(str(err))}"
    seconds, tokens = result["seconds"][1:] or result["seconds"], result["tokens"][1:]
    rate = f", {sum(tokens) / sum(seconds):.3g} tokens/s" if tokens else ""
    each = ", ".join(f"{s:.1f}" for s in result["seconds"])
    return f"it ran: steps of {each} s (median after the first {median(seconds):.1f} s{rate})"


if __name__ == "__main__":
    worker(sys.argv[1:])
