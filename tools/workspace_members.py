"""List the uv workspace members (path, distribution, console scripts) from their pyproject files.

Used by CI to build its job matrix, so adding a member is one folder plus one README line.
``python tools/workspace_members.py --json`` prints the matrix.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def members(root: Path = ROOT) -> list[dict]:
    """Every workspace member with its distribution name and console scripts."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    found = []
    for pattern in config["tool"]["uv"]["workspace"]["members"]:
        for folder in sorted(glob.glob(str(root / pattern))):
            pyproject = Path(folder) / "pyproject.toml"
            if not pyproject.exists():
                continue
            project = tomllib.loads(pyproject.read_text())["project"]
            found.append(
                {
                    "path": str(Path(folder).relative_to(root)),
                    "name": project["name"],
                    "scripts": project.get("scripts", {}),
                }
            )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the CI matrix as JSON")
    args = parser.parse_args()
    rows = members()
    if args.json:
        print(json.dumps({"include": [{"member": row["path"], "package": row["name"]} for row in rows]}))
    else:
        for row in rows:
            print(f"{row['path']:28s} {row['name']:16s} {' '.join(row['scripts'])}")


if __name__ == "__main__":
    main()
