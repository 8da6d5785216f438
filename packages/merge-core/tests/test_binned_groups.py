"""weighted_patch grouping (both rules) and the prop-attn modes, against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from merge_core.patch_attention import patch_attention
from merge_core.patch_energy import code_scores, paper_scores, weighted_patch_groups


def test_code_scores_by_hand():
    # one head, 64 tokens of D=2: first patch all the same direction -> score 1; second alternating
    v = torch.zeros(2, 1, 64, 2)
    v[0, 0, :, 0] = 1.0
    v[1, 0, ::2, 0] = 1.0
    v[1, 0, 1::2, 1] = 1.0
    s = code_scores(v)
    assert s[0].item() == pytest.approx(1.0)
    # sub-centroid of 32 alternating tokens = (.5,.5) -> unit (1,1)/sqrt2; mean direction (.5,.5): cos-dot = 1/sqrt2
    assert s[1].item() == pytest.approx(1 / math.sqrt(2), abs=1e-6)


def test_code_rule_groups():
    g = torch.Generator().manual_seed(0)
    b = 12
    v = torch.randn(b, 2, 64, 8, generator=g)  # random tokens: score near 0 (< 0.2)
    assert weighted_patch_groups(v) is None  # p = 1 >= 0.5 -> plain patch merging
    v[:8] = torch.randn(8, 1, 1, 8, generator=g).expand(8, 2, 64, 8)  # 8 homogeneous patches, score 1
    low = weighted_patch_groups(v)
    # p = 4/12 -> num_low = ceil(12 - 4) - 1 = 7 of the 8 homogeneous patches
    assert low is not None and low.sum().item() == 7 and not low[8:].any()
    assert weighted_patch_groups(v[:10]) is None  # <= 10 patches: no split
    assert weighted_patch_groups(torch.randn(12, 2, 16, 8)) is None  # K < 32
    with pytest.raises(ValueError, match="rule must be one of"):
        weighted_patch_groups(v, rule="global")


def test_paper_rule_uses_all_centroids():
    v = torch.zeros(3, 1, 4, 2)
    v[0, 0, :, 0] = 1.0  # along x
    v[1, 0, :, 0] = 1.0  # along x
    v[2, 0, :, 1] = 1.0  # along y
    s = paper_scores(v)
    # patches 0/1: cos to centroids (x, x, y) = (1, 1, 0) -> 2/3; patch 2: (0, 0, 1) -> 1/3
    torch.testing.assert_close(s, torch.tensor([2 / 3, 2 / 3, 1 / 3]))
    assert weighted_patch_groups(v, threshold=0.5, rule="paper").tolist() == [True, True, False]


@pytest.mark.parametrize("mode", ["off", "faithful", "key"])
def test_prop_attn_modes(mode):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 16, generator=g) for _ in range(3))
    size = torch.randint(1, 5, (2, 3, 7), generator=g).float()
    out = patch_attention(q, k, v, size, prop_attn=mode)
    logits = q @ k.transpose(-1, -2) / 4.0
    plain = logits.softmax(-1) @ v
    if mode == "key":
        want = (logits + size.log()[..., None, :]).softmax(-1) @ v
        assert not torch.allclose(want, plain, atol=1e-3)
    elif mode == "faithful":
        want = (logits + size.log()[..., :, None]).softmax(-1) @ v  # per-row bias: a no-op
    else:
        want = plain
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, plain if mode != "key" else want, atol=1e-5, rtol=1e-5)


def test_prop_attn_key_equals_duplicated_keys():
    # ToMe's identity: a key of size s weighs like s copies of that key
    q, k, v = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8)
    size = torch.tensor([[[1.0, 3.0, 2.0]]])
    out = patch_attention(q, k, v, size, prop_attn="key")
    rep = torch.tensor([0, 1, 1, 1, 2, 2])
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k[:, :, rep], v[:, :, rep]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="prop_attn must be one of"):
        patch_attention(q, k, v, size, prop_attn="row")
