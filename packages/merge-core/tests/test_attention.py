import pytest
import torch

import merge_core as mc
from merge_core.attention import reference_attention


def _qkv(b=2, h=3, n=9, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    size = torch.randint(1, 5, (b, n, 1), generator=g).float()
    return q, k, v, size


@pytest.mark.parametrize("backend", ["reference", "sdpa", "flex", "channel", "auto"])
def test_backends_agree(backend):
    q, k, v, size = _qkv()
    expected = reference_attention(q, k, v, size[..., 0].log(), q.shape[-1] ** -0.5)
    out = mc.proportional_attention(q, k, v, size, backend=backend)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "channel"])
def test_equals_attention_over_duplicated_keys(backend):
    """A key of size s must act exactly like s identical copies of that key."""
    q, k, v, size = _qkv(b=1, n=6)
    counts = size[0, :, 0].long()
    k_dup = k.repeat_interleave(counts, dim=-2)
    v_dup = v.repeat_interleave(counts, dim=-2)
    plain = torch.softmax(q @ k_dup.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v_dup
    out = mc.proportional_attention(q, k, v, size, backend=backend)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


def test_size_none_is_plain_sdpa():
    q, k, v, _ = _qkv()
    out = mc.proportional_attention(q, k, v, None)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


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
