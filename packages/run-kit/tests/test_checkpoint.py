"""Atomic saves, killed saves, weights-only loads and the one-line errors of run_kit.checkpoint."""

import os
import signal
import subprocess
import sys
import textwrap
import zipfile
from collections import OrderedDict

import pytest
import torch
from torch import nn

from run_kit import CheckpointError, load_checkpoint, load_state_dict_checked, save_checkpoint, stale_temp_files


class NotAllowed:
    """A class outside torch's weights-only allow-list."""


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def test_round_trip_and_no_temp_left(tmp_path):
    path = tmp_path / "sub" / "ckpt.pth"
    state = {"model": OrderedDict(w=torch.arange(6.0).reshape(2, 3)), "epoch": 3, "config": {"lr": 0.1, "x": [1, 2]}}
    save_checkpoint(path, state)
    back = load_checkpoint(path)
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["epoch"] == 3
    assert back["config"] == {"lr": 0.1, "x": [1, 2]}
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pth"]


def test_failed_rename_keeps_the_old_file(tmp_path, monkeypatch):
    """A non-atomic writer (writing straight into the target) would leave the new, or a broken, file here."""
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, {"v": torch.tensor([1.0])})

    def boom(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, {"v": torch.tensor([2.0])})
    monkeypatch.undo()
    assert load_checkpoint(path)["v"].item() == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]


# The child saves once, then is SIGKILLed in the middle of its second save (``how`` says where).
_CHILD = textwrap.dedent(
    """
    import os, signal, sys, torch, run_kit.checkpoint as ck
    path, how = sys.argv[1], sys.argv[2]
    ck.save_checkpoint(path, {"v": torch.tensor([1.0]), "big": torch.zeros(200_000)})
    if how == "before_rename":
        os.replace = lambda a, b: os.kill(os.getpid(), signal.SIGKILL)
    else:  # half of the bytes written, then killed
        real = torch.save
        def partial(obj, f):
            real(obj, f)
            f.flush()
            f.truncate(f.tell() // 2)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        ck.torch.save = partial
    ck.save_checkpoint(path, {"v": torch.tensor([2.0]), "big": torch.ones(200_000)})
    """
)


@pytest.mark.parametrize("how", ["before_rename", "mid_write"])
def test_killed_save_leaves_loadable_checkpoint_and_next_save_cleans_up(tmp_path, how):
    path = tmp_path / "last.pth"
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), how], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-500:]
    temps = [p for p in tmp_path.iterdir() if p.name.startswith("last.pth.tmp.")]
    assert len(temps) == 1 and temps[0].stat().st_size > 0
    assert stale_temp_files(path) == temps
    assert load_checkpoint(path)["v"].item() == 1.0  # the old checkpoint is intact
    save_checkpoint(path, {"v": torch.tensor([3.0])})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]
    assert load_checkpoint(path)["v"].item() == 3.0


def test_temp_of_a_live_writer_is_left_alone(tmp_path):
    path = tmp_path / "c.pth"
    live = tmp_path / f"c.pth.tmp.{os.getppid()}"  # our parent process is alive
    live.write_bytes(b"in progress")
    save_checkpoint(path, {"a": 1})
    assert live.exists()


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "nope.pth")
    assert "nope.pth" in _one_line(exc) and "not found" in str(exc.value)


def test_text_file(tmp_path):
    path = tmp_path / "notackpt.pth"
    path.write_text("hello, this is a README and not weights\n")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    msg = _one_line(exc)
    assert "notackpt.pth" in msg and "text file" in msg


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"w": torch.zeros(10_000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    assert "truncated or corrupt" in _one_line(exc)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    assert "empty" in _one_line(exc)


def test_arbitrary_objects_are_refused(tmp_path):
    """A weights_only=False load would build the object (and could run code); we must refuse it in one line."""
    path = tmp_path / "pickled.pth"
    torch.save({"obj": NotAllowed()}, path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    msg = _one_line(exc)
    assert "weights-only" in msg and "pickled.pth" in msg and "weights_only=False" not in msg


def test_zip_that_is_not_torch(tmp_path):
    path = tmp_path / "other.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a.txt", "x")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    _one_line(exc)


def test_non_dict(tmp_path):
    path = tmp_path / "t.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="holds a Tensor, expected a dict"):
        load_checkpoint(path)


def _net(out: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, out))


def test_state_dict_checked_errors_name_file_and_key():
    sd = _net().state_dict()
    with pytest.raises(CheckpointError) as exc:
        load_state_dict_checked(_net(out=7), sd, "run/best.pth")
    msg = _one_line(exc)
    assert msg.startswith("run/best.pth:") and "'2.weight'" in msg and "[3, 5]" in msg and "[7, 5]" in msg
    missing = {k: v for k, v in sd.items() if k != "0.bias"}
    with pytest.raises(CheckpointError, match=r"missing key '0\.bias' \(1 missing, 0 unexpected"):
        load_state_dict_checked(_net(), missing, "f.pth")
    extra = {**sd, "head.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"unexpected key 'head\.weight'"):
        load_state_dict_checked(_net(), extra, "f.pth")
    load_state_dict_checked(_net(), missing, "f.pth", strict=False)  # allowed when not strict


def test_state_dict_checked_strips_wrapper_prefixes():
    src = _net()
    prefixed = {f"module.{k}": v for k, v in src.state_dict().items()}
    dst = _net()
    load_state_dict_checked(dst, prefixed, "ddp.pth")
    for a, b in zip(src.parameters(), dst.parameters(), strict=True):
        assert torch.equal(a, b)
