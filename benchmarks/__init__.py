"""Benchmarks: one script per claim, on the shared harness (``harness.py``) and shared jobs (``jobs.py``).

Run a script from the repository root as a module or as a file: ``python -m benchmarks.mfu`` or
``python benchmarks/mfu.py`` (``benchmarks/README.md`` lists every claim and its command).
"""
