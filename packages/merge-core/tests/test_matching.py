import math

import pytest
import torch
from reference_tome import reference_merge  # noqa: I001

import merge_core as mc


def _inputs(batch=3, n=17, c=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, c, generator=g, dtype=dtype), torch.randn(batch, n, 5, generator=g, dtype=dtype)


@pytest.mark.parametrize("class_token,distill_token", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("n,r", [(17, 4), (16, 8), (197, 16), (12, 100)])
def test_equals_tome_reference(class_token, distill_token, n, r):
    metric, x = _inputs(n=n)
    merge, _ = mc.bipartite_soft_matching(metric, r, class_token, distill_token)
    out, size = mc.merge_wavg(merge, x)
    ref_out, ref_size, _ = reference_merge(metric, x, r, class_token, distill_token)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(size, ref_size)


def test_fixed_example_by_hand():
    # Tokens 0,2 (sources) point along b-token 1 and 3 respectively; r=1 merges the closest pair.
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, 1.0]]])
    x = torch.tensor([[[1.0], [3.0], [5.0], [7.0]]])
    merge, _ = mc.bipartite_soft_matching(metric, 1)
    out, size = mc.merge_wavg(merge, x)
    # token 0 -> token 1 (cos ~0.995) beats token 2 -> token 3 (cos ~0.707): [unmerged 2, dst 1, dst 3]
    assert out.flatten().tolist() == [5.0, 2.0, 7.0]
    assert size.flatten().tolist() == [1.0, 2.0, 1.0]


def test_sources_match_sizes_and_reference_groups():
    metric, x = _inputs(n=21)
    merge, unmerge = mc.bipartite_soft_matching(metric, 6, class_token=True)
    source = mc.merge_source(merge, x)
    merged, size = mc.merge_wavg(merge, x)
    index = mc.merge_source_index(unmerge, merged)
    torch.testing.assert_close(source.sum(-1, keepdim=True), size)
    torch.testing.assert_close(mc.source_index_to_dense(index, merged.shape[1]), source)
    _, _, groups = reference_merge(metric, x, 6, True, False)
    for b in range(metric.shape[0]):
        for token, members in enumerate(groups[b]):
            assert sorted(torch.nonzero(source[b, token]).flatten().tolist()) == members


