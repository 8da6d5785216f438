"""Pointcept-style engine: configs, builders, trainer, tester, metrics."""
