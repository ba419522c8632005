"""Generation for the online stages: the rollout-server client, the in-trainer engine and its
decoders, weight sync.
"""