def test_protected_prefix_untouched_and_first():
    metric, x = _inputs(n=30)
    for protected in range(0, 6):
        merge, _ = mc.bipartite_soft_matching(metric, 12, protected=protected)
        out, size = mc.merge_wavg(merge, x)
        assert out.shape[1] == 30 - min(12, (30 - protected) // 2)
        torch.testing.assert_close(out[:, :protected], x[:, :protected])
        assert torch.all(size[:, :protected] == 1)
        assert torch.all(size.sum(1) == 30)


def test_flags_equal_protected_counts():
    metric, x = _inputs(n=40)
    for flags, protected in [((True, False), 1), ((True, True), 2)]:
        a = mc.merge_wavg(mc.bipartite_soft_matching(metric, 9, *flags)[0], x)[0]
        b = mc.merge_wavg(mc.bipartite_soft_matching(metric, 9, protected=protected)[0], x)[0]
        torch.testing.assert_close(a, b)


def test_r_zero_is_identity_and_r_clamped():
    metric, x = _inputs(n=11)
    merge, unmerge = mc.bipartite_soft_matching(metric, 0)
    assert merge(x) is x and unmerge(x) is x
    merge, _ = mc.bipartite_soft_matching(metric, 1000, class_token=True)
    assert merge(x).shape[1] == 11 - 5


@pytest.mark.parametrize("protected", [0, 1, 2, 3])
def test_unmerge_restores_unmerged_tokens_and_copies_destinations(protected):
    metric, x = _inputs(n=25)
    merge, unmerge = mc.bipartite_soft_matching(metric, 7, protected=protected)
    merged, _ = mc.merge_wavg(merge, x)
    restored = unmerge(merged)
    assert restored.shape == x.shape
    index = mc.merge_source_index(unmerge, merged)
    torch.testing.assert_close(restored, mc.unmerge_to_source(merged, index))
    sizes = torch.bincount(index[0], minlength=merged.shape[1])
    singletons = sizes[index[0]] == 1
    torch.testing.assert_close(restored[0, singletons], x[0, singletons])


def test_source_index_chains_over_layers():
    metric, x = _inputs(n=33, c=6)
    size = source = index = None
    for r in (5, 5, 4):
        merge, unmerge = mc.bipartite_soft_matching(x, r, class_token=True)
        source = mc.merge_source(merge, x, source)
        x, size = mc.merge_wavg(merge, x, size)
        index = mc.merge_source_index(unmerge, x, index)
    torch.testing.assert_close(mc.source_index_to_dense(index, x.shape[1]), source)
    counts = torch.stack([torch.bincount(i, minlength=x.shape[1]) for i in index]).float()
    torch.testing.assert_close(counts[..., None], size)
    assert torch.all(index[:, 0] == 0)


def test_leading_dims_are_flattened():
    metric, x = _inputs(batch=6, n=15)
    merge4, _ = mc.bipartite_soft_matching(metric.reshape(2, 3, 15, 8), 4, protected=2)
    merge3, _ = mc.bipartite_soft_matching(metric, 4, protected=2)
    torch.testing.assert_close(merge4(x.reshape(2, 3, 15, 5)).reshape(6, -1, 5), merge3(x))


def test_score_mod_penalty_protects_high_phi_tokens():
    metric, x = _inputs(batch=1, n=20)
    phi = torch.zeros(1, 20)
    phi[0, ::2] = 1.0  # every source candidate is "high frequency"
    phi[0, 4] = 0.0
    penalty = mc.TokenPairPenalty(phi, alpha=1.0)
    merge, unmerge = mc.bipartite_soft_matching(metric, 1, score_mod=penalty)
    merged, _ = mc.merge_wavg(merge, x)
    index = mc.merge_source_index(unmerge, merged)
    # only token 4 has a non-zero score, so it is the one merged
    assert torch.bincount(index[0])[index[0, 4]] == 2


def test_guide_penalty_raises_negative_similarity_but_shifted_does_not():
    scores = torch.tensor([[[-0.8]]])
    low, high = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    guide = [mc.TokenPairPenalty(p, 0.7, "guide")(scores).item() for p in (low, high)]
    shifted = [mc.TokenPairPenalty(p, 0.7, "shifted")(scores).item() for p in (low, high)]
    assert guide[1] > guide[0]
    assert shifted[1] < shifted[0]


def test_kth_matching_groups_of_k():
    metric, x = _inputs(n=18)
    merge, unmerge = mc.kth_bipartite_soft_matching(metric, 3)
    merged, size = mc.merge_wavg(merge, x)
    assert merged.shape[1] == 6 and torch.all(size.sum(1) == 18)
    assert unmerge(merged).shape == x.shape
    # destinations are tokens 2, 5, 8, ...: a destination that receives nothing keeps its value
    alone = size[0, :, 0] == 1
    torch.testing.assert_close(merged[0, alone], x[0, 2::3][alone])


def test_random_matching_with_generator_is_reproducible():
    metric, x = _inputs(n=16)
    outs = []
    for _ in range(2):
        merge, unmerge = mc.random_bipartite_soft_matching(metric, 5, generator=torch.Generator().manual_seed(3))
        merged, size = mc.merge_wavg(merge, x)
        outs.append(merged)
        assert merged.shape[1] == 11 and torch.all(size.sum(1) == 16)
        assert unmerge(merged).shape == x.shape
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_half_precision_runs(dtype):
    metric, x = _inputs(n=50, dtype=dtype)
    merge, _ = mc.bipartite_soft_matching(metric, 10, class_token=True)
    out, size = mc.merge_wavg(merge, x)
    assert out.dtype == dtype and out.shape == (3, 40, 5)
    assert math.isclose(float(size.float().sum()), 150.0)


def test_torch_compile_fixed_r_fullgraph_equals_oracle():
    """fullgraph=True fails on any graph break; the result must equal the loop-based ToMe oracle."""
    import torch._dynamo

    metric, x = _inputs(n=20)

    def step(m, v):
        merge, _ = mc.bipartite_soft_matching(m, 5, class_token=True)
        return mc.merge_wavg(merge, v)

    torch._dynamo.reset()
    out, size = torch.compile(step, backend="aot_eager", fullgraph=True)(metric, x)
    ref_out, ref_size, _ = reference_merge(metric, x, 5, True, False)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(size, ref_size)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda m: mc.bipartite_soft_matching(m, -1), "r must be >= 0"),
        (lambda m: mc.bipartite_soft_matching(m, 2.5), "r must be a non-negative int"),
        (lambda m: mc.bipartite_soft_matching(m[0, 0], 2), "metric must have shape"),
        (lambda m: mc.bipartite_soft_matching(m, 2, protected=-1), "protected must be >= 0"),
        (lambda m: mc.kth_bipartite_soft_matching(m, -2), "k must be >= 0"),
    ],
)
def test_bad_input_errors(call, message):
    metric, _ = _inputs()
    with pytest.raises((ValueError, TypeError), match=message):
        call(metric)


def test_closure_rejects_mismatched_tensor():
    metric, x = _inputs(n=17)
    merge, _ = mc.bipartite_soft_matching(metric, 3)
    with pytest.raises(ValueError, match=r"x must have shape \(3, 17\)"):
        merge(x[:, :10])
    with pytest.raises(ValueError, match="x is on meta"):
        merge(x.to("meta"))
