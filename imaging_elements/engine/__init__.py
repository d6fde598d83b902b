"""The engine: the runner (runner.py, the story) and what it is built of.

It never imports a class library (tests/test_layers.py); class libraries plug in
through phase_handlers.py."""
