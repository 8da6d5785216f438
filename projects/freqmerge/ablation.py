"""Thin wrapper so `python ablation.py ...` works from the project folder (same as `freqmerge-ablation`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # also works without installing the package

from freqmerge.ablation import main  # noqa: E402

if __name__ == "__main__":
    main()
