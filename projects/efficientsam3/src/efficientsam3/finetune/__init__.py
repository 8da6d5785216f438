"""Stage-1 geometry fine-tune: converter, prompt sampling, losses, configs."""
