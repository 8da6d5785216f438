"""The one-launch fused merged attend (merge-core's ``kernels.patch_merge_attn``) wired into ``_merged``.

CPU: the kernel runs on Triton's interpreter (``TRITON_INTERPRET=1`` before the kernel module is imported) under
merge-core's ``kernel_mode("always")``; the reference is the same attend with ``fused_attend(False)`` (the eager
torch path) and gitmerge3d's own ``spread_slots`` matcher.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:  # torch may have imported triton already; newer triton reads the flag through ``knobs``
        import triton

        if os.environ["TRITON_INTERPRET"] == "1" and hasattr(triton, "knobs"):
            triton.knobs.runtime.interpret = True
    except Exception:  # pragma: no cover - no triton: the kernel tests skip below
        pass

from gitmerge3d import merging  # noqa: E402
from gitmerge3d.models import PointTransformerV3  # noqa: E402
from gitmerge3d.models.point_transformer_v3m2 import SerializedAttention  # noqa: E402
from gitmerge3d.models.presets import reduced_config  # noqa: E402
from merge_core import kernels  # noqa: E402

try:
    from merge_core.kernels import patch_merge_attn as pma  # noqa: E402

    _TRITON_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the environment
    pma = None
    _TRITON_ERROR = f"triton kernels unavailable: {type(exc).__name__}: {exc}"

needs_kernel = pytest.mark.skipif(
    _TRITON_ERROR is not None or (os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available()),
    reason=_TRITON_ERROR or "needs CUDA or TRITON_INTERPRET=1",
)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODE = "auto" if DEVICE.type == "cuda" else "always"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# the fused attend takes fp16/bf16 on CUDA (fp32 only on the interpreter)
FP32_OR_HALF = torch.float16 if DEVICE.type == "cuda" else torch.float32


def _attn(n: int, heads: int = 3, d: int = 16, **info) -> SerializedAttention:
    attn = SerializedAttention(heads * d, heads, n).eval()
    merging.patch(torch.nn.Sequential(attn), {"tome": "patch"} | info)
    return attn


def _qkv(p: int, heads: int, n: int, d: int = 16, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(p * n, 3 * heads * d, generator=g).to(DEVICE, dtype)
    return qkv.reshape(p, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)


class _Calls:
    """Counts calls of the fused kernel's entry point (to see which path ``_merged`` took)."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = pma.patch_merge_attention

        def counted(*args, **kwargs):
            self.n += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(pma, "patch_merge_attention", counted)


def _both(attn, q, k, v, r, stride, bias=None):
    """(fused, torch path) results of ``_merged`` without autograd; the torch path also uses merge-core's torch
    matcher (``kernel_mode("never")``: independent of Triton, and fast on a CPU)."""
    with torch.no_grad():
        with kernels.kernel_mode(MODE):
            got = attn._merged(q, k, v, bias, r, stride)
        with kernels.kernel_mode("never"), merging.fused_attend(False):
            ref = attn._merged(q, k, v, bias, r, stride)
    return got, ref


