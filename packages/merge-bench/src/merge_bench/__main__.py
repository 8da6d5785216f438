"""``python -m merge_bench`` = ``merge-bench`` (for GPU machines without uv)."""

import sys

from .cli import main

sys.exit(main())
