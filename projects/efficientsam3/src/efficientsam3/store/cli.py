"""`efficientsam3-compact-store --src STORE --dst STORE --format uint8|bf16`: re-encode a store and write
the measured fidelity (max |err|, MSE, relative MSE, cosine) next to it as fidelity.json."""

from __future__ import annotations

import json
from pathlib import Path

from run_kit import OneLineArgumentParser, write_json_atomic

from .compact import compact_store


def main(argv=None) -> dict:
    p = OneLineArgumentParser(prog="efficientsam3-compact-store", description=__doc__)
    p.add_argument("--src", required=True, help="source store folder (rank*-keys.txt + rank*-values.bin)")
    p.add_argument("--dst", required=True, help="destination folder (resumable)")
    p.add_argument("--format", required=True, choices=("uint8", "bf16", "fp16"))
    p.add_argument("--embed-dim", type=int, default=None, help="needed only for stores without store.json")
    p.add_argument("--embed-size", type=int, default=None)
    args = p.parse_args(argv)
    if not Path(args.src).is_dir():
        p.error(f"argument --src: not a folder: {args.src}")
    fid = compact_store(args.src, args.dst, args.format, args.embed_dim, args.embed_size).as_dict()
    fid["format"] = args.format
    write_json_atomic(Path(args.dst) / "fidelity.json", fid)
    print(json.dumps(fid, indent=1))
    return fid


if __name__ == "__main__":
    main()
