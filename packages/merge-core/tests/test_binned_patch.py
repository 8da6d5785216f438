"""GitMerge3D's official patch matcher (merge_core.binned.patch_match) against a per-group loop
reference written from the official algorithm's description, plus counts and edge cases."""

import pytest
import torch

from merge_core.binned import binned_patch_matching, kept_tokens, official_head_offsets, patch_match


def reference(metric, x, r, stride, offsets):
    """One (patch, head) group at a time, in plain python: returns (merged, unmerged-back)."""
    n = metric.shape[0]
    n_bins = n // stride
    dst = [j * stride + offsets[j] for j in range(n_bins)]
    src = [i for i in range(n) if i not in dst]
    m = metric / metric.norm(dim=-1, keepdim=True)
    best, match = [], []
    for s in src:
        scores = [float(m[s] @ m[d]) for d in dst]
        top = max(scores)
        best.append(top)
        match.append(scores.index(top))
    rank = sorted(range(len(src)), key=lambda i: -best[i])  # python's sort is stable
    r_eff = min(len(src), r)
    merged, unmerged = rank[:r_eff], rank[r_eff:]
    groups = {j: [dst[j]] for j in range(n_bins)}
    for i in merged:
        groups[match[i]].append(src[i])
    out = [x[src[i]] for i in unmerged] + [x[groups[j]].mean(0) for j in range(n_bins)]
    out = torch.stack(out)
    back = torch.empty_like(x)
    for slot, i in enumerate(unmerged):
        back[src[i]] = out[slot]
    for j in range(n_bins):
        back[groups[j]] = out[len(unmerged) + j]
    return out, back


@pytest.mark.parametrize("n,r,stride,heads", [(40, 30, 4, 3), (37, 20, 5, 2), (64, 60, 3, 4), (30, 5, 10, 1)])
def test_faithful_matches_reference(n, r, stride, heads):
    g = torch.Generator().manual_seed(n + r)
    metric = torch.randn(2, heads, n, 6, generator=g)
    x = torch.randn(2, heads, n, 3, generator=g)
    merge, unmerge = binned_patch_matching(metric, r, stride, dst_offset="spread")
    got = merge(x)
    offs = official_head_offsets(heads, stride)
    for b in range(2):
        for h in range(heads):
            want, back = reference(metric[b, h], x[b, h], r, stride, [offs[h]] * (n // stride))
            torch.testing.assert_close(got[b, h], want)
            torch.testing.assert_close(unmerge(got)[b, h], back)


def test_random_offsets_match_reference_with_same_draw():
    metric = torch.randn(3, 2, 50, 4, generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 2, 50, 2, generator=torch.Generator().manual_seed(2))
    offsets = torch.randint(0, 5, (3, 2, 10), generator=torch.Generator().manual_seed(3))
    got = patch_match(metric, 40, 5, dst_offset="random", generator=torch.Generator().manual_seed(3)).merge(x)
    for b in range(3):
        for h in range(2):
            want, _ = reference(metric[b, h], x[b, h], 40, 5, offsets[b, h].tolist())
            torch.testing.assert_close(got[b, h], want)


def test_official_offsets_and_kept_counts():
    assert official_head_offsets(3, 10) == [0, 3, 6]
    assert official_head_offsets(24, 10)[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert official_head_offsets(2, 20) == [0, 10]
    # issue figures: r=0.9/stride 10 keeps 103 of 1024; r=0.7/stride 3 on 128 tokens keeps 42
    assert kept_tokens(1024, 0.9, 10) == 103
    assert kept_tokens(128, 0.7, 3) == 42
    assert [kept_tokens(1024, r, s) for r, s in ((0.7, 3), (0.7, 4), (0.8, 5), (0.95, 20))] == [341, 308, 205, 52]
    assert kept_tokens(1024, 1024 - 32, 32) == 32  # weighted_patch's low group
    m = patch_match(torch.randn(2, 3, 1024, 8), int(1024 * 0.9), 10)
    assert m.merge(torch.randn(2, 3, 1024, 4)).shape == (2, 3, 103, 4)
    assert torch.all(m.sizes().sum(-1) == 1024)


def test_merge_modes_and_sizes():
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]]])  # bins of 2, dst at offset 0
    m = patch_match(metric, 2, 2, dst_offset=0)
    x = torch.tensor([[[10.0], [0.0], [2.0], [6.0]]])
    # destinations: tokens 0 (x) and 2 (x-ish); both sources merge (r=2), token 3 (y-ish) goes to token 2
    out = m.merge(x)
    sizes = m.sizes()
    assert out.shape == (1, 2, 1) and sizes.sum() == 4
    torch.testing.assert_close(m.merge(x, "sum").sum(), x.sum())
    assert m.merge(x, "amax").max() == 10.0
    with pytest.raises(ValueError, match="mode must be"):
        m.merge(x, "median")
    with pytest.raises(ValueError, match="x must have shape"):
        m.merge(torch.zeros(1, 5, 1))


def test_nothing_to_merge_and_bad_arguments():
    metric = torch.randn(2, 8, 4)
    assert patch_match(metric, 0, 2) is None
    assert patch_match(metric, 5, 10) is None  # fewer tokens than one bin: no destination
    merge, unmerge = binned_patch_matching(metric, 0, 2)
    x = torch.randn(2, 8, 3)
    assert merge(x) is x and unmerge(x) is x
    with pytest.raises(TypeError, match="r must be an int"):
        patch_match(metric, 0.5, 2)
    with pytest.raises(ValueError, match="dst_offset must be one of"):
        patch_match(torch.randn(1, 2, 8, 4), 3, 2, dst_offset="middle")


def test_mean_head_shares_matching_across_heads():
    metric = torch.randn(1, 3, 30, 4, generator=torch.Generator().manual_seed(0))
    m = patch_match(metric, 20, 3, dst_offset=0, mean_head=True)
    assert torch.equal(m.slot[0], m.slot[1]) and torch.equal(m.slot[1], m.slot[2])


def test_duplicate_tokens_merge_into_the_same_destination():
    # padding duplicates tokens; identical sources must land on identical destinations
    base = torch.randn(1, 1, 10, 4, generator=torch.Generator().manual_seed(0))
    metric = torch.cat([base, base], dim=2)
    m = patch_match(metric, 12, 5, dst_offset=0)
    out = m.unmerge(m.merge(metric))
    assert torch.isfinite(out).all() and out.shape == metric.shape
