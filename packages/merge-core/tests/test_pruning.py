import pytest
import torch

from merge_core.merge import merge_source, merge_source_index, merge_wavg
from merge_core.pruning import prune_by_score, random_pruning


def test_prune_by_score_keeps_top_tokens_in_order():
    scores = torch.tensor([[9.0, 0.1, 5.0, 0.2, 3.0, 4.0]])
    x = torch.arange(6.0).reshape(1, 6, 1)
    merge, unmerge = prune_by_score(scores, r=2, protected=1)
    out = merge(x)
    assert out[0, :, 0].tolist() == [0.0, 2.0, 4.0, 5.0]
    back = unmerge(out)
    assert back[0, :, 0].tolist() == [0.0, 0.0, 2.0, 0.0, 4.0, 5.0]


def test_protected_prefix_never_dropped_even_with_lowest_score():
    scores = torch.tensor([[-10.0, -9.0, 1.0, 2.0, 3.0]])
    merge, _ = prune_by_score(scores, r=2, protected=2)
    out = merge(torch.arange(5.0).reshape(1, 5, 1))
    assert out[0, :, 0].tolist() == [0.0, 1.0, 4.0]


def test_r_clamped_to_unprotected_and_zero_is_identity():
    scores = torch.rand(2, 5)
    merge, _ = prune_by_score(scores, r=100, protected=1)
    assert merge(torch.randn(2, 5, 3)).shape == (2, 1, 3)
    merge, unmerge = prune_by_score(scores, r=0)
    x = torch.randn(2, 5, 3)
    assert merge(x) is x and unmerge(x) is x


def test_works_with_merge_wavg_and_source_maps():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 11, 4, generator=g)
    merge, unmerge = random_pruning(x, r=4, protected=1, generator=g)
    out, size = merge_wavg(merge, x)
    assert out.shape == (3, 7, 4) and torch.equal(size, torch.ones(3, 7, 1))
    torch.testing.assert_close(out[:, 0], x[:, 0])  # class token kept
    # every kept token is one of the inputs, unchanged
    for b in range(3):
        for t in range(7):
            assert (x[b] == out[b, t]).all(dim=-1).any()
    index = merge_source_index(unmerge, out)
    assert index.shape == (3, 11) and int(index.max()) == 6
    kept = merge_source(merge, x)
    assert torch.equal(kept.sum(-1), torch.ones(3, 7))
    # kept tokens map back to themselves through the index
    for b in range(3):
        rows = kept[b].argmax(-1)
        assert torch.equal(index[b, rows], torch.arange(7))


def test_leading_dims_and_generator_reproducible():
    metric = torch.randn(2, 3, 9, 5)
    m1, _ = random_pruning(metric, 3, generator=torch.Generator().manual_seed(1))
    m2, _ = random_pruning(metric, 3, generator=torch.Generator().manual_seed(1))
    assert m1(metric).shape == (2, 3, 6, 5)
    assert torch.equal(m1(metric), m2(metric))


def test_bad_inputs():
    with pytest.raises(ValueError, match="r must be >= 0"):
        prune_by_score(torch.rand(1, 4), -1)
    with pytest.raises(TypeError, match="r must be a non-negative int"):
        prune_by_score(torch.rand(1, 4), 1.5)
    with pytest.raises(ValueError, match="scores must have shape"):
        prune_by_score(torch.rand(4), 1)
    merge, unmerge = prune_by_score(torch.rand(2, 4), 1)
    with pytest.raises(ValueError, match="x must have shape"):
        merge(torch.rand(2, 5, 3))
    with pytest.raises(ValueError, match="x must have 3 tokens"):
        unmerge(torch.rand(2, 4, 3))
    with pytest.raises(ValueError, match="metric must have shape"):
        random_pruning(torch.rand(4, 3), 1)
