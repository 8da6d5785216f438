"""``python tools/train.py --config-file ... --options ...`` (see gitmerge3d.tools.train)."""

import sys

from gitmerge3d.tools.train import main

if __name__ == "__main__":
    sys.exit(main())
