"""The key-bias attention kernel (``kernels.attn_bias``) and its dispatch, on CPU under Triton's interpreter.

References are independent of the kernel: softmax(q k^T * scale + log(size)[key]) v written out in float64
torch, and plain softmax attention over physically duplicated keys (a key of size s repeated s times).
``TRITON_INTERPRET=1`` is set before the kernel module is first imported, as in ``test_kernels.py``.
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

import merge_core as mc  # noqa: E402
from merge_core import kernels  # noqa: E402
from merge_core.kernels import prop_attn  # noqa: E402
from merge_core.patch_attention import patch_attention  # noqa: E402


@pytest.fixture(autouse=True)
def _kernel_on(monkeypatch):
    """The kernel is off by default (slower than the channel path on an H200); these tests switch it on."""
    monkeypatch.setenv("MERGE_CORE_ATTN_KERNEL", "always")


try:
    from merge_core.kernels import attn_bias  # noqa: E402

    _TRITON_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the environment
    attn_bias = None
    _TRITON_ERROR = f"triton unavailable: {type(exc).__name__}: {exc}"

CPU_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    _TRITON_ERROR is not None or not CPU_INTERPRET,
    reason=_TRITON_ERROR or "CPU kernel tests need TRITON_INTERPRET=1 (set automatically when no CUDA)",
)


def _inputs(b, h, n, d, dtype, seed=0, nk=None, max_size=5):
    g = torch.Generator().manual_seed(seed)
    nk = n if nk is None else nk
    q = torch.randn(b, h, n, d, generator=g).to(dtype)
    k = torch.randn(b, h, nk, d, generator=g).to(dtype)
    v = torch.randn(b, h, nk, d, generator=g).to(dtype)
    size = torch.randint(1, max_size, (b, nk), generator=g).to(dtype)
    return q, k, v, size


def _reference(q, k, v, log_bias, scale):
    """softmax(q k^T * scale + bias) v in float64; ``log_bias`` broadcast as (B, 1|H, 1, Nk)."""
    scores = q.double() @ k.double().transpose(-2, -1) * scale + log_bias.double()
    return torch.softmax(scores, dim=-1) @ v.double()


def _duplicated(q, k, v, size, scale):
    """Plain softmax attention where a key of integer size s appears s times (what prop. attention means)."""
    outs = []
    for b in range(q.shape[0]):
        counts = size[b].long()
        k_dup = k[b].double().repeat_interleave(counts, dim=-2)
        v_dup = v[b].double().repeat_interleave(counts, dim=-2)
        outs.append(torch.softmax(q[b].double() @ k_dup.transpose(-2, -1) * scale, dim=-1) @ v_dup)
    return torch.stack(outs)


TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@needs_interpreter
@pytest.mark.parametrize("n", [1, 17, 64, 130])
@pytest.mark.parametrize("d", [32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_float64_reference_and_duplicated_keys(n, d, dtype):
    q, k, v, size = _inputs(2, 2, n, d, dtype, seed=n + d)
    scale = d**-0.5
    out = attn_bias.bias_attention(q, k, v, size=size, scale=scale)
    assert out.shape == q.shape and out.dtype == dtype
    expected = _reference(q, k, v, size.double().log()[:, None, None, :], scale)
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(out.double(), _duplicated(q, k, v, size, scale), rtol=tol, atol=tol)


@needs_interpreter
def test_kernel_tail_block_and_block_config():
    """N = 130 with 64-wide key blocks: the last block has 2 real keys and 62 padded ones (weight 0)."""
    q, k, v, size = _inputs(2, 2, 130, 32, torch.float32, seed=3)
    expected = _reference(q, k, v, size.double().log()[:, None, None, :], 0.2)
    for config in [(64, 64, 4, 2), (128, 64, 8, 3), (32, 32, 4, 1)]:
        out = attn_bias.bias_attention(q, k, v, size=size, scale=0.2, config=config)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_kernel_strided_qkv_from_timm_reshape_and_head_dims():
    """q/k/v as views of one (B, N, 3, H, D) projection (timm's layout), head dims 16 and 80 (padded block)."""
    for d in (16, 80):
        b, n, h = 2, 19, 3
        qkv = torch.randn(b, n, 3 * h * d, generator=torch.Generator().manual_seed(d))
        q, k, v = qkv.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        assert not q.is_contiguous()
        size = torch.rand(b, n, 1) * 3 + 0.5  # fractional sizes: the bias is log(size), no duplication
        out = attn_bias.bias_attention(q, k, v, size=size, scale=0.1)
        expected = _reference(q, k, v, size[..., 0].double().log()[:, None, None, :], 0.1)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
        # the output is a (B, H, N, D) view of (B, N, H, D): the head merge needs no copy
        assert out.transpose(1, 2).is_contiguous()


@needs_interpreter
def test_kernel_bias_per_head_cross_attention_and_no_bias():
    """An additive bias per (batch, head, key), more keys than queries, and no bias at all."""
    q, k, v, _ = _inputs(2, 3, 5, 32, torch.float32, seed=7, nk=70)
    bias = torch.randn(2, 3, 70, generator=torch.Generator().manual_seed(1))
    bias[0, 1, :40] = float("-inf")  # masked keys get weight 0
    out = attn_bias.bias_attention(q, k, v, bias=bias, scale=0.3)
    torch.testing.assert_close(out.double(), _reference(q, k, v, bias[:, :, None, :], 0.3), rtol=1e-5, atol=1e-5)
    plain = attn_bias.bias_attention(q, k, v, scale=0.3)
    zero = torch.zeros(2, 1, 1, 70)
    torch.testing.assert_close(plain.double(), _reference(q, k, v, zero, 0.3), rtol=1e-5, atol=1e-5)


def test_kernel_rejects_bad_arguments():
    if attn_bias is None:
        pytest.skip(_TRITON_ERROR)
    q, k, v, size = _inputs(1, 2, 4, 32, torch.float32)
    with pytest.raises(ValueError, match="head dim must be one of"):
        attn_bias.bias_attention(q[..., :24], k[..., :24], v[..., :24], size=size)
    with pytest.raises(ValueError, match="size must be"):
        attn_bias.bias_attention(q, k, v, size=size[:, :3])
    with pytest.raises(ValueError, match="give size or bias"):
        attn_bias.bias_attention(q, k, v, size=size, bias=size)
    with pytest.raises(ValueError, match="share a dtype"):
        attn_bias.bias_attention(q.half(), k, v, size=size)


def _spy(monkeypatch) -> list[tuple]:
    """Record calls of the kernel entry point (the real kernel still runs)."""
    calls: list[tuple] = []
    real = attn_bias.bias_attention

    def spy(*args, **kwargs):
        calls.append(tuple(a.shape for a in args))
        return real(*args, **kwargs)

    monkeypatch.setattr(attn_bias, "bias_attention", spy)
    return calls


@needs_interpreter
def test_inference_dispatch_picks_kernel(monkeypatch):
    """kernel_mode('always') stands in for CUDA: inference goes through the kernel and stays exact."""
    calls = _spy(monkeypatch)
    q, k, v, size = _inputs(2, 2, 17, 32, torch.float16, seed=5)
    with kernels.kernel_mode("always"), torch.no_grad():
        out = mc.proportional_attention(q, k, v, size[..., None])
    assert len(calls) == 1
    torch.testing.assert_close(out.double(), _duplicated(q, k, v, size, 32**-0.5), rtol=2e-3, atol=2e-3)
    # off switch, auto mode on CPU, explicit backends, dropout: no kernel
    with kernels.kernel_mode("always"), torch.no_grad():
        with prop_attn.attn_kernel_mode("never"):
            mc.proportional_attention(q.float(), k.float(), v.float(), size.float())
        mc.proportional_attention(q.float(), k.float(), v.float(), size.float(), backend="sdpa")
        mc.proportional_attention(q.float(), k.float(), v.float(), size.float(), dropout_p=0.1)
    with torch.no_grad():
        mc.proportional_attention(q.float(), k.float(), v.float(), size.float())  # mode auto: CPU tensors
    assert len(calls) == 1


def test_dispatch_rule():
    q = torch.randn(2, 2, 8, 32, dtype=torch.float16)
    assert not prop_attn.use_bias_kernel((q,), 32)  # CPU under the default mode
    with kernels.kernel_mode("always"):
        assert prop_attn.use_bias_kernel((q, q, q, None), 32) == (attn_bias is not None)
        assert not prop_attn.use_bias_kernel((q,), 24)  # head dim
        assert not prop_attn.use_bias_kernel((q,), 32, dropout_p=0.1)
        assert not prop_attn.use_bias_kernel((q.to(torch.float64),), 32)
        leaf = q.clone().requires_grad_()
        assert not prop_attn.use_bias_kernel((q, leaf), 32)  # autograd would record: exact path
        with torch.no_grad():
            assert prop_attn.use_bias_kernel((q, leaf), 32) == (attn_bias is not None)
    with kernels.kernel_mode("never"):
        assert not prop_attn.use_bias_kernel((q,), 32)
    with pytest.raises(ValueError, match="mode must be one of"):
        with prop_attn.attn_kernel_mode("sometimes"):
            pass


@needs_interpreter
def test_autograd_falls_back_with_correct_gradients(monkeypatch):
    """With requires_grad the kernel (no backward) is skipped; gradients equal float64 autograd of the formula."""
    calls = _spy(monkeypatch)
    q, k, v, size = _inputs(2, 2, 9, 32, torch.float32, seed=11)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    with kernels.kernel_mode("always"):
        out = mc.proportional_attention(q, k, v, size)
    assert not calls
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * weights).sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _reference(q64, k64, v64, size.double().log()[:, None, None, :], 32**-0.5)
    (ref * weights.double()).sum().backward()
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@needs_interpreter
def test_patch_attention_key_mode_uses_kernel_with_per_head_sizes(monkeypatch):
    """GitMerge3D-style callers: (patches, heads, N', D) with one size per (patch, head, slot)."""
    calls = _spy(monkeypatch)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(3, 2, 11, 16, generator=g) for _ in range(3))
    size = torch.randint(1, 4, (3, 2, 11), generator=g).float()
    with kernels.kernel_mode("always"), torch.no_grad():
        out = patch_attention(q, k, v, size, "key", scale=0.25)
        out3 = patch_attention(q[:, 0], k[:, 0], v[:, 0], size[:, 0], "key", scale=0.25)
    assert len(calls) == 2
    expected = _reference(q, k, v, size.double().log()[:, :, None, :], 0.25)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out3.double(), expected[:, 0], rtol=1e-5, atol=1e-5)
    dup = torch.stack(
        [_duplicated(q[:, h : h + 1], k[:, h : h + 1], v[:, h : h + 1], size[:, h], 0.25)[:, 0] for h in range(2)], 1
    )
    torch.testing.assert_close(out.double(), dup, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_timm_qkv_path_uses_kernel_in_inference(monkeypatch):
    """The timm adapter's qkv path: inference -> kernel on the unpadded projection; training -> padded channel."""
    from timm.models.vision_transformer import Attention

    calls = _spy(monkeypatch)
    torch.manual_seed(0)
    attn = Attention(64, num_heads=2, qkv_bias=True).eval()
    x = torch.randn(2, 13, 64)
    size = torch.randint(1, 4, (2, 13, 1)).float()
    q, k, v = attn.qkv(x).reshape(2, 13, 3, 2, 32).permute(2, 0, 3, 1, 4).detach().unbind(0)
    expected = _duplicated(q, k, v, size[..., 0], attn.scale)
    with kernels.kernel_mode("always"):
        with torch.no_grad():
            out, k_out = prop_attn.qkv_channel_attention(attn, x, size)
        assert len(calls) == 1
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k_out, k)
        train_out, _ = prop_attn.qkv_channel_attention(attn, x, size)  # grad enabled: weights require grad
        assert len(calls) == 1
    torch.testing.assert_close(train_out.double(), expected, rtol=1e-4, atol=1e-5)
    train_out.sum().backward()
    assert attn.qkv.weight.grad is not None and attn.qkv.weight.grad.abs().sum() > 0


