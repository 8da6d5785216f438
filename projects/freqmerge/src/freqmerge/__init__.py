"""FreqMerge: frequency-guided token merging for timm ViTs, on merge-core.

Kept import-light (no matplotlib/tqdm here) so ``freqmerge.benchmark`` runs with only torch + timm.
"""

__version__ = "0.1.0"
