"""rlhf-operator trainers: FSDP trainers, losses, data, checkpoints and progress reporting."""

__version__ = "0.1.0"
