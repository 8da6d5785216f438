"""The zero-cost r = 0 path: an all-zero schedule runs the library's own classes, no adapter frame in the layers.

Issue 9 target 1: at small batches the policy picks r = 0, but the patched model still went through the
adapter's block/attention forwards. These tests count calls of the adapter's layer forwards (zero at r = 0) and
of the libraries' own forwards (one per layer), compare outputs bitwise with the unpatched model, and check the
paths that must still merge (a later r > 0 forward, training, ``torch.compile`` after an r = 0 forward).
"""

from __future__ import annotations

import copy
import sys

import pytest
import timm
import torch
from timm.models.vision_transformer import Attention, Block, VisionTransformer

import merge_core as mc
from merge_core.kernels import policy
from merge_core.patch.timm_vit import MergeAttention, MergeBlock


def _tiny(depth: int = 3) -> VisionTransformer:
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=7)
    return timm.create_model("vit_tiny_patch16_224", **cfg).eval()


def _images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _counter(monkeypatch, cls: type, name: str = "forward") -> list[int]:
    """Count calls of ``cls.<name>`` (looked up through the MRO at call time, so subclasses count too)."""
    calls: list[int] = []
    original = cls.__dict__[name]

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return calls


@pytest.fixture
def counts(monkeypatch):
    """Calls of the adapter's forwards and of timm's own Block / Attention forwards."""
    monkeypatch.delenv("MERGE_CORE_POLICY", raising=False)
    policy.clear_cache()
    yield {
        "merge_block": _counter(monkeypatch, MergeBlock),
        "merge_attn": _counter(monkeypatch, MergeAttention),
        "block": _counter(monkeypatch, Block),
        "attn": _counter(monkeypatch, Attention),
    }
    policy.clear_cache()


def _stepped_out(model) -> bool:
    """Whether any block class still carries timm's forward (it must only during an r = 0 forward)."""
    return any("forward" in type(m).__dict__ for b in model.blocks for m in (b, b.attn))


def _frames(code, fn) -> int:
    """How many frames run ``code`` during ``fn()`` (sys.setprofile): counts a function however it is wrapped."""
    calls = [0]

    def profiler(frame, event, arg):
        if event == "call" and frame.f_code is code:
            calls[0] += 1

    sys.setprofile(profiler)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls[0]


def _reset(counts) -> None:
    for calls in counts.values():
        calls.clear()


def test_model_r0_runs_timms_own_block_and_attention(counts):
    model, x = _tiny(), _images()
    with torch.no_grad():
        expected = model(x)
    mc.patch.timm(model)
    model.r = 0
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda m, i: seen.append(type(m).forward))
    model.blocks[1].attn.register_forward_pre_hook(lambda m, i: seen.append(type(m).forward))
    _reset(counts)
    with torch.no_grad():
        got = model(x)
    assert torch.equal(got, expected)
    assert counts["merge_block"] == [] and counts["merge_attn"] == []  # no adapter frame inside the layers
    assert len(counts["block"]) == 3 and len(counts["attn"]) == 3  # timm's own forwards, once per layer
    assert seen == [Block.forward, Attention.forward]  # the library's forwards during the forward
    assert not _stepped_out(model)
    assert model._merge_info.r == [0, 0, 0] and model._merge_info.tokens == [17, 17, 17]
    assert model._merge_info.size is None


def test_all_zero_list_is_the_same_path(counts):
    model, x = _tiny(), _images()
    with torch.no_grad():
        expected = model(x)
    mc.patch.timm(model)
    model.r = [0, 0]  # zero-padded to the depth
    _reset(counts)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert counts["merge_block"] == [] and len(counts["block"]) == 3


def test_policy_choosing_r0_runs_timms_forwards_and_other_shapes_merge(counts):
    model = _tiny()
    x1, x4 = _images(1), _images(4)
    with torch.no_grad():
        expected = model(x1)
    mc.patch.timm(model)
    model.r = 4
    policy.set_decision(model, x1, [4, 4, 4], merge=False)  # as a calibration that found merging slower
    _reset(counts)
    with torch.no_grad():
        got = model(x1)
    assert torch.equal(got, expected)
    assert counts["merge_block"] == [] and len(counts["block"]) == 3
    assert policy.last_decision(model)["merge"] is False
    _reset(counts)
    with torch.no_grad():
        model(x4)  # no decision for this shape: the requested r runs (CPU is never calibrated)
    assert len(counts["merge_block"]) == 3 and len(counts["merge_attn"]) == 3
    assert model._merge_info.tokens == [13, 9, 5]  # 17 tokens, r=4 per layer, CLS protected: by hand
    assert isinstance(model.blocks[0], MergeBlock) and isinstance(model.blocks[0].attn, MergeAttention)
    _reset(counts)
    with torch.no_grad():
        assert torch.equal(model(x1), expected)  # and back to timm's classes
    assert counts["merge_block"] == []
    with policy.override("force"), torch.no_grad():
        model(x1)  # forced: merges despite the decision
    assert model._merge_info.tokens == [13, 9, 5]


def test_training_runs_the_requested_r_despite_a_decision(counts):
    model = _tiny()
    mc.patch.timm(model)
    model.r = 4
    x = _images(1)
    policy.set_decision(model, x, [4, 4, 4], merge=False)
    model.train()
    model(x).sum().backward()  # autograd with trainable parameters: the policy does not apply
    assert model._merge_info.tokens == [13, 9, 5]
    assert all(p.grad is not None for p in model.blocks[0].parameters())


