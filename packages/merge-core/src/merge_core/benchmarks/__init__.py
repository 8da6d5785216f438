"""Helpers for ``merge-bench`` that only make sense on a GPU (profiles, kernel sweeps)."""
