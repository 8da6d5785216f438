"""argparse helpers for trainers: one-line errors, and which flags the user typed (for ``reconcile_config``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

_UNSET = object()


class OneLineArgumentParser(argparse.ArgumentParser):
    """Errors as ``prog: error: argument --x: ...`` on one line (no usage block), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message.splitlines()[0]}\n")


def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> set[str]:
    """The ``dest`` names the user set on the command line (even when set to the default value).

    Parses ``argv`` a second time with every default replaced by a sentinel; parse ``argv`` normally first,
    so errors are reported once.
    """
    saved = {a.dest: a.default for a in parser._actions}
    try:
        for action in parser._actions:
            if action.dest != argparse.SUPPRESS and not action.required:
                action.default = _UNSET
        ns, _ = parser.parse_known_args(argv)
    finally:
        for action in parser._actions:
            action.default = saved[action.dest]
    return {k for k, v in vars(ns).items() if v is not _UNSET}


def parse_args_explicit(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> tuple[argparse.Namespace, set[str]]:
    """``parser.parse_args(argv)`` plus the set of explicitly given dests."""
    args = parser.parse_args(argv)
    return args, explicit_dests(parser, argv)
