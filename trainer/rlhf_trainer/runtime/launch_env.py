"""What torchrun (or a PyTorchJob) tells a process about its place in the job, read from the
environment. Torch-free, so it works before any process group exists."""

from __future__ import annotations

import os


def env_rank() -> int:
    """Global rank (RANK); 0 in a plain process."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    """Number of ranks (WORLD_SIZE); 1 in a plain process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_local_world_size() -> int:
    """Ranks on this node (LOCAL_WORLD_SIZE); 1 in a plain process."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
