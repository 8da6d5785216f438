"""Thin wrapper so `python evaluate.py ...` works from the project folder (same as `freqmerge-evaluate`)."""

import _src_path  # noqa: F401  (source-tree fallback, see _src_path.py)

from freqmerge.evaluate import main

if __name__ == "__main__":
    main()
