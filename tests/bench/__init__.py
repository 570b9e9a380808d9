"""Benchmarks: ``python -m tests.bench`` runs each ``bench_*.py`` and prints its figures.

Not collected by pytest (``norecursedirs``) and never timed assertions.
"""
