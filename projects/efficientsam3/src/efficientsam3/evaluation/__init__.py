"""Evaluation of SAM3 / EfficientSAM3 models on public benchmarks."""
