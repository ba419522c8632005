"""The names upstream derives from a run's, and the limits it puts on them.

Every child's name begins with the run's: `<run>-<stage>` for a stage's trainer job,
`<run>-<stage>-config`, `<run>-<stage>-{rollout,judge}-<i>` for the servers (builders.child_name,
which shortens its own names with a hash past 63 characters). Upstream derives more names from
the trainer job's, and those it does not shorten:

- PyTorchJob (Kubeflow training operator v1, kubeflow/trainer v1.9.4): its webhook wants the
  job name to be a DNS-1035 label (NameIsDNS1035Label), and the operator gives every replica a
  headless Service `<job>-<replicaType lowercased>-<index>` (GenGeneralName), which must be a
  DNS-1035 label too: `<job>-master-0` and `<job>-worker-<nodes - 2>`.
- TrainJob (Kubeflow Trainer v2.3.0): a CEL rule wants a DNS-1035 label. Its JobSet carries its
  name, and JobSet's webhook (kubernetes-sigs/jobset v0.12.0) wants every pod name
  `<jobset>-<replicatedJob>-<jobIndex>-<podIndex>-<5 random>` to be one; the torch-distributed
  runtime runs one replicated job `node` of `nodes` pods: `<job>-node-0-<nodes - 1>-xxxxx`.
- Services (the rollout and judge servers'): DNS-1035 labels.

So a run name must start with a letter, and `<run>-<stage>` plus the longest suffix above must
fit in 63 characters. `rlhf validate` and the validating webhook check it here (through
api.parse_run); the CRD says the same in CEL on `self.metadata.name` (crd.py).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlhf_operator import api

MAX_LABEL = 63  # a DNS-1035 label (IsDNS1035Label)
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
PYTORCHJOB_MASTER = "-master-0"
PYTORCHJOB_WORKER = "-worker-"  # + the worker's index
TRAINJOB_REPLICATED_JOB = "node"  # backends.TRAINJOB_NODE, the torch-distributed runtime's
JOBSET_POD_INFIX = f"-{TRAINJOB_REPLICATED_JOB}-0-"  # + the pod's index
JOBSET_POD_RANDOM = "-xxxxx"  # the 5 random characters of a pod's generated name

PYTORCHJOB_SERVICE = (
    "PyTorchJob replica Service (the Kubeflow training operator names one per replica "
    "<job>-<replicaType>-<index>)"
)
JOBSET_POD = (
    "TrainJob pod (its JobSet names pods <job>-<replicatedJob>-<jobIndex>-<podIndex>-<5 random>)"
)


def job_suffix(backend: str, nodes: int) -> tuple[str, str]:
    """The longest suffix upstream appends to a trainer job's name, and what that names."""
    if backend == "trainjob":
        return f"{JOBSET_POD_INFIX}{nodes - 1}{JOBSET_POD_RANDOM}", JOBSET_POD
    worker = f"{PYTORCHJOB_WORKER}{nodes - 2}" if nodes > 1 else ""
    return max(PYTORCHJOB_MASTER, worker, key=len), PYTORCHJOB_SERVICE


def longest_derived_name(run_name: str, stage: str, backend: str, nodes: int) -> str:
    """The longest name upstream derives for one stage: `<run>-<stage>` + job_suffix."""
    return f"{run_name}-{stage}{job_suffix(backend, nodes)[0]}"


def problems(run: api.RLHFRun) -> list[str]:
    """What upstream would refuse of the names this run derives, one `field: message` each."""
    name = run.metadata.name
    if not DNS_1035.match(name):
        return [
            f"metadata.name: {name!r} must start with a letter (a DNS-1035 label): every "
            "child's name begins with the run's, and Kubernetes refuses PyTorchJob, TrainJob "
            "and Service names that do not; rename the run"
        ]
    trainer = run.spec.trainer
    suffix, what = job_suffix(trainer.backend, trainer.nodes)
    together = MAX_LABEL - 1 - len(suffix)  # for the run's and a stage's names
    context = f"backend {trainer.backend} with {trainer.nodes} node(s)"
    if len(name) + 1 > together:  # no stage name, however short, fits
        derived = longest_derived_name(name, "s", trainer.backend, trainer.nodes)
        return [
            f"metadata.name: {name!r} ({len(name)} characters) is too long: even a one-letter "
            f"stage derives the {what} {derived!r} ({len(derived)} characters, over "
            f"{MAX_LABEL}); with {context} the run and stage names may have {together} "
            "characters together: shorten the run name"
        ]
    out = []
    for index, stage in enumerate(run.spec.stages):
        derived = longest_derived_name(name, stage.name, trainer.backend, trainer.nodes)
        if len(derived) > MAX_LABEL:
            out.append(
                f"spec.stages[{index}].name: {stage.name!r} with metadata.name {name!r} "
                f"derives the {what} {derived!r} ({len(derived)} characters, over "
                f"{MAX_LABEL}); with {context} the run and stage names may have {together} "
                "characters together: shorten the stage name or the run name"
            )
    return out
