"""Benchmarks of the running system: `python -m bench [NAME ...]` prints figures, never asserts."""
