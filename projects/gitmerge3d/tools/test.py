"""``python tools/test.py --config-file ... --options weight=...`` (see gitmerge3d.tools.test)."""

import sys

from gitmerge3d.tools.test import main

if __name__ == "__main__":
    sys.exit(main())
