"""Each member's documented commands run that member's code, with every workspace package installed."""

import shutil
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


@pytest.mark.skipif(shutil.which("uv") is None, reason="uv not on PATH")
@pytest.mark.parametrize("package,path,name,target", SCRIPTS, ids=[s[2] for s in SCRIPTS])
def test_documented_uv_command_runs_member_code(package, path, name, target):
    """`uv run --package <member> <command>` (the README's form) resolves to this member's entry point."""
    module = target.split(":")[0]
    probe = (
        "import importlib.metadata as m, sys; "
        f"eps = [e for e in m.entry_points(group='console_scripts') if e.name == {name!r}]; "
        "print(eps[0].value if len(eps) == 1 else f'{len(eps)} entry points'); "
        f"import importlib.util as u; print(u.find_spec({module.split('.')[0]!r}).origin)"
    )
    result = subprocess.run(
        ["uv", "run", "--no-sync", "--package", package, "python", "-c", probe],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    entry, module_file = result.stdout.split()[-2:]
    assert entry == target
    assert Path(module_file).resolve().is_relative_to((ROOT / path).resolve())
