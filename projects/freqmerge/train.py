"""Thin wrapper so `python train.py ...` works from the project folder (same as `freqmerge-train`)."""

import _src_path  # noqa: F401  (source-tree fallback, see _src_path.py)

from freqmerge.train import main

if __name__ == "__main__":
    main()
