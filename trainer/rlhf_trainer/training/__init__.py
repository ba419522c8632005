"""The training loop every stage that trains shares: optimizer, schedule, micro-batches,
checkpoints, evaluation rounds and the final export.
"""
