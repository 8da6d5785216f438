"""``torch.compile`` of a patched timm ViT (issue 9 target 6): one graph, no recompile on later calls, equal to eager.

The H200 round could not finish compiling a patched ViT-B within a minute. One cause found on CPU: the schedule
cache (``MergeState.schedule``) was a dict that dynamo guards on; a model compiled before any eager forward
filled it during the first trace, so the second call failed the guard and compiled the whole model again.
These tests count dynamo's graphs over three calls of a freshly patched model (compile first, as a user does).
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import merge_core as mc


def _tiny(depth: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=7)
    return timm.create_model("vit_tiny_patch16_224", **cfg).eval()


def _images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _graphs() -> int:
    return int(counters["stats"].get("unique_graphs", 0))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(("prop_attn", "r"), [(True, 4), (False, [4, 0, 2])])
def test_compiled_before_any_eager_forward_is_one_graph_without_recompiles(prop_attn, r):
    model = _tiny()
    mc.patch.timm(model, prop_attn=prop_attn)
    model.r = r
    model.merge_policy = "force"
    x = _images()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        first = compiled(x).clone()
        assert _graphs() == 1
        compiled(x)
        compiled(x)
        assert _graphs() == 1, "the second call recompiled"
        tokens = list(model._merge_info.tokens)
        expected = model(x)
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=1e-5)
    assert model._merge_info.tokens == tokens  # eager merged what the compiled forward merged
    assert tokens == ([13, 9, 5] if r == 4 else [13, 13, 11])


@pytest.mark.slow
def test_changing_r_recompiles_once_and_both_schedules_stay_cached():
    """A new ``model.r`` is a new graph (its shapes differ); going back to an old r reuses the first graph."""
    model = _tiny(depth=2)
    mc.patch.timm(model)
    model.merge_policy = "force"
    x = _images()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        model.r = 4
        a = compiled(x).clone()
        model.r = 2
        b = compiled(x).clone()
        assert _graphs() == 2
        model.r = 4
        again = compiled(x)
        model.r = 2
        compiled(x)
        assert _graphs() == 2
        model.r = 4
        expected = model(x)
    torch.testing.assert_close(again, a)
    torch.testing.assert_close(a, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, b)


def test_schedule_cache_still_serves_eager_forwards():
    """The eager schedule cache (the zero-cost path's O(1) lookup) is unchanged: one entry per form of r."""
    model = _tiny(depth=2)
    mc.patch.timm(model)
    model.r = 4
    model.merge_policy = "force"
    state = model._merge_info
    with torch.no_grad():
        model(_images())
        model(_images())
    assert (2, 4) in state._schedules
    assert state.schedule(2, 4) is state._schedules[(2, 4)] and state.schedule(2, 4) == [4, 4]


# Inductor (CPU code generation) on a patched ViT, with and without the merge_core::* ops:
# test_custom_ops.py::test_inductor_compiled_patched_vit_equals_eager_with_fewer_kernels
