"""Source-tree fallback for the guide's `python train.py ...` lines: put this project's src/ and the
workspace's merge-core on sys.path (no effect once the packages are installed by uv)."""

import sys
from pathlib import Path

_project = Path(__file__).resolve().parent
for _path in (_project.parents[1] / "packages" / "merge-core" / "src", _project / "src"):
    if _path.is_dir() and str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
