"""MAC counts against hand-computed values for one attention block."""

import torch

from gitmerge3d import merging
from gitmerge3d.models.point_transformer_v3m2 import SerializedAttention
from gitmerge3d.models.structure import Point
from gitmerge3d.profiling import count_macs


def one_block_point(n=200, c=16):
    order = torch.arange(n)
    return Point(
        feat=torch.randn(n, c),
        offset=torch.tensor([n]),
        serialized_order=order[None],
        serialized_inverse=order[None],
    )


def test_attention_macs_by_hand():
    c, h, k, n = 16, 2, 64, 200
    attn = SerializedAttention(c, h, k).eval()
    model = torch.nn.Sequential(attn)
    macs = count_macs(model, one_block_point(n, c))
    patches = 4  # 200 points -> padded to 256 = 4 patches of 64
    linears = n * c * 3 * c + n * c * c
    assert macs.attention == linears + 2 * patches * h * k * k * (c // h)
    merging.patch(model, {"tome": "patch", "r": 0.9, "stride": 10})
    merged = count_macs(model, one_block_point(n, c))
    kept, n_bins = 7, 6  # 64 tokens: 6 destinations, min(58, 57) merged -> 7 kept
    sim = patches * h * (k - n_bins) * n_bins * (c // h)
    assert merged.attention == linears + 2 * patches * h * kept * kept * (c // h) + sim
    assert (merged.attention_linear, merged.similarity) == (linears, sim)
