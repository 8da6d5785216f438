"""The ``merge-bench`` command (suites move here from merge_core.bench)."""

from merge_core.bench import main

__all__ = ["main"]
