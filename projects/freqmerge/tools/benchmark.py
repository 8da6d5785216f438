"""GPU benchmark (see ``freqmerge.benchmark``); runnable from a source tree without installing anything.

    PYTHONPATH=packages/merge-core/src:projects/freqmerge/src python projects/freqmerge/tools/benchmark.py \
        --out projects/freqmerge/results/benchmark.json

The two source folders are also added to sys.path here, so PYTHONPATH is optional.
"""

import sys
from pathlib import Path

_project = Path(__file__).resolve().parents[1]
for _path in (_project / "src", _project.parents[1] / "packages" / "merge-core" / "src"):
    if _path.is_dir() and str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from freqmerge.benchmark import main  # noqa: E402

if __name__ == "__main__":
    main()
