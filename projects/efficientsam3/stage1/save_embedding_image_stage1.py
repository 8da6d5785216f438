"""The reference's export entry point; same as `efficientsam3-save-embeddings`."""

import _src_path  # noqa: F401  (source-tree fallback)

from efficientsam3.engine.export import main

if __name__ == "__main__":
    main()
