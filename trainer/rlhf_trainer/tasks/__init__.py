"""Built-in tasks with checkable answers (standard library only): the synthetic animal-sounds
task of the tests and the tiny model, and the brief-answers task of the real-model example;
the registry of reward functions by name.
"""
