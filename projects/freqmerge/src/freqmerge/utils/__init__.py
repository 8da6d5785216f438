"""Utilities: metrics/throughput (guide: utils/metrics.py) and plots (guide: utils/visualize.py)."""
