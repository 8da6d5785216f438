"""Benchmarks of merge-core: the ``merge-bench`` command, its suites (model, gpu, sweep, micro, profile)."""
