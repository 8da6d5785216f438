"""Shared training plumbing: atomic checkpoints, full resume, DDP, logs, seeds."""
