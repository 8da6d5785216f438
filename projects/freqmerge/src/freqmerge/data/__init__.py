"""Data: CIFAR-100 loaders (guide: data/cifar100.py)."""
