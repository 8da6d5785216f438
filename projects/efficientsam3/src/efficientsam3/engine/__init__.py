"""Loops: teacher export, stage-1 training, losses and the LR schedule."""
