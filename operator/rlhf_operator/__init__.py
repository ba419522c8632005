"""rlhf-operator control plane: the RLHFRun API, planner, builders, executors and the `rlhf` CLI."""

__version__ = "0.1.0"
