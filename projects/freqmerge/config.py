"""The guide's ``config.py``: every hyperparameter and path, re-exported from ``freqmerge.config``.

Defaults live in ``src/freqmerge/config.py`` (the scripts read them from there); override any of them
per run with the command-line flags (``python train.py --help``).
"""

import sys
from pathlib import Path

_src = str(Path(__file__).resolve().parent / "src")
if _src not in sys.path:
    sys.path.insert(0, _src)

from freqmerge.config import *  # noqa: E402,F403
from freqmerge.config import Config  # noqa: E402,F401
