"""Models: loading and saving causal LMs, the reward model, the online stages' models, LoRA, the
tiny test model, GGUF import.
"""
