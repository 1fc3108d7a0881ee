"""Implementations of the parallel-context protocol (models/parallel.py) over a device mesh."""