def test_hooks_fire_on_both_paths(counts):
    model = _tiny()
    mc.patch.timm(model)
    shapes = []
    model.blocks[2].register_forward_hook(lambda m, i, o: shapes.append(o.shape[1]))
    with torch.no_grad():
        model.r = 0
        model(_images())
        model.r = 4
        model(_images())
    assert shapes == [17, 5]


def test_merged_forward_after_r0_equals_a_model_that_never_stepped_out(counts):
    model, fresh = _tiny(), _tiny()
    mc.patch.timm(model)
    mc.patch.timm(fresh)
    fresh.r = model.r = 4
    with torch.no_grad():
        model.r = 0
        model(_images())
        model.r = 4
        got = model(_images())
        expected = fresh(_images())
    assert torch.equal(got, expected)


def test_compile_after_an_r0_forward_traces_the_merging_classes(counts):
    """An eager r = 0 forward leaves timm's classes installed; a compiled forward must still merge."""
    import torch._dynamo

    model = _tiny()
    x = _images(1)
    mc.patch.timm(model)
    model.r = 4
    with torch.no_grad():
        with policy.override("force"):
            merged = model(x).clone()
        policy.set_decision(model, x, [4, 4, 4], merge=False)
        model(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        got = compiled(x)
    torch.testing.assert_close(got, merged, atol=1e-5, rtol=1e-5)  # the compiled schedule is the requested r
    assert model._merge_info.tokens == [13, 9, 5]
    torch._dynamo.reset()


def test_deepcopy_and_remove_patch_from_the_plain_mode(counts):
    model, x = _tiny(), _images()
    with torch.no_grad():
        expected = model(x)
    mc.patch.timm(model)
    model.r = 0
    with torch.no_grad():
        model(x)
    twin = copy.deepcopy(model)
    twin.r = 4
    with torch.no_grad():
        twin(x)
    assert twin._merge_info.tokens == [13, 9, 5]
    mc.patch.remove_patch(model)
    assert type(model) is VisionTransformer and type(model.blocks[0]) is Block
    assert type(model.blocks[0].attn) is Attention
    assert not hasattr(model, "_merge_info")
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_an_exception_in_an_r0_forward_restores_the_merging_forwards(counts):
    model = _tiny()
    mc.patch.timm(model)
    model.r = 0

    def fail(module, inputs):
        raise RuntimeError("hook failure")

    handle = model.blocks[1].register_forward_pre_hook(fail)
    with torch.no_grad(), pytest.raises(RuntimeError, match="hook failure"):
        model(_images())
    assert not _stepped_out(model)
    handle.remove()
    model.r = 4
    with torch.no_grad():
        model(_images())
    assert model._merge_info.tokens == [13, 9, 5]


def test_torchvision_r0_runs_torchvisions_encoder_block(monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    from merge_core.patch.torchvision_vit import _MergeEncoderBlock

    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
    ).eval()
    block_cls = type(model.encoder.layers[0])
    x = _images()
    with torch.no_grad():
        expected = model(x)
    mc.patch.swag(model)
    adapter_calls = _counter(monkeypatch, _MergeEncoderBlock)
    library_calls = _counter(monkeypatch, block_cls)
    with torch.no_grad():
        model.r = 0
        assert torch.equal(model(x), expected)
        assert adapter_calls == [] and len(library_calls) == 3
        assert model._merge_info.tokens == [17, 17, 17]
        model.r = 4
        model(x)
    assert len(adapter_calls) == 3 and model._merge_info.tokens == [13, 9, 5]


def test_hf_r0_runs_transformers_layers(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from merge_core.patch.hf_vit import _MergeLayer

    torch.manual_seed(0)
    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model = transformers.ViTModel(transformers.ViTConfig(**cfg, image_size=32, patch_size=8)).eval()
    layer_cls = next(type(m) for m in model.modules() if type(m).__name__ == "ViTLayer")
    library_code = layer_cls.forward.__wrapped__.__code__  # transformers wraps forward (gradient checkpointing)
    x = _images()
    with torch.no_grad():
        expected = model(pixel_values=x, output_hidden_states=True)
    mc.patch.hf(model)
    adapter_code = _MergeLayer.forward.__code__
    outs = []
    with torch.no_grad():
        model.r = 0
        run = lambda: outs.append(model(pixel_values=x, output_hidden_states=True))  # noqa: E731
        assert _frames(adapter_code, run) == 0 and _frames(library_code, run) == 2
        assert torch.equal(outs[-1].last_hidden_state, expected.last_hidden_state)
        assert len(outs[-1].hidden_states) == len(expected.hidden_states) == 3
        assert model._merge_info.tokens == [17, 17]
        model.r = 3
        run = lambda: outs.append(model(pixel_values=x))  # noqa: E731
        assert _frames(adapter_code, run) == 2
    assert outs[-1].last_hidden_state.shape[1] == 17 - 6
    assert all(type(m).forward is not layer_cls.forward for m in model.modules() if isinstance(m, layer_cls))


def test_r0_intermediates_run_timms_code(counts):
    model, x = _tiny(), _images()
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
    mc.patch.timm(model)
    model.r = 0
    _reset(counts)
    with torch.no_grad():
        got = model.forward_intermediates(x, intermediates_only=True)
    assert counts["merge_block"] == [] and len(counts["block"]) == 3
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
