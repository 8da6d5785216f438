"""The guide's ``config.py``: every hyperparameter and path, re-exported from ``freqmerge.config``.

Defaults live in ``src/freqmerge/config.py`` (the scripts read them from there); override any of them
per run with the command-line flags (``python train.py --help``).
"""

import _src_path  # noqa: F401  (source-tree fallback, see _src_path.py)

from freqmerge.config import *  # noqa: F403
from freqmerge.config import Config  # noqa: F401
