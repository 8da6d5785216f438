"""``stop-tome-main`` / ``python main.py``: train and evaluate STOP / CLIP4Clip with token merging."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from run_kit import CheckpointError

from .engine import run
from .params import parse_args


def main(argv: Sequence[str] | None = None) -> int:
    args, explicit = parse_args(argv)
    try:
        run(args, explicit)
    except (FileNotFoundError, ValueError, CheckpointError) as exc:
        print(f"stop-tome-main: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
