"""explicit_dests, RunLogger (history JSON, text log, TensorBoard, rank gating) and progress."""

import json

import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from run_kit import OneLineArgumentParser, RunLogger, explicit_dests, parse_args_explicit, progress


def _parser():
    p = OneLineArgumentParser(prog="t")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--no_amp", action="store_true")
    p.add_argument("--layers", type=int, nargs="+", default=[1])
    p.add_argument("--resume", nargs="?", const="", default=None)
    return p


def test_explicit_dests_even_when_equal_to_default():
    p = _parser()
    args, explicit = parse_args_explicit(p, ["--epochs", "20", "--no_amp", "--resume"])
    assert explicit == {"epochs", "no_amp", "resume"}
    assert (args.epochs, args.lr, args.no_amp, args.resume, args.layers) == (20, 0.1, True, "", [1])
    assert explicit_dests(p, []) == set()
    assert p.parse_args([]).lr == 0.1  # defaults restored afterwards


def test_one_line_parser_error(capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["--epochs", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == "t: error: argument --epochs: invalid int value: 'x'\n"


def _tb_scalars(folder):
    out = {}
    for f in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(f)).Load():
            for v in event.summary.value:
                out.setdefault(v.tag, []).append(
                    (event.step, v.tensor.float_val[0] if v.tensor.float_val else v.simple_value)
                )
    return out


def test_run_logger_writes_history_log_and_tensorboard(tmp_path, capsys):
    with RunLogger(tmp_path, enabled=True) as log:
        log.log_scalars(1, loss=2.5, top1=10.0)
        log.log_scalars(2, loss=1.5)
        log.info("hello")
    assert json.loads((tmp_path / "history.json").read_text()) == [
        {"step": 1, "loss": 2.5, "top1": 10.0},
        {"step": 2, "loss": 1.5},
    ]
    assert (tmp_path / "log.txt").read_text() == "hello\n"
    assert "hello" in capsys.readouterr().out
    assert _tb_scalars(tmp_path / "tensorboard")["loss"] == [(1, 2.5), (2, 1.5)]


def test_run_logger_resume_drops_rows_after_the_checkpoint(tmp_path):
    with RunLogger(tmp_path, enabled=True, tensorboard=False) as log:
        for s in (1, 2, 3):
            log.log_scalars(s, loss=float(s))
    with RunLogger(tmp_path, enabled=True, tensorboard=False, resume_step=2) as log:
        log.log_scalars(3, loss=30.0)
    rows = json.loads((tmp_path / "history.json").read_text())
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_disabled_logger_writes_nothing(tmp_path, capsys):
    out = tmp_path / "rank1"
    log = RunLogger(out, enabled=False)
    log.log_scalars(1, loss=1.0)
    log.info("x")
    log.close()
    assert not out.exists() and capsys.readouterr().out == ""


def test_progress_disabled_is_the_iterable():
    items = [1, 2]
    assert progress(items, enabled=False) is items
    assert list(progress(items, enabled=True, disable=True)) == items


def test_throttled_history_is_written_on_flush_and_close(tmp_path):
    log = RunLogger(tmp_path, enabled=True, tensorboard=False, write_every_s=3600)
    log.log_scalars(1, loss=1.0)  # the first call writes (nothing written yet)
    log.log_scalars(2, loss=2.0)  # within the interval: kept in memory
    assert [r["step"] for r in json.loads((tmp_path / "history.json").read_text())] == [1]
    log.close()
    assert [r["step"] for r in json.loads((tmp_path / "history.json").read_text())] == [1, 2]
