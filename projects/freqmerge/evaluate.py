"""Thin wrapper so `python evaluate.py ...` works from the project folder (same as `freqmerge-evaluate`)."""

import sys
from pathlib import Path

# Source-tree fallbacks: this project's src/ and the workspace's merge-core (no effect once installed).
_project = Path(__file__).resolve().parent
for _path in (_project.parents[1] / "packages" / "merge-core" / "src", _project / "src"):
    if _path.is_dir() and str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from freqmerge.evaluate import main  # noqa: E402

if __name__ == "__main__":
    main()
