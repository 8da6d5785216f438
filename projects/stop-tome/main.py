"""STOP-style entry point: ``python main.py --do_train 1 ...`` (same as the ``stop-tome-main`` command).

Works without installing the workspace too (e.g. ``torchrun projects/stop-tome/main.py`` on a bare GPU machine):
the package folders of this checkout are appended to ``sys.path``; installed copies take precedence.
"""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _src in (
    _HERE / "src",
    _HERE.parents[1] / "packages" / "merge-core" / "src",
    _HERE.parents[1] / "packages" / "run-kit" / "src",
):
    if _src.is_dir() and str(_src) not in sys.path:
        sys.path.append(str(_src))

from stop_tome.main import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
