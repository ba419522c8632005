"""Command line: `python -m rlhf_trainer <stage-type> --config FILE` and `tiny-model DIR`.

Run under torchrun (`torchrun --nproc-per-node N -m rlhf_trainer sft --config FILE`) or as a plain
process (one rank). A problem the user can fix prints one `error: ...` line (rank 0's) and exits
with status 2 before anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rlhf_trainer.config import (
    STAGE_TYPES,
    STAGES,
    ConfigError,
    StageConfig,
    load_stage_config,
    samples_online,
)
from rlhf_trainer.errors import UserError
from rlhf_trainer.models.tiny import PRESETS
from rlhf_trainer.runtime.launch_env import env_rank, env_world_size

# Stage type -> (its check in rlhf_trainer.preflight, "module:function" of its trainer).
TRAINERS: dict[str, tuple[str, str]] = {name: (k.check, k.run) for name, k in STAGES.items()}
EXIT_USER_ERROR = 2
# How long another rank that found a user error waits before reporting it itself. Every rank
# checks the same inputs, and the first rank to exit ends a torchrun job (the others are
# stopped), so a rank that exited at once could cut rank 0 off before its line was written.
REPORT_GRACE_ENV = "RLHF_ERROR_GRACE_SECONDS"
REPORT_GRACE_SECONDS = 10.0

log = logging.getLogger("rlhf_trainer")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rlhf_trainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGE_TYPES:
        p = sub.add_parser(stage, help=f"run a {stage} stage from its rendered config")
        p.add_argument("--config", required=True, help="stage config YAML (a StageConfig)")
        p.add_argument(
            "--validate-only",
            action="store_true",
            help="check the config, model path and every dataset row, then exit",
        )
        p.add_argument(
            "--world-size",
            type=int,
            default=None,
            help="ranks to check the batch split for with --validate-only (default: $WORLD_SIZE)",
        )
    from rlhf_trainer.evaluate.cli import add_eval_parser

    add_eval_parser(sub)
    plan = sub.add_parser(
        "check-stages",
        help="check the files of a run's stages before the first starts (`rlhf run` does)",
    )
    plan.add_argument("configs", nargs="+", metavar="CONFIG", help="rendered stage configs")
    plan.add_argument("--world-size", type=int, required=True, help="ranks of each stage")
    plan.add_argument(
        "--stand-in",
        required=True,
        metavar="MODEL",
        help="model folder that stands in for one an earlier stage has not written yet",
    )
    env = sub.add_parser(
        "env-serve", help="serve a built-in environment over HTTP (docs/ENVIRONMENTS.md)"
    )
    env.add_argument("name", metavar="NAME", help="the environment: calculator or guess")
    env.add_argument("--port", type=int, required=True, help="port to listen on (0: any free)")
    env.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    tiny = sub.add_parser("tiny-model", help="write the tiny test model and tokenizer to DIR")
    tiny.add_argument("dir", metavar="DIR")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="tiny",
        help="model size, or the judge's base (default: tiny)",
    )
    return parser


def _setup_logging() -> None:
    # Rank 0 speaks for the job; other ranks report only warnings and errors.
    level = logging.INFO if env_rank() == 0 else logging.WARNING
    fmt = "%(asctime)s %(levelname)s %(message)s"
    if env_world_size() > 1:
        fmt = f"%(asctime)s [rank {env_rank()}] %(levelname)s %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    logging.getLogger("rlhf_trainer").setLevel(level)


def _load_config(command: str, path: str) -> StageConfig:
    try:
        config = load_stage_config(path)
    except ConfigError as err:
        problems = str(err).splitlines()
        raise UserError(
            "; ".join(problems)
            + "; fix the stage config (the operator renders it from the RLHFRun)"
        ) from None
    if config.type != command:
        raise UserError(
            f"{path}: type: the config is for a {config.type} stage, not {command}; "
            f"run `python -m rlhf_trainer {config.type} --config {path}`"
        )
    return config


def _run_stage(command: str, config_path: str, validate_only: bool, world_size: int) -> None:
    if command not in TRAINERS:
        raise UserError(f"stage type {command} has no trainer yet")
    config = _load_config(command, config_path)
    from rlhf_trainer import preflight

    check_name, trainer = TRAINERS[command]
    inputs = getattr(preflight, check_name)(config, world_size)
    if validate_only:
        log.info("Validated %s: %s", config_path, preflight.describe(inputs))
        return
    from rlhf_trainer.runtime.stage_inputs import guard_outputs

    guard_outputs(config, env_rank())  # a finished or checkpointed stage refuses new inputs
    if env_rank() == 0:
        from rlhf_trainer.runtime.metrics import start_server

        start_server()  # /metrics on $RLHF_METRICS_PORT (docs/METRICS.md)
    # torch is imported only now, after validation, so bad input fails fast.
    import importlib

    from torch.distributed.elastic.multiprocessing.errors import record

    kind = STAGES[command]
    if kind.online_run is not None and samples_online(config):
        trainer = kind.online_run  # rrhf.online: samples from the policy like grpo
    module, function = trainer.split(":")
    run = getattr(importlib.import_module(module), function)
    record(run)(inputs)  # under torchrun, a crash's traceback reaches its failure summary


def _check_stages(configs: list[str], world_size: int, stand_in: str) -> int:
    """One `error: stage NAME: ...` line per stage whose files fail its check; exit 2 if any."""
    from rlhf_trainer.plan_check import check_stages

    problems = check_stages(configs, world_size, stand_in)
    for problem in problems:
        print(f"error: stage {problem.stage}: {problem.message}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR if problems else 0


TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LOG_ENV = "RLHF_TERMINATION_LOG"  # tests point it elsewhere


def _report(err: UserError) -> None:
    """Print the one `error:` line: rank 0 at once; another rank only if it is still running
    after the grace period, that is when rank 0 did not fail the same way."""
    if env_rank() != 0:
        time.sleep(float(os.environ.get(REPORT_GRACE_ENV, REPORT_GRACE_SECONDS)))
    print(f"error: {err}", file=sys.stderr, flush=True)
    _termination_message(f"error: {err}")


def _termination_message(line: str) -> None:
    """In a Kubernetes container, the line also goes to the termination-message file (the
    kubelet's default `terminationMessagePath`), where the operator reads why the stage failed;
    torchrun's own failure report, printed after it, would bury it in the logs."""
    path = Path(os.environ.get(TERMINATION_LOG_ENV, TERMINATION_LOG))
    if not path.exists():  # not in a container: the kubelet creates the file
        return
    with contextlib.suppress(OSError):
        path.write_text(line[:4000] + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging()
    try:
        if args.command == "tiny-model":
            from rlhf_trainer.models.tiny import build_tiny_model

            build_tiny_model(args.dir, seed=args.seed, preset=args.preset)
        elif args.command == "check-stages":
            return _check_stages(args.configs, args.world_size, args.stand_in)
        elif args.command == "env-serve":
            from rlhf_trainer.environments.server import serve

            serve(args.name, args.host, args.port)
        elif args.command == "eval":
            from rlhf_trainer.evaluate.cli import run_eval_command

            run_eval_command(args)
        else:
            world_size = env_world_size()
            if args.validate_only and args.world_size is not None:
                world_size = args.world_size
            _run_stage(args.command, args.config, args.validate_only, world_size)
    except UserError as err:
        _report(err)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    code = main()
    if "RANK" in os.environ:
        # Under torchrun, everything is written and the process group closed by now. Skip the
        # interpreter's teardown: native threads (gloo's) have aborted finished ranks in static
        # destructors (SIGABRT, "terminate called without an active exception"), turning a
        # successful stage into a failed one.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
