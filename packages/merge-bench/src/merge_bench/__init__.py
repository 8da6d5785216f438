"""Benchmarks of merge-core: the merge-bench command and its suites."""
