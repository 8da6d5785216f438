"""Each member's documented commands run that member's code, with every workspace package installed."""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workspace_members import ROOT, members  # noqa: E402

MEMBERS = members()
SCRIPTS = [(m["name"], m["path"], name, target) for m in MEMBERS for name, target in m["scripts"].items()]


def test_console_script_names_are_unique():
    names = [name for _, _, name, _ in SCRIPTS]
    assert len(names) == len(set(names)), f"duplicate console scripts: {sorted(names)}"


@pytest.mark.parametrize("package,path,name,target", SCRIPTS, ids=[s[2] for s in SCRIPTS])
def test_script_targets_its_own_member(package, path, name, target):
    module = target.split(":")[0].split(".")[0]
    assert (ROOT / path / "src" / module).is_dir(), f"{name} -> {target} is not code of {path}"
    binary = Path(sys.executable).parent / name
    assert binary.exists(), f"{name} is not installed in the workspace venv (uv sync --all-packages)"
    assert f"from {target.split(':')[0]} import" in binary.read_text() or target.split(":")[0] in binary.read_text()
    result = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout and name in result.stdout


@pytest.mark.parametrize("package,path,name,target", SCRIPTS, ids=[s[2] for s in SCRIPTS])
def test_readme_shows_package_command(package, path, name, target):
    readme = (ROOT / "README.md").read_text()
    assert f"uv run --package {package} {name}" in readme
