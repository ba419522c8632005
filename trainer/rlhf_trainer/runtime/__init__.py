"""What every stage runs on: the process group, checkpoints, schedules, progress, metrics,
determinism.
"""
