"""Reward sources of the online stages: Python reward functions (one resolver and allow-list), the
AI judge, the built-in tasks.
"""
