"""The fused merged patch attention kernel (``kernels.patch_merge_attn``) against the plain-torch oracle.

CPU: Triton's interpreter (``TRITON_INTERPRET=1``, set before the kernel module is imported) on small shapes;
bf16 is GPU-only here (the interpreter's fp32 -> bf16 cast truncates, so its matcher scores differ). The oracle
(``merge_core.patch_merge_reference``) is merge-core's ``patch_match`` + explicit softmax + ``unmerge``.
"""

from __future__ import annotations

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

from merge_core.binned import official_head_offsets  # noqa: E402
from merge_core.patch_merge_reference import merged_patch_attention_reference  # noqa: E402

try:
    from merge_core.kernels import patch_merge_attn as pma  # noqa: E402

    _TRITON_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the environment
    pma = None
    _TRITON_ERROR = f"triton kernels unavailable: {type(exc).__name__}: {exc}"

CPU_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_kernel = pytest.mark.skipif(
    _TRITON_ERROR is not None or (not CPU_INTERPRET and not torch.cuda.is_available()),
    reason=_TRITON_ERROR or "needs CUDA or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _qkv(p: int, h: int, n: int, d: int = 16, dtype=torch.float32, seed: int = 0):
    """q, k, v as the non-contiguous views of a packed (P, N, 3, H, D) qkv (PTv3's layout)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(p, n, 3, h, d, generator=g).to(dtype).to(DEVICE)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _kernel_order(ref_slot: torch.Tensor, n_unm: int, n_bins: int) -> torch.Tensor:
    """PatchMatch's slots ([unmerged, destinations]) in the kernel's order ([destinations, unmerged])."""
    return torch.where(ref_slot < n_unm, ref_slot + n_bins, ref_slot - n_unm)


def _check(q, k, v, r, stride, prop_attn="off", offsets=None, **kernel_args):
    out, n_out, slot = pma.patch_merge_attention(
        q, k, v, r, stride, prop_attn=prop_attn, offsets=offsets, return_slots=True, **kernel_args
    )
    ref_out, m = merged_patch_attention_reference(
        q, k, v, r, stride, "spread" if offsets is None else offsets, prop_attn
    )
    n_bins = q.shape[2] // stride
    assert n_out == m.num_out
    assert out.shape == q.shape and out.dtype == q.dtype
    assert out.permute(0, 2, 1, 3).is_contiguous()  # (P, N, H, D) storage: the caller's reshape is a view
    want = _kernel_order(m.slot, m.num_out - n_bins, n_bins)
    if q.is_cuda and q.dtype != torch.float32:  # GPU matmuls round differently: a last-bit near-tie may flip
        assert (slot == want).float().mean() > 0.98
        assert ((out.float() - ref_out.float()).abs() <= TOL[q.dtype]).float().mean() > 0.98
        return out, m
    assert torch.equal(slot.cpu(), want.cpu())
    torch.testing.assert_close(out.float(), ref_out.float(), atol=TOL[q.dtype], rtol=TOL[q.dtype])
    return out, m


# (N, stride, r, dtype, prop_attn): u = n_src - min(n_src, r) unmerged sources of 1, 3, 0, 1
CASES = [
    (48, 5, 38, torch.float32, "off"),
    (64, 3, 40, torch.float16, "key"),
    (100, 10, 90, torch.float32, "key"),
    (100, 5, 79, torch.float16, "off"),
]


@needs_kernel
@pytest.mark.parametrize(("n", "stride", "r", "dtype", "prop_attn"), CASES)
@pytest.mark.parametrize("path", ["single", "general"])
def test_kernel_matches_reference(n, stride, r, dtype, prop_attn, path):
    """Both kernel paths: all slots in one block (sums during matching, attention in registers) and the staged
    one (forced)."""
    q, k, v = _qkv(2, 3, n, dtype=dtype)
    _check(q, k, v, r, stride, prop_attn, force_general=path == "general")


@needs_kernel
def test_general_path_with_many_blocks():
    """16-wide blocks: several destination, slot and key blocks (online softmax across key blocks)."""
    q, k, v = _qkv(2, 3, 100, dtype=torch.float32, seed=6)
    _check(q, k, v, 64, 3, "key", config=(16, 16, 4))  # 33 destinations, 67 sources, 64 merge: N' = 36
    _check(q, k, v, 67, 3, "off", config=(32, 16, 4))


@needs_kernel
def test_kernel_sonata_stage0_shape():
    """N = 1024, stride 10, r = int(1024 * 0.9) = 921: 102 destinations, 922 sources, one stays."""
    q, k, v = _qkv(2, 3, 1024, dtype=torch.float16, seed=3)
    _, m = _check(q, k, v, 921, 10)
    assert m.num_out == 103


@needs_kernel
def test_ties_later_token_stays_and_lowest_destination_wins():
    """Duplicated tokens (PTv3's padding repeats points) score exactly equal: among equal lowest scores the
    later source stays unmerged (stable descending sort), a source equally close to two destinations joins the
    lower one (``max``'s first index)."""
    p, h, n, stride = 1, 1, 32, 4
    q, k, _ = _qkv(p, h, n)
    gen = torch.Generator().manual_seed(5)
    dst = torch.randn(n // stride, 16, generator=gen)
    dst[1] = dst[0]  # destinations 0 and 1 (positions 0, 4) identical: every score ties between them
    v = dst.repeat_interleave(stride, 0) + 0.05 * torch.randn(n, 16, generator=gen)  # sources near their bin's
    v[::stride] = dst
    v[30] = torch.randn(16, generator=gen)  # a far source (lowest score), duplicated at 31
    v[31] = v[30]
    v = v.to(DEVICE)[None, None]
    _check(q, k, v, n - n // stride - 2, stride)  # u = 2: both duplicates stay
    _, m1 = _check(q, k, v, n - n // stride - 1, stride)  # u = 1: only the later duplicate stays
    n_unm = m1.num_out - n // stride
    assert n_unm == 1 and m1.slot[0, 31] == 0 and m1.slot[0, 30] >= n_unm


@needs_kernel
def test_custom_offsets():
    q, k, v = _qkv(2, 3, 60, dtype=torch.float32, seed=1)
    offsets = torch.tensor([4, 0, 2], dtype=torch.int32, device=DEVICE)
    _check(q, k, v, 50, 6, "key", offsets=offsets)
    assert official_head_offsets(3, 6) != [4, 0, 2]


@needs_kernel
def test_unsupported_returns_none():
    q, k, v = _qkv(1, 2, 40)
    assert pma.patch_merge_attention(q, k, v, 10, 5) is None  # u = 32 - 10 = 22 > U_MAX
    assert pma.patch_merge_attention(q, k, v, 0, 5) is None  # nothing merges
    assert pma.patch_merge_attention(q[:, :, :3], k[:, :, :3], v[:, :, :3], 2, 5) is None  # N < stride
    assert pma.patch_merge_attention(q, k, v, 30, 5, prop_attn="faithful") is None
    q8 = q[..., :8]
    assert pma.patch_merge_attention(q8, q8, q8, 30, 5) is None  # head dim 8


@needs_kernel
def test_bad_input_raises():
    q, k, v = _qkv(1, 2, 40)
    with pytest.raises(ValueError, match="stride"):
        pma.patch_merge_attention(q, k, v, 30, 0)
    with pytest.raises(ValueError, match="q, k, v"):
        pma.patch_merge_attention(q, k[:, :1], v, 30, 5)
    with pytest.raises(ValueError, match="prop_attn"):
        pma.patch_merge_attention(q, k, v, 30, 5, prop_attn="nope")
    with pytest.raises(ValueError, match="offsets"):
        pma.patch_merge_attention(q, k, v, 30, 5, offsets=torch.zeros(3, dtype=torch.int32))


def test_reference_nothing_merges_is_none():
    q = torch.randn(1, 2, 4, 16)
    assert merged_patch_attention_reference(q, q, q, 2, 5) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or _TRITON_ERROR is not None, reason="needs CUDA + triton")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_gpu_stage0(dtype):
    """Sonata stage 0 on the real scene's patch count (40 x 3 x 1024 x 16), both prop_attn modes."""
    q, k, v = _qkv(40, 3, 1024, dtype=dtype, seed=7)
    for prop in ("off", "key"):
        out, n_out, slot = pma.patch_merge_attention(q, k, v, 921, 10, prop_attn=prop, return_slots=True)
        ref_out, m = merged_patch_attention_reference(q, k, v, 921, 10, "spread", prop)
        agree = (slot == _kernel_order(m.slot, m.num_out - 102, 102)).float().mean().item()
        assert n_out == 103 and agree > 0.99  # near-ties in the last bit may pick another destination
        close = ((out.float() - ref_out.float()).abs() <= 5 * TOL[dtype]).float().mean().item()
        assert close > 0.99


_AOT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from merge_core.kernels import patch_merge_attn as pma
const = ("PROP_KEY", "DOT_F32", "SINGLE", "RETURN_SLOTS", "S", "BLOCK_T", "BLOCK_S", "D", "U_PAD")
one = dict(DOT_F32=False, BLOCK_T=64, BLOCK_S=128, D=16)
cases = [
    (pma._patch_merge_attn_fwd, "fp16", dict(one, PROP_KEY=False, SINGLE=True), 8),
    (pma._patch_merge_attn_fwd, "bf16", dict(one, PROP_KEY=True, SINGLE=False, BLOCK_T=32, BLOCK_S=64), 4),
    (pma._pma_split_match, "fp16", dict(one, S=8), 4),
    (pma._pma_split_attend, "bf16", dict(one, PROP_KEY=True, RETURN_SLOTS=True, S=4, U_PAD=16), 8),
]
for k, dt, values, warps in cases:
    sig = {}
    for n in k.arg_names:
        if n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr"):
            sig[n] = "*" + dt
        elif n in ("off_ptr", "wsi_ptr"):
            sig[n] = "*i32"
        else:
            sig[n] = {"ws_ptr": "*fp32", "qk_scale": "fp32"}.get(n, "constexpr" if n in const else "i32")
    src = ASTSource(k, sig, constexprs={(k.arg_names.index(n),): v for n, v in values.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
print("compiled")
"""


@pytest.mark.skipif(_TRITON_ERROR is not None, reason=_TRITON_ERROR or "")
def test_kernel_compiles_for_sm90_without_a_gpu():
    """The interpreter misses compile-only errors (e.g. a loop-carried variable changing type): compile both
    one-program paths and both split kernels to PTX for an sm_90 target (no GPU needed), in a process
    without ``TRITON_INTERPRET``."""
    import subprocess
    import sys

    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    proc = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "No module named" in proc.stderr and "backends" in proc.stderr:
        pytest.skip("Triton's CUDA backend is not installed")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


# split variant (two launches, S programs per group): (N, stride, r, dtype, prop_attn, config); u = 1, 3, 0, 1, 1, 3
SPLIT_CASES = [
    (48, 5, 38, torch.float32, "off", (16, 16, 4, 1)),
    (48, 5, 36, torch.float32, "key", (16, 16, 4, 2)),
    (100, 10, 90, torch.float32, "key", (16, 16, 4, 4)),
    (100, 5, 79, torch.float16, "off", (16, 32, 4, 8)),  # chunk 16: the 8th program has no tokens
    (1024, 10, 921, torch.float16, "off", (64, 128, 4, 8)),
    (1024, 10, 919, torch.float32, "key", (128, 128, 4, 2)),
]


@needs_kernel
@pytest.mark.parametrize(("n", "stride", "r", "dtype", "prop_attn", "config"), SPLIT_CASES)
def test_split_variant_matches_reference(n, stride, r, dtype, prop_attn, config):
    """Match + partial sums per token chunk, then per chunk: the u picks over all scores, the correction, the
    attention and the chunk's unmerge: slots and outputs equal the oracle's."""
    q, k, v = _qkv(2, 3, n, dtype=dtype, seed=n + r)
    _check(q, k, v, r, stride, prop_attn, config=config)


@needs_kernel
@pytest.mark.parametrize("n_split", [2, 4])
def test_split_variant_ties(n_split):
    """The tie rules across chunks: equal lowest scores in different chunks (30 and 31 sit in the last chunk,
    duplicates of them in the first), the later token stays first."""
    p, h, n, stride = 1, 1, 32, 4
    q, k, _ = _qkv(p, h, n)
    gen = torch.Generator().manual_seed(5)
    dst = torch.randn(n // stride, 16, generator=gen)
    dst[1] = dst[0]
    v = dst.repeat_interleave(stride, 0) + 0.05 * torch.randn(n, 16, generator=gen)
    v[::stride] = dst
    v[30] = torch.randn(16, generator=gen)
    v[31] = v[30]
    v[2] = v[30]  # a third duplicate, in the first chunk
    v = v.to(DEVICE)[None, None]
    for u in (1, 2, 3):
        _check(q, k, v, n - n // stride - u, stride, config=(16, 16, 4, n_split))


class _Spy:
    """Counts launches of a kernel and forwards them."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@needs_kernel
def test_variant_override_and_candidates(monkeypatch):
    spy = _Spy(pma._pma_split_attend)
    monkeypatch.setattr(pma, "_pma_split_attend", spy)
    q, k, v = _qkv(2, 3, 100, dtype=torch.float32, seed=2)
    monkeypatch.setenv("MERGE_CORE_PMA_VARIANT", "split")
    _check(q, k, v, 90, 10, "off")
    assert len(spy.grids) == 1 and spy.grids[0][0] == 6 and spy.grids[0][1] >= 1
    monkeypatch.setenv("MERGE_CORE_PMA_VARIANT", "single")
    _check(q, k, v, 90, 10, "off")  # default and forced single: the one-program kernel
    monkeypatch.delenv("MERGE_CORE_PMA_VARIANT")
    _check(q, k, v, 90, 10, "off")
    assert len(spy.grids) == 1
    with pytest.raises(ValueError, match="variant"):
        pma.patch_merge_attention(q, k, v, 90, 10, variant="fast")
    # S fills ~2 waves of 132 SMs: 40 x 3 groups -> 4, 1 x 24 -> 16 (one 64-token block each), 10 x 6 -> 8
    assert [pma.split_count(g, 1024, 64) for g in (120, 24, 60, 36, 600)] == [4, 16, 8, 8, 1]
    cands = pma.candidate_configs(1024, 103, 24)
    assert len(cands) <= 5 and [c[3] for c in cands].count(0) == 3 and (64, 128, 4, 16) in cands
    assert all(c[3] == 0 for c in pma.candidate_configs(1024, 200, 24))  # N' > 128: one-program only
    assert all(c[3] == 0 for c in pma.candidate_configs(1024, 103, 600))  # S = 1: one-program only
