"""Pointcept-style ``tools/train.py``: ``--config-file <cfg.py> --options save_path=exp/... weight=...``.

Run it directly for one process, or through ``scripts/train.sh -g N`` (torchrun) for DDP.
"""

from __future__ import annotations

import sys

from run_kit import CheckpointError, OneLineArgumentParser, cleanup_distributed, setup_distributed

from ..engine.config import ConfigError, load_config
from ..engine.trainer import train


def parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog="gitmerge3d-train", description=__doc__.splitlines()[0])
    p.add_argument("--config-file", required=True, help="a configs/<d>/<name>.py file")
    p.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides (a.b=value)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = load_config(args.config_file, args.options)
        if not cfg.get("save_path"):
            raise ConfigError("save_path is not set (pass --options save_path=exp/<d>/<name>, as train.sh does)")
        env = setup_distributed(args.device)
        try:
            train(cfg, env, explicit=[o.split("=", 1)[0].split(".")[0] for o in args.options])
        finally:
            cleanup_distributed()
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"gitmerge3d-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
