"""The never-slower policy must not calibrate inside a torch dispatch mode (a FLOP counter, say)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from merge_core.kernels import policy


def test_flop_counter_sees_the_requested_schedule_and_no_calibration(monkeypatch):
    monkeypatch.setattr(policy, "_calibratable", lambda model, x: True)  # pretend: CUDA input, inference
    calls = []
    model = torch.nn.Linear(2, 2)
    x = torch.zeros(1, 2)
    with FlopCounterMode(display=False):
        r = policy.resolve_r(model, x, [4, 4], run=lambda: calls.append(1))
    assert r == [4, 4]
    assert calls == []  # nothing was timed: the counter counts one forward of the merged model


def test_without_a_dispatch_mode_the_same_call_calibrates(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGE_CORE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(policy, "_calibratable", lambda model, x: True)
    monkeypatch.setattr(policy, "time_pair", lambda merged, plain, warmup, iters, device=None: (2.0, 1.0))
    policy.clear_cache()
    r = policy.resolve_r(torch.nn.Linear(2, 2), torch.zeros(1, 2), [4, 4], run=lambda: None)
    assert r == [0, 0]  # merged measured slower (2 ms vs 1 ms): run unmerged
