"""STOP-style entry point: ``python main.py --do_train 1 ...`` (same as the ``stop-tome-main`` command)."""

from stop_tome.main import main

if __name__ == "__main__":
    raise SystemExit(main())
