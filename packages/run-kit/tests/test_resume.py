"""RNG capture, full resume state (bit-equal continuation) and config reconciliation."""

import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from run_kit import (
    CheckpointError,
    ConfigMismatchWarning,
    capture_rng_state,
    load_checkpoint,
    reconcile_config,
    restore_resume_state,
    restore_rng_state,
    resume_state,
    save_checkpoint,
    seed_everything,
)


def _draws():
    return (random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.randn()), torch.rand(3))


def test_rng_round_trip_through_a_weights_only_file(tmp_path):
    seed_everything(5)
    _draws()
    state = capture_rng_state()
    expected = _draws()
    save_checkpoint(tmp_path / "rng.pth", {"rng": state})
    seed_everything(999)
    _draws()
    restore_rng_state(load_checkpoint(tmp_path / "rng.pth")["rng"])
    got = _draws()
    assert got[:4] == expected[:4] and torch.equal(got[4], expected[4])


def test_seed_everything_rejects_bad_seed():
    with pytest.raises(ValueError, match="seed: expected an integer >= 0"):
        seed_everything(-1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.drop = nn.Dropout(0.3)  # consumes the torch RNG every step
        self.b = nn.Linear(16, 3)

    def forward(self, x):
        return self.b(self.drop(torch.relu(self.a(x))))


def _objects():
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _train(model, opt, sched, steps):
    """Every batch is drawn from the global RNGs (numpy for labels, torch for inputs, python for a scale)."""
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 6) * (1 + random.random())
        y = torch.from_numpy(np.random.randint(0, 3, size=8))
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    seed_everything(0, deterministic=True)
    ref_model, ref_opt, ref_sched = _objects()
    ref_losses = _train(ref_model, ref_opt, ref_sched, 10)

    seed_everything(0, deterministic=True)
    model, opt, sched = _objects()
    first = _train(model, opt, sched, 4)
    cfg = {"lr": 0.05, "layers": [1, 2]}
    save_checkpoint(tmp_path / "last.pth", resume_state(model, opt, sched, epoch=1, step=4, config=cfg))
    del model, opt, sched

    seed_everything(123)  # a different process state before resuming
    model, opt, sched = _objects()
    info = restore_resume_state(load_checkpoint(tmp_path / "last.pth"), model, opt, sched, source="last.pth")
    assert (info.epoch, info.step, info.config) == (1, 4, cfg)
    losses = first + _train(model, opt, sched, 6)
    assert losses == ref_losses
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict()["state"], ref_opt.state_dict()["state"]
    for k in sb:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[k][name], sb[k][name])
    assert sched.last_epoch == ref_sched.last_epoch == 10


def test_resume_state_refuses_unstorable_config():
    model, opt, _ = _objects()
    with pytest.raises(TypeError, match=r"config\.path: PosixPath"):
        from pathlib import Path

        resume_state(model, opt, epoch=0, step=0, config={"path": Path("/x")})


def test_restore_errors_are_one_line():
    model, opt, _ = _objects()
    with pytest.raises(CheckpointError, match="best.pth: not a resumable training checkpoint"):
        restore_resume_state({"model": model.state_dict()}, model, opt, source="best.pth")
    state = resume_state(model, None, epoch=1, step=1, config={})
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        restore_resume_state(state, model, opt, source="x.pth")


def test_reconcile_config_saved_wins_unless_explicit():
    saved = {"epochs": 3, "batch_size": 8, "lr": 0.1, "layers": [4, 6], "device": "cuda"}
    cli = {"epochs": 20, "batch_size": 32, "lr": 0.3, "layers": (4, 6), "device": "cpu", "new_flag": 1}
    msgs = []
    out = reconcile_config(saved, cli, {"lr", "layers", "epochs"}, always_cli={"device"}, warn=msgs.append,
                           flags={"lr": "--learning_rate"})  # fmt: skip
    # epochs explicit (20 != 3): cli + warning; batch_size not explicit: saved; lr explicit differs: cli + warning;
    # layers explicit but equal (tuple vs list): no warning; device always from cli; unknown key kept.
    assert out == {"epochs": 20, "batch_size": 8, "lr": 0.3, "layers": (4, 6), "device": "cpu", "new_flag": 1}
    assert len(msgs) == 2
    assert msgs[0].startswith("--epochs: using the command line's 20, the resumed run had 3")
    assert msgs[1].startswith("--learning_rate:")


def test_reconcile_config_default_warning_category():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reconcile_config({"a": 1, "b": 2}, {"a": 5, "b": 6}, {"a", "b"})
    assert [type(w.message) for w in caught] == [ConfigMismatchWarning] * 2


@pytest.mark.gpu
def test_cuda_rng_and_scaler_round_trip(tmp_path):
    """CUDA RNG of every device and an enabled GradScaler survive a weights-only checkpoint."""
    from run_kit import grad_scaler

    seed_everything(1)
    state = capture_rng_state()
    expected = torch.rand(4, device="cuda").cpu()
    model = nn.Linear(3, 3).cuda()
    scaler = grad_scaler(torch.device("cuda"), True)
    scaler.scale(torch.ones(1, device="cuda"))  # the scale tensor is created lazily
    scaler.update(1024.0)
    save_checkpoint(tmp_path / "c.pth", {**resume_state(model, None, None, scaler, epoch=0, step=0, config={}),
                                         "rng_now": state})  # fmt: skip
    torch.rand(100, device="cuda")
    ckpt = load_checkpoint(tmp_path / "c.pth")
    restore_rng_state(ckpt["rng_now"])
    assert torch.equal(torch.rand(4, device="cuda").cpu(), expected)
    fresh = grad_scaler(torch.device("cuda"), True)
    restore_resume_state(ckpt, nn.Linear(3, 3).cuda(), None, None, fresh, restore_rng=False)
    assert fresh.get_scale() == 1024.0
