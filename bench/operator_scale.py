"""The operator at scale: N RLHFRuns created at once (default 200), all reaching their first job.

Each repeat starts a fresh Kubernetes API emulator (kmock over HTTP, tests/kube_emulator.py,
as the integration tests use) and a real `rlhf operator --all-namespaces` subprocess, waits
until the operator watches, then POSTs the N runs from 16 threads (the tests' two-stage sft
run, spread over 10 namespaces; tests/burst.py). It reports, as the median of the repeats:

- the time from the first POST until every run has its first PyTorchJob, until every run's
  status is written, and until the operator's last request (then 2 s of quiet);
- the operator's API requests per run, reads (GET, LIST) and writes, by call, counted in the
  emulator's request log (the watches, one per kind for the whole operator, left out);
- reconciles per run and their mean duration, from the operator's own /metrics.

`--before DIR` adds an arm that runs an earlier copy of the operator package (put it at
`DIR/rlhf_operator`), alternating with ours, for a before/after measured in the same run.

The emulator runs in this process, so on a small machine the times are the emulator's as much
as the operator's; the request counts are the operator's alone. Writes its section of
docs/BENCHMARKS.md (between the `bench:operator-scale` markers). Run with `make bench`, or
`python bench/operator_scale.py [--runs N] [--repeats R] [--before DIR]`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

from benchlib import ROOT, environment, median, ratio, shared_machine, table, write_section

sys.path.insert(0, str(ROOT / "tests"))

from burst import OPERATOR_ARGS, RESYNC_SECONDS, Burst, burst, wait_for_operator
from kube_emulator import Client, Emulator, operator_process

Result = tuple[Burst, dict[str, float]]  # the burst, and the reconciles' count and seconds


def scrape(log: Path) -> dict[str, float]:
    """The operator's reconcile count and total seconds, from its /metrics."""
    port = re.findall(r"Serving operator metrics on port (\d+)", log.read_text())[-1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for name in ("count", "sum"):
        match = re.search(rf"^rlhf_reconcile_duration_seconds_{name} (\S+)$", text, re.M)
        out[name] = float(match.group(1)) if match else 0.0
    return out


def one(runs: int, namespaces: int, package_dir: Path | None) -> Result:
    """One repeat: a fresh emulator and operator (from `package_dir` when given)."""
    env = {}
    if package_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(package_dir), os.environ.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-") as tmp:
        log = Path(tmp) / "operator.log"
        with Emulator() as emulator, operator_process(
            emulator.kubeconfig(Path(tmp) / "kubeconfig"), log, *OPERATOR_ARGS,
            resync_seconds=RESYNC_SECONDS, env=env,
        ):
            wait_for_operator(emulator)
            before = scrape(log)
            result = burst(emulator, Client(emulator.url), runs, namespaces, timeout=1200)
            after = scrape(log)
    reconciles = {k: after[k] - before[k] for k in after}
    print(f"  {'before' if package_dir else 'ours'}: {result.summary()}; "
          f"{reconciles['count'] / runs:.2f} reconciles per run", file=sys.stderr, flush=True)
    return result, reconciles


def rows(arms: dict[str, list[Result]], metrics: list[tuple[str, Callable[[Result], float]]],
         higher_is_better: bool = False) -> list[list[object]]:
    """One row per metric: each arm's median, ours against the before, every repeat."""
    out: list[list[object]] = []
    for label, metric in metrics:
        values = {arm: [metric(r) for r in results] for arm, results in arms.items()}
        row: list[object] = [label] + [median(v) for v in values.values()]
        if "before" in arms:
            row.append(ratio(median(values["ours"]), median(values["before"]), higher_is_better))
        row.append(" / ".join(", ".join(f"{x:.3g}" for x in v) for v in values.values()))
        out.append(row)
    return out


def report(arms: dict[str, list[Result]], runs: int, namespaces: int,
           load: tuple[float, float], before: Path | None) -> str:
    repeats = len(arms["ours"])
    names = list(arms)
    header = [*names, *(["before / ours"] if before else []), "each repeat, " + " / ".join(names)]
    times = rows(arms, [
        ("every run posted", lambda r: r[0].posted_s),
        ("**every run has its first PyTorchJob**", lambda r: r[0].first_jobs_s),
        ("every run has its status", lambda r: r[0].statuses_s),
        ("the operator's last request", lambda r: r[0].settled_s),
    ])
    calls = sorted(set().union(*(b.calls for results in arms.values() for b, _ in results)))
    requests = rows(arms, [
        *((f"`{c}`", lambda r, c=c: r[0].calls[c] / runs) for c in calls),
        ("**reads** (get, list)", lambda r: r[0].reads / runs),
        ("**writes**", lambda r: r[0].writes / runs),
        ("reconciles", lambda r: r[1]["count"] / runs),
        ("reconcile time, ms", lambda r: 1000 * r[1]["sum"] / runs),
    ])
    shared = " Shared with other work while this ran." if shared_machine(load[0]) else ""
    command = f"python bench/operator_scale.py --runs {runs} --repeats {repeats}"
    arm = (" `before` runs an earlier copy of the operator package (`--before DIR`, see "
           "below); its repeats alternate with ours." if before else "")
    return "\n".join([
        f"Machine: {environment()}.{shared} Load average {load[0]:.1f} before the run and "
        f"{load[1]:.1f} after it (the benchmark itself keeps about 2 CPUs busy).",
        "",
        f"{runs} RLHFRuns (the tests' two-stage sft run) POSTed at once from 16 threads into "
        f"{namespaces} namespaces, against `rlhf operator --all-namespaces` (resync timer "
        f"{RESYNC_SECONDS:.0f} s, so it does not tick during a repeat) and the tests' "
        f"Kubernetes API emulator (kmock over HTTP, in the benchmark's process); a fresh "
        f"emulator and operator per repeat, median of {repeats}.{arm} Command: "
        f"`{command}{' --before DIR' if before else ''}`.",
        "",
        table(["seconds from the first POST until", *header[:-1], header[-1]], times),
        "",
        table(["operator API requests per run", *header[:-1], header[-1]], requests),
        "",
        "Calls are RBAC's verbs and resources; the watches (one per kind for the whole "
        "operator) are left out. `patch rlhfruns` is kopf's bookkeeping on the run (its "
        "finalizer, then the last-handled configuration). Reconcile time is the operator's "
        "`rlhf_reconcile_duration_seconds` summed over the run's reconciles, API waits "
        "included.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", type=Path, help="DIR holding an earlier rlhf_operator/")
    parser.add_argument("--no-doc", action="store_true", help="print, do not write the doc")
    args = parser.parse_args()
    if args.before is not None and not (args.before / "rlhf_operator").is_dir():
        parser.error(f"{args.before}/rlhf_operator is not there")
    packages: dict[str, Path | None] = {"ours": None}
    if args.before is not None:
        packages["before"] = args.before.resolve()
    load_before = os.getloadavg()[0]
    arms: dict[str, list[Result]] = {name: [] for name in packages}
    for _ in range(args.repeats):
        for name, package_dir in packages.items():
            arms[name].append(one(args.runs, args.namespaces, package_dir))
    body = report(arms, args.runs, args.namespaces, (load_before, os.getloadavg()[0]),
                  args.before)
    print(body)
    if not args.no_doc:
        write_section("operator-scale", f"Operator: {args.runs} RLHFRuns at once", body)


if __name__ == "__main__":
    main()