@needs_kernel
@pytest.mark.parametrize(
    ("n", "dtype", "info"),
    [
        (100, torch.float32, {"r": 0.9}),  # stride 10: 10 destinations, 90 sources, all merge (u = 0)
        (64, torch.float16, {"r": 0.9, "prop_attn": "key"}),  # 6 destinations, 58 sources, 57 merge (u = 1)
        (48, torch.float32, {"r": 0.7, "stride": 3}),  # 16 destinations, 32 sources, 33 -> all merge
        (100, torch.float16, {"r": 0.77, "stride": 5, "prop_attn": "key"}),  # 80 sources, 77 merge (u = 3)
    ],
)
def test_fused_equals_torch_path(monkeypatch, n, dtype, info):
    dtype = FP32_OR_HALF if dtype == torch.float32 else dtype
    attn = _attn(n, **info)
    stride = attn._merge_info.extra["gitmerge3d"].stride
    r = int(n * info["r"])
    q, k, v = _qkv(2, 3, n, dtype=dtype)
    calls = _Calls(monkeypatch)
    (got, kept), (ref, kept_ref) = _both(attn, q, k, v, r, stride)
    assert calls.n == 1 and kept == kept_ref
    assert got.shape == ref.shape and got.dtype == ref.dtype and got.transpose(1, 2).is_contiguous()
    if DEVICE.type == "cuda" and dtype != torch.float32:  # a last-bit near-tie may move a token on a GPU
        assert ((got.float() - ref.float()).abs() <= TOL[dtype]).float().mean() > 0.98
    else:
        torch.testing.assert_close(got.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@needs_kernel
def test_kernel_slots_equal_spread_slots():
    """The kernel's slot map is ``spread_slots``' (destinations first, then unmerged sources by score)."""
    q, k, v = _qkv(2, 3, 100, seed=4)
    for r, stride in ((88, 10), (77, 5), (60, 3)):
        with kernels.kernel_mode("never"):
            want, n_out = merging.spread_slots(v, r, stride)
        _, got_n, got = pma.patch_merge_attention(q, k, v, r, stride, return_slots=True)
        assert got_n == n_out and torch.equal(got.cpu(), want.cpu())


@needs_kernel
def test_split_variant_through_merged_equals_torch_path(monkeypatch):
    """``MERGE_CORE_PMA_VARIANT=split`` (kernel v2: S programs per (patch, head), two launches) under ``_merged``:
    the torch path's output and ``spread_slots``' groups (u = 3 unmerged sources, prop_attn key)."""
    monkeypatch.setenv("MERGE_CORE_PMA_VARIANT", "split")
    launches = []
    real = pma._pma_split_attend

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(pma, "_pma_split_attend", Spy())
    attn = _attn(100, r=0.77, stride=5, prop_attn="key")
    q, k, v = _qkv(2, 3, 100, dtype=torch.float16, seed=8)
    (got, kept), (ref, kept_ref) = _both(attn, q, k, v, 77, 5)
    assert len(launches) == 1 and launches[0][1] >= 2 and kept == kept_ref
    if DEVICE.type == "cuda":
        assert ((got.float() - ref.float()).abs() <= TOL[torch.float16]).float().mean() > 0.98
    else:
        torch.testing.assert_close(got.float(), ref.float(), atol=TOL[torch.float16], rtol=TOL[torch.float16])
    with kernels.kernel_mode("never"):
        want, n_out = merging.spread_slots(v, 77, 5)
    _, got_n, got_slots = pma.patch_merge_attention(q, k, v, 77, 5, return_slots=True, config=(32, 32, 4, 4))
    assert got_n == n_out and (got_slots.cpu() == want.cpu()).float().mean() > (0.98 if q.is_cuda else 0.9999)


@needs_kernel
def test_weighted_patch_fused_equals_torch_path(monkeypatch):
    """``weighted_patch`` calls ``_merged`` for both patch groups: both take the kernel (low group: u = 0)."""
    attn = _attn(64, tome="weighted_patch", r=0.9, stride=10)
    g = torch.Generator().manual_seed(0)
    q, k, v = _qkv(12, 3, 64, dtype=FP32_OR_HALF, seed=2)
    v = v.clone()
    v[3:11] = torch.randn(8, 1, 1, 16, generator=g).to(DEVICE, v.dtype).expand(8, 3, 64, 16)  # homogeneous
    calls = _Calls(monkeypatch)
    with torch.no_grad(), kernels.kernel_mode(MODE):
        got = attn.attend(q, k, v, None, None)
        assert calls.n == 2
    with torch.no_grad(), kernels.kernel_mode("never"), merging.fused_attend(False):
        ref = attn.attend(q, k, v, None, None)
    fused_rec, torch_rec = attn._merge_info.extra["layers"][-2:]
    assert fused_rec == torch_rec and fused_rec.group_patches[1] > 0  # both groups non-empty
    torch.testing.assert_close(got, ref, atol=TOL[v.dtype], rtol=TOL[v.dtype])


@needs_kernel
@pytest.mark.parametrize(
    ("case", "info"),
    [
        ("bias", {"r": 0.9}),
        ("mean_head", {"r": 0.9, "mean_head": True}),
        ("faithful", {"r": 0.9, "prop_attn": "faithful"}),
        ("random", {"r": 0.9, "no_rand": False}),
        ("many_unmerged", {"r": 0.5, "stride": 10}),  # 54 sources, 30 merge: u = 24 > U_MAX
        ("switched_off", {"r": 0.9}),
        ("grad", {"r": 0.9}),
        ("auto_on_cpu", {"r": 0.9}),
        ("head_dim_8", {"r": 0.9}),
    ],
)
def test_fallbacks_take_the_torch_path(monkeypatch, case, info):
    if case == "auto_on_cpu" and DEVICE.type == "cuda":
        pytest.skip("CPU-only case")
    n, d = 60, 8 if case == "head_dim_8" else 16
    attn = _attn(n, heads=2, d=d, **info)
    stride = attn._merge_info.extra["gitmerge3d"].stride
    r = int(n * info["r"])
    q, k, v = _qkv(1, 2, n, d=d, dtype=FP32_OR_HALF)
    bias = torch.randn(1, 2, n, n, device=DEVICE, dtype=q.dtype) if case == "bias" else None
    calls = _Calls(monkeypatch)
    mode = "auto" if case == "auto_on_cpu" else MODE
    with kernels.kernel_mode(mode), merging.fused_attend(case != "switched_off"):
        if case == "grad":
            q = q.detach().requires_grad_(True)
            out, _ = attn._merged(q, k, v, None, r, stride)
            assert out.requires_grad
        else:
            with torch.no_grad():
                attn._merged(q, k, v, bias, r, stride)
    assert calls.n == 0


def test_switch_and_context_restore():
    before = merging._FUSED_ON
    with merging.fused_attend(not before):
        assert merging._FUSED_ON is (not before)
    assert merging._FUSED_ON is before
    with pytest.raises(TypeError, match="enabled must be a bool"):
        merging.set_fused_attend(1)


@needs_kernel
def test_graph_cache_wraps_the_fused_kernel(monkeypatch):
    """With graphs on, the cached graph's function is ``_merged``, which takes the fused kernel (a replay costs
    less host time than the launch); the graph key separates fused on / off."""
    attn = _attn(100, r=0.9)
    q, k, v = _qkv(2, 3, 100, dtype=FP32_OR_HALF)
    captured = []

    class Recorder:
        def __init__(self, fn, q, k, v):
            captured.append(fn)
            self.fn = fn

        def __call__(self, q, k, v):
            return self.fn(q, k, v)

    calls = []
    module = merging._fused_kernel()
    real = module.patch_merge_attention
    monkeypatch.setattr(module, "patch_merge_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(merging, "AttendGraph", Recorder)
    monkeypatch.setattr(merging, "_graph_device", lambda q: True)
    with torch.no_grad(), kernels.kernel_mode(MODE), merging.attend_graphs(True):
        attn.attend(q, k, v, None, None)
        with merging.fused_attend(False):
            attn.attend(q, k, v, None, None)
    assert len(captured) == 2  # one graph per fused setting
    assert len(calls) == 1  # the fused-on graph's function ran the kernel, the fused-off one did not


def _model(seed: int = 0, **info) -> PointTransformerV3:
    """A reduced Sonata whose heads are 16 wide (the kernel's smallest head dim), merged at ``info``."""
    torch.manual_seed(seed)
    cfg = reduced_config(
        "0c",
        shuffle_orders=False,
        enc_channels=(32, 32, 64, 64, 64),
        dec_channels=(32, 32, 64, 64),
        enc_num_head=(2, 2, 4, 4, 4),
        dec_num_head=(2, 2, 4, 4),
    )
    model = PointTransformerV3(**cfg).eval()
    merging.patch(model, {"tome": "patch"} | info)
    return model


@needs_kernel
@pytest.mark.skipif(DEVICE.type == "cuda", reason="fp32 model: the CUDA end-to-end check is gpu_fused_attend.sh")
def test_model_forward_fused_equals_torch_path(make_points, monkeypatch):
    """A whole merged forward (encoder + decoder, every block on the kernel): same output and kept tokens."""
    model, pts = _model(r=0.9), make_points(300)
    calls = _Calls(monkeypatch)
    with torch.no_grad(), kernels.kernel_mode("always"):
        got = model(copy.deepcopy(pts))["feat"]
        records = [(rec.name, rec.kept) for rec in merging.layer_records(model)]
        tokens = list(merging.merge_state(model).tokens)
        assert calls.n == len(records) > 0
    with torch.no_grad(), kernels.kernel_mode("never"), merging.fused_attend(False):
        ref = model(copy.deepcopy(pts))["feat"]
    assert records == [(rec.name, rec.kept) for rec in merging.layer_records(model)]
    assert tokens == list(merging.merge_state(model).tokens)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or _TRITON_ERROR is not None, reason="needs CUDA + triton")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_attend_cuda_stage0(dtype):
    """Sonata stage 0 (40 x 3 x 1024 x 16): fused vs the eager path, and under the graph switch."""
    attn = _attn(1024, r=0.9).to(DEVICE, dtype)
    q, k, v = _qkv(40, 3, 1024, dtype=dtype, seed=9)
    (got, kept), (ref, kept_ref) = _both(attn, q, k, v, 921, 10)
    assert kept == kept_ref == 103
    close = ((got.float() - ref.float()).abs() <= 5 * TOL[dtype]).float().mean().item()
    assert close > 0.99  # last-bit near-ties may pick another destination for a few tokens
    with torch.no_grad(), merging.attend_graphs(True):
        again = attn.attend(q, k, v, None, None)
    assert torch.equal(again, got) and "attend_graphs" not in attn._merge_info.extra


def test_host_cost_nofused_row_switches_the_kernel_off():
    from gitmerge3d.tools import host_cost

    assert host_cost.parse_row("patch@0.9+graph+nofused") == ("patch", 0.9, {"graph", "nofused"})
    before = merging._FUSED_ON
    with host_cost.ablated({"nofused"}):
        assert merging._FUSED_ON is False
    assert merging._FUSED_ON is before
