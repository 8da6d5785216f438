import pytest
import torch

import merge_core as mc
from merge_core.attention import choose_backend


def _qkv(b=2, h=3, n=9, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    size = torch.randint(1, 5, (b, n, 1), generator=g).float()
    return q, k, v, size


def _duplicated_keys_attention(q, k, v, size, scale):
    """Plain softmax attention where a key of size s appears s times: what proportional attention means."""
    outs = []
    for b in range(q.shape[0]):
        counts = size[b].reshape(-1).long()
        k_dup = k[b].repeat_interleave(counts, dim=-2).double()
        v_dup = v[b].repeat_interleave(counts, dim=-2).double()
        outs.append(torch.softmax(q[b].double() @ k_dup.transpose(-2, -1) * scale, dim=-1) @ v_dup)
    return torch.stack(outs).to(q.dtype)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "flex", "channel", "auto"])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_backends_equal_attention_over_duplicated_keys(backend, scale):
    """Every backend (batch > 1, different sizes per batch row, custom scale) against duplicated keys."""
    q, k, v, size = _qkv(b=3, n=7)
    expected = _duplicated_keys_attention(q, k, v, size, q.shape[-1] ** -0.5 if scale is None else scale)
    out = mc.proportional_attention(q, k, v, size, backend=backend, scale=scale)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_size_none_equals_hand_written_softmax():
    """size=None is attention with every size 1: softmax(q k^T / sqrt(d)) v, written out here."""
    q, k, v, _ = _qkv()
    expected = torch.softmax(q.double() @ k.double().transpose(-2, -1) / 4.0, dim=-1) @ v.double()  # d=16
    torch.testing.assert_close(mc.proportional_attention(q, k, v, None), expected.float(), rtol=1e-5, atol=1e-5)
    ones = torch.ones(q.shape[0], q.shape[2])
    torch.testing.assert_close(mc.proportional_attention(q, k, v, ones), expected.float(), rtol=1e-5, atol=1e-5)


def test_choose_backend_uses_its_inputs():
    q = torch.randn(2, 3, 9, 16)
    assert choose_backend(q) == "sdpa"  # CPU: the float mask (no FlashAttention to keep)
    assert choose_backend(q, dropout_p=0.1) == "sdpa"
    with pytest.raises(ValueError, match="dropout_p must be in"):
        choose_backend(q, dropout_p=1.5)


def test_bad_inputs():
    q, k, v, size = _qkv()
    with pytest.raises(ValueError, match="backend must be one of"):
        mc.proportional_attention(q, k, v, size, backend="fast")
    with pytest.raises(ValueError, match="size must have shape"):
        mc.proportional_attention(q, k, v, size[:, :4])
    with pytest.raises(ValueError, match="q, k must be"):
        mc.proportional_attention(q[0], k[0], v[0], size)


def test_device_mismatch_is_named():
    q, k, v, size = _qkv()
    with pytest.raises(ValueError, match="size is on meta but q is on cpu"):
        mc.proportional_attention(q, k, v, size.to("meta"))