@needs_interpreter
def test_tuning_picks_a_candidate_once_and_stays_exact(monkeypatch):
    """MERGE_CORE_ATTN_TUNE=1 tunes on CPU too: the kept config is one of the candidates, cached per shape class;
    =0 uses the heuristic and caches nothing; a malformed MERGE_CORE_ATTN_CONFIG is rejected."""
    candidates = ((32, 32, 4, 1), (64, 64, 4, 1))
    monkeypatch.setattr(attn_bias, "candidate_configs", lambda head_dim: candidates)
    monkeypatch.setattr(attn_bias, "_tuned", {})
    q, k, v, size = _inputs(2, 2, 40, 32, torch.float32, seed=9)
    key = attn_bias.tune_key(q, 40, True, False)
    expected = _reference(q, k, v, size.double().log()[:, None, None, :], 0.2)
    monkeypatch.setenv("MERGE_CORE_ATTN_TUNE", "0")
    out = attn_bias.bias_attention(q, k, v, size=size, scale=0.2)
    assert attn_bias.tuned_config(key) is None
    monkeypatch.setenv("MERGE_CORE_ATTN_TUNE", "1")
    out = attn_bias.bias_attention(q, k, v, size=size, scale=0.2)
    assert attn_bias.tuned_config(key) in candidates
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("MERGE_CORE_ATTN_CONFIG", "64,64")
    with pytest.raises(ValueError, match="MERGE_CORE_ATTN_CONFIG must be"):
        attn_bias.bias_attention(q, k, v, size=size)


def test_kernel_is_off_by_default(monkeypatch):
    """Measured slower than the padded-qkv channel path on an H200, so nothing picks it unless asked."""
    monkeypatch.delenv("MERGE_CORE_ATTN_KERNEL", raising=False)
    q = torch.randn(1, 2, 5, 32, dtype=torch.float16)
    with kernels.kernel_mode("always"), torch.no_grad():
        assert prop_attn.attn_kernel_mode_now() == "never"
        assert not prop_attn.use_bias_kernel((q, q, q, None), 32)
        with prop_attn.attn_kernel_mode("always"):
            assert prop_attn.use_bias_kernel((q, q, q, None), 32) == (attn_bias is not None)
