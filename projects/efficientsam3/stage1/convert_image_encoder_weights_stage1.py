"""The reference's converter entry point; same as `efficientsam3-convert-stage1`."""

import _src_path  # noqa: F401  (source-tree fallback)

from efficientsam3.convert import main

if __name__ == "__main__":
    main()
