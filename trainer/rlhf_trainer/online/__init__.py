"""The online stages (ppo, grpo, online rrhf): the step loop, setup, rollouts feed, experience,
episodes.
"""
