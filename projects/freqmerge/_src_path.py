"""Source-tree fallback for the guide's `python train.py ...` lines: put this project's src/ and the
workspace's merge-core and run-kit on sys.path (no effect once the packages are installed by uv)."""

import sys
from pathlib import Path

_project = Path(__file__).resolve().parent
_packages = _project.parents[1] / "packages"
for _path in (_packages / "merge-core" / "src", _packages / "run-kit" / "src", _project / "src"):
    if _path.is_dir() and str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
