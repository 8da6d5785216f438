"""The never-slower merge policy (merge_core.kernels.policy) on CPU, with its timer replaced by fixed numbers.

Calibration itself only runs on CUDA inputs; here ``_calibratable`` is forced so the decision logic, the
disk cache and the adapter hook are checked against hand-set timings.
"""

from __future__ import annotations

import json

import pytest
import torch

timm = pytest.importorskip("timm")

import merge_core as mc  # noqa: E402
from merge_core.kernels import policy  # noqa: E402


def _tiny():
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=7)
    return timm.create_model("vit_tiny_patch16_224", **cfg).eval()


@pytest.fixture
def fake_timer(monkeypatch, tmp_path):
    """Calibration sees ``timings`` (merged ms, plain ms); decisions go to a temporary cache."""
    monkeypatch.setenv("MERGE_CORE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MERGE_CORE_POLICY", raising=False)
    monkeypatch.setattr(policy, "_calibratable", lambda model, x: True)
    state = {"timings": (1.0, 2.0), "calls": 0}

    def time_pair(run_merged, run_plain, warmup, iters, device=None):
        state["calls"] += 1
        run_merged()
        run_plain()
        return state["timings"]

    monkeypatch.setattr(policy, "time_pair", time_pair)
    policy.clear_cache()
    yield state
    policy.clear_cache()


def test_slower_merging_runs_unmerged_and_equals_r0(fake_timer):
    model = _tiny()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
    mc.patch.timm(model)
    model.r = 4
    fake_timer["timings"] = (3.0, 2.0)  # merging measured slower
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, plain)  # ran at r = 0: the unpatched model's output
    assert policy.last_decision(model)["merge"] is False and fake_timer["calls"] == 1
    with torch.no_grad():
        model(x)
    assert fake_timer["calls"] == 1  # cached: no second calibration
    saved = json.loads(policy.cache_path().read_text())
    assert len(saved) == 1 and next(iter(saved.values()))["ms_plain"] == 2.0


def test_faster_merging_merges_and_force_skips_calibration(fake_timer):
    model = _tiny()
    mc.patch.timm(model)
    model.r = 4
    seen = []
    model.blocks[-1].mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert seen[-1] == mc.tokens_per_layer(17, [4, 4, 4])[-1] == 5  # merged: 17 -> 13 -> 9 -> 5
    model.merge_policy = "force"
    fake_timer["timings"] = (3.0, 2.0)
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))  # new shape, but forced: no calibration
    assert fake_timer["calls"] == 1 and seen[-1] == 5
    model.merge_policy = "sometimes"
    with pytest.raises(ValueError, match="merge_policy must be one of"):
        model(torch.randn(1, 3, 32, 32))


def test_decisions_are_per_shape_and_read_back_from_disk(fake_timer):
    model = _tiny()
    mc.patch.timm(model)
    model.r = 4
    x1, x8 = torch.randn(1, 3, 32, 32), torch.randn(8, 3, 32, 32)
    fake_timer["timings"] = (3.0, 2.0)
    with torch.no_grad():
        model(x1)
    fake_timer["timings"] = (1.0, 2.0)
    with torch.no_grad():
        model(x8)
    assert fake_timer["calls"] == 2
    policy.clear_cache()  # a new process: decisions come back from the file, no calibration
    with torch.no_grad():
        model(x1)
        assert policy.last_decision(model)["merge"] is False
        model(x8)
        assert policy.last_decision(model)["merge"] is True
    assert fake_timer["calls"] == 2


def test_no_calibration_on_cpu_or_in_training(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGE_CORE_CACHE_DIR", str(tmp_path))
    model = _tiny()
    mc.patch.timm(model)
    model.r = 4
    assert not policy._calibratable(model, torch.randn(1, 3, 32, 32))  # CPU input
    with pytest.raises(ValueError, match="override must be"):
        with policy.override("never"):
            pass
    with policy.override("zero"):
        assert policy.resolve_r(model, torch.randn(1, 3, 32, 32), [4, 4, 4], lambda: None) == [0, 0, 0]
    assert not policy.cache_path().exists()
