"""The guide's converter entry point; same as `efficientsam3-convert-geometry-finetune`."""

import _src_path  # noqa: F401  (source-tree fallback)

from efficientsam3.finetune.convert import main

if __name__ == "__main__":
    main()
