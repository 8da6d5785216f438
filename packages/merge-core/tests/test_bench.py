"""merge_core.bench: the MAC count, the zero-overhead bound and the timing loop, on tiny CPU models."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

import merge_core as mc  # noqa: E402
from merge_core import bench  # noqa: E402


def _tiny(**kwargs):
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=7)
    cfg.update(kwargs)
    return timm.create_model("vit_tiny_patch16_224", **cfg).eval()


def test_vit_macs_matches_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    model = _tiny()
    for block in model.blocks:
        block.attn.fused_attn = False  # explicit matmuls, so the flop counter sees attention
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert counter.get_total_flops() == 2 * bench.vit_macs(model)


def test_vit_macs_merged_counts_and_known_value():
    model = timm.create_model("vit_small_patch16_224", pretrained=False)
    assert abs(bench.vit_macs(model) / 1e9 - 4.6) < 0.05  # ViT-S/16: 4.6 GMACs as published
    full, merged = bench.vit_macs(model), bench.vit_macs(model, [16] * 12)
    assert 1.9 < full / merged < 2.1  # the r=16 FLOP ratio quoted in issue 3
    assert bench.vit_macs(model, [0] * 12) == full
    with pytest.raises(ValueError, match="schedule must have one r per block"):
        bench.vit_macs(model, [16] * 11)


@pytest.mark.parametrize("bias", [False, True])
def test_bound_forward_equals_timm_at_r0(bias):
    model = _tiny()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out = bench.ZeroOverheadBound(model, [0, 0, 0], bias)(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_bound_forward_uses_merged_token_counts():
    model = _tiny()
    seen = []
    for block in model.blocks:
        block.mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    with torch.no_grad():
        bench.bound_forward(model, torch.randn(1, 3, 32, 32), [4, 4, 4], False)
    assert seen == [13, 9, 5]  # 17 tokens -> 13 -> 9 -> 5 (cap: half of the unprotected tokens), by hand
    mc.patch.timm(model)  # the real merging model sees the same token counts
    model.r = 4
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert seen[3:] == [13, 9, 5]


def test_time_calls_and_measure():
    calls = []
    times = bench.time_calls(lambda: calls.append(1), "cpu", warmup=2, iters=5)
    assert len(calls) == 7 and len(times) == 5 and all(t >= 0 for t in times)
    out = bench.measure(lambda: calls.append(1), torch.device("cpu"), warmup=1, iters=3)
    assert len(calls) == 11 and out["runs"] == 3 and out["ms_min"] <= out["ms_median"] <= out["ms_max"]
