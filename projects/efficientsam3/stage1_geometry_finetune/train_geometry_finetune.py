"""The guide's geometry fine-tune entry point; same as `efficientsam3-train-geometry-finetune`."""

import _src_path  # noqa: F401  (source-tree fallback)

from efficientsam3.engine.geometry import main

if __name__ == "__main__":
    main()
