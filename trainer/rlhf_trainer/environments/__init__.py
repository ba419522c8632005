"""Multi-turn environments: the built-in ones, their HTTP server and the trainer's client."""
