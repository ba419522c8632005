"""The evaluate stage and `rlhf eval`."""
