"""Each member's documented commands run that member's code, with every workspace package installed."""

import json
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


# One interpreter calls every entry point with --help (imports are shared, so this costs one torch import, not
# one per command); the exit code and the argparse usage line of each are reported back as JSON.
_HELP_PROBE = r"""
import contextlib, importlib, io, json, sys
out = {}
for name, target in json.loads(sys.argv[1]):
    module, func = target.split(":")
    buf, err = io.StringIO(), io.StringIO()
    code = None
    sys.argv = [name, "--help"]
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
            getattr(importlib.import_module(module), func)()
    except SystemExit as exc:
        code = exc.code or 0
    except Exception as exc:  # reported, not raised: every command gets its own verdict
        code, err = 1, io.StringIO(f"{type(exc).__name__}: {exc}")
    out[name] = {"code": code, "stdout": buf.getvalue(), "stderr": err.getvalue()[-2000:]}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def help_outputs() -> dict:
    pairs = json.dumps([[name, target] for _, _, name, target in SCRIPTS])
    result = subprocess.run(
        [sys.executable, "-c", _HELP_PROBE, pairs], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("package,path,name,target", SCRIPTS, ids=[s[2] for s in SCRIPTS])
def test_script_targets_its_own_member(package, path, name, target, help_outputs):
    module = target.split(":")[0].split(".")[0]
    assert (ROOT / path / "src" / module).is_dir(), f"{name} -> {target} is not code of {path}"
    binary = Path(sys.executable).parent / name
    assert binary.exists(), f"{name} is not installed in the workspace venv (uv sync --all-packages)"
    assert f"from {target.split(':')[0]} import" in binary.read_text() or target.split(":")[0] in binary.read_text()
    result = help_outputs[name]
    assert result["code"] == 0, result["stderr"]
    assert "usage:" in result["stdout"] and name in result["stdout"]


def test_an_installed_binary_runs():
    """The generated console-script wrappers work (one is enough: uv writes them all the same way)."""
    _, _, name, _ = SCRIPTS[0]
    result = subprocess.run(
        [str(Path(sys.executable).parent / name), "--help"], capture_output=True, text=True, timeout=120
    )
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
