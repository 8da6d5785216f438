"""Issue 9 target 1: a repeated r = 0 forward of a patched timm ViT costs at most two Python calls more than timm.

The reference is the unpatched timm model: its outputs (bit-equal) and its Python call count per forward
(``sys.setprofile`` "call" events, so any wrapper or helper frame counts). Also checked: every way the fast
path must be left (new r, in-place schedule edit, a changed decision, the policy env var, training, compile).
"""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import merge_core as mc
from merge_core.kernels import policy

DEPTH = 3
TOKENS_R4 = [13, 9, 5]  # 16 patches + CLS, r=4 per layer, CLS protected: by hand


def _tiny() -> VisionTransformer:
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=DEPTH, num_heads=2, num_classes=7)
    return timm.create_model("vit_tiny_patch16_224", **cfg).eval()


def _images(batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _calls(fn) -> Counter:
    """Python frames entered during ``fn()``, by (file, function)."""
    seen: Counter = Counter()

    def profiler(frame, event, arg):
        if event == "call":
            seen[(frame.f_code.co_filename, frame.f_code.co_name)] += 1

    sys.setprofile(profiler)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


def _no_instance_forwards(model) -> bool:
    names = ("forward", "forward_features", "forward_head", "pool")
    return not any(name in m.__dict__ for m in model.modules() for name in names)


@pytest.fixture(autouse=True)
def _clean_policy(monkeypatch):
    monkeypatch.delenv("MERGE_CORE_POLICY", raising=False)
    policy.clear_cache()
    yield
    policy.clear_cache()


@pytest.mark.parametrize("how", ["r0", "policy_zero"])
def test_repeated_r0_forward_costs_at_most_two_calls_and_is_bit_equal(how):
    plain, model, x = _tiny(), _tiny(), _images()
    mc.patch.timm(model)
    if how == "r0":
        model.r = 0
    else:
        model.r = 4
        policy.set_decision(model, x, [4] * DEPTH, merge=False)  # as a calibration that found merging slower
    with torch.no_grad():
        expected = plain(x)
        assert torch.equal(model(x), expected)  # the full path, which remembers the key
        plain(x)
        base = _calls(lambda: plain(x))
        outs = []
        patched = _calls(lambda: outs.append(model(x)))
    extra = patched - base
    assert not (base - patched)  # timm's own frames all ran
    assert sum(extra.values()) <= 2, extra
    assert torch.equal(outs[0], expected)
    assert _no_instance_forwards(model)
    state = model._merge_info
    assert state.r == [0] * DEPTH and state.tokens == [17] * DEPTH and state.size is None
    if how == "policy_zero":
        assert policy.last_decision(model)["merge"] is False


def test_fast_path_writes_no_class_attribute():
    """Class writes per forward slow attribute reads for good on Python 3.13 (the type cache gives up)."""
    model, x = _tiny(), _images()
    mc.patch.timm(model)
    model.r = 0
    classes = {type(m) for m in model.modules()}
    with torch.no_grad():
        model(x)
        before = {cls: dict(cls.__dict__) for cls in classes}
        model(x)
    assert {cls: dict(cls.__dict__) for cls in classes} == before


def test_fast_path_is_left_when_anything_in_its_key_changes(monkeypatch):
    model, x = _tiny(), _images()
    mc.patch.timm(model)
    schedule = [0] * DEPTH
    model.r = schedule
    with torch.no_grad():
        model(x)
        model(x)
        schedule[0] = 4  # edited in place: must merge
        model(x)
        assert model._merge_info.tokens == [13, 13, 13]
        model.r = 4
        policy.set_decision(model, x, [4] * DEPTH, merge=False)
        model(x)
        model(x)
        assert model._merge_info.tokens == [17] * DEPTH
        policy.set_decision(model, x, [4] * DEPTH, merge=True)  # a new decision for the same key
        model(x)
        assert model._merge_info.tokens == TOKENS_R4
        policy.set_decision(model, x, [4] * DEPTH, merge=False)
        model(x)
        model(x)
        monkeypatch.setenv("MERGE_CORE_POLICY", "force")
        model(x)
        assert model._merge_info.tokens == TOKENS_R4
        monkeypatch.delenv("MERGE_CORE_POLICY")
        model(x)
        assert model._merge_info.tokens == [17] * DEPTH
        model.merge_policy = "force"
        model(x)
        assert model._merge_info.tokens == TOKENS_R4
        del model.merge_policy
        with policy.override("force"):
            model(x)
        assert model._merge_info.tokens == TOKENS_R4
        model(_images(2))  # another shape, no decision: the requested r (CPU is never calibrated)
        assert model._merge_info.tokens == TOKENS_R4
    model.train()
    model(x).sum().backward()  # training: the policy does not apply
    assert model._merge_info.tokens == TOKENS_R4
    assert _no_instance_forwards(model)


def test_exception_in_the_fast_path_leaves_no_instance_forward():
    model = _tiny()
    mc.patch.timm(model)
    model.r = 0
    with torch.no_grad():
        model(_images())

        def fail(module, inputs):
            raise RuntimeError("hook failure")

        handle = model.blocks[1].register_forward_pre_hook(fail)
        with pytest.raises(RuntimeError, match="hook failure"):
            model(_images())
        handle.remove()
        assert _no_instance_forwards(model)
        model.r = 4
        model(_images())
    assert model._merge_info.tokens == TOKENS_R4


def test_compile_after_fast_r0_forwards_traces_the_merging_path():
    import torch._dynamo
    from torch._dynamo.utils import counters

    model, x = _tiny(), _images()
    mc.patch.timm(model)
    model.r = 4
    with torch.no_grad():
        with policy.override("force"):
            merged = model(x).clone()
        policy.set_decision(model, x, [4] * DEPTH, merge=False)
        model(x)
        model(x)  # the fast path is armed
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        got = compiled(x)
        compiled(x)
        compiled(x)
    assert counters["stats"]["unique_graphs"] == 1  # the eager-only check is folded without a guard: no recompile
    torch.testing.assert_close(got, merged, atol=1e-5, rtol=1e-5)
    assert model._merge_info.tokens == TOKENS_R4
    torch._dynamo.reset()


def test_remove_patch_drops_the_remembered_key():
    model, x = _tiny(), _images()
    with torch.no_grad():
        expected = model(x)
    mc.patch.timm(model)
    model.r = 0
    with torch.no_grad():
        model(x)
        model(x)
    mc.patch.remove_patch(model)
    assert type(model) is VisionTransformer and "_merge_plain" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(x), expected)
