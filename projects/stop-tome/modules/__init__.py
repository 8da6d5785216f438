"""STOP's ``modules`` package layout (``from modules.clip4clip import CLIP4Clip``), re-exporting ``stop_tome``.

Importable when the working directory (or PYTHONPATH) is ``projects/stop-tome``, as in STOP's repository. Without
an installed workspace the package folders of this checkout are appended to ``sys.path`` (installed copies win).
"""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parents[1]
for _src in (
    _HERE / "src",
    _HERE.parents[1] / "packages" / "merge-core" / "src",
    _HERE.parents[1] / "packages" / "run-kit" / "src",
):
    if _src.is_dir() and str(_src) not in sys.path:
        sys.path.append(str(_src))
