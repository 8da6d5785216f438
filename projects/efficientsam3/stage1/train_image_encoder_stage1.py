"""The reference's training entry point; same as `efficientsam3-train-stage1`."""

import _src_path  # noqa: F401  (source-tree fallback)

from efficientsam3.engine.stage1 import main

if __name__ == "__main__":
    main()
