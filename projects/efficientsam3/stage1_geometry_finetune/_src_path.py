"""Source-tree fallback for the guide's `python stage1_geometry_finetune/<script>.py ...` lines: put this
project's src/ and the workspace packages it needs on sys.path (no effect once uv has installed them)."""

import sys
from pathlib import Path

_project = Path(__file__).resolve().parents[1]
_root = _project.parents[1]
for _path in (_root / "packages" / "merge-core" / "src", _root / "packages" / "run-kit" / "src", _project / "src"):
    if _path.is_dir() and str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
