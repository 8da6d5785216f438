"""Thin wrapper so `python ablation.py ...` works from the project folder (same as `freqmerge-ablation`)."""

import _src_path  # noqa: F401  (source-tree fallback, see _src_path.py)

from freqmerge.ablation import main

if __name__ == "__main__":
    main()
