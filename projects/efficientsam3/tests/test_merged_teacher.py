"""The merged teacher: merge-core's conformance suite, plus behaviour checked against hand-built cases."""

import torch

from efficientsam3.model.merged_teacher import apply_merging, attended_tokens, window_global_schedule
from efficientsam3.model.sam3_vit import TINY_VIT, SAM3ViT
from efficientsam3.store.compact import embedding_error
from merge_core.adapter import state_of
from merge_core.testing.conformance import AdapterCase, AdapterConformance


def _build() -> SAM3ViT:
    """The reference path: a merged trunk always runs it, so r = 0 must equal it bit for bit (the fast
    path equals it to rounding, tested in test_teacher.py)."""
    torch.manual_seed(0)
    m = SAM3ViT(TINY_VIT).eval()
    m.fast = False
    return m


def _inputs() -> torch.Tensor:
    return torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(1))


_SCHEDULE = window_global_schedule(_build(), 3, 8)  # 16-token windows lose 3, the 64-token grid loses 8


class TestSam3TrunkConformance(AdapterConformance):
    cases = [
        AdapterCase(
            name="sam3_tiny",
            build=_build,
            inputs=_inputs,
            patch=lambda m: apply_merging(m, 0, 0),
            num_tokens=64,
            r=_SCHEDULE,
            expected_tokens=lambda schedule: attended_tokens(_build(), schedule),
            atol=1e-4,
        ),
        AdapterCase(
            name="sam3_tiny_block",
            build=_build,
            inputs=_inputs,
            patch=lambda m: apply_merging(m, 0, 0, mode="block"),
            num_tokens=64,
            r=_SCHEDULE,
            expected_tokens=lambda schedule: attended_tokens(_build(), schedule),
            atol=1e-4,
            run_compile=False,  # same ops as sam3_tiny; compile is the slowest check on CPU
            dtypes=(torch.bfloat16,),
        ),
    ]


def test_schedule_and_counts():
    m = apply_merging(_build(), 3, 8)
    assert m.r == [3, 8, 3, 8]  # TINY_VIT: blocks 1 and 3 are global
    with torch.no_grad():
        y = m(_inputs())
    assert y.shape == (1, 32, 8, 8)
    assert state_of(m).tokens == [13, 56, 13, 56]


def _sharp() -> SAM3ViT:
    """Random weights large enough that attention, not the residual, dominates the output."""
    m = _build()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.mul_(15)
    return m


def test_duplicate_tokens_merge_exactly():
    """Every token has an exact twin (adjacent columns) and RoPE is the identity: merging each twin pair
    (r = N/2) and attending with log(size) on the keys equals full attention (softmax algebra)."""
    m = _sharp()
    blk = m.blocks[1]  # global block, 8x8 grid
    blk.attn.freqs_cis = torch.ones_like(blk.attn.freqs_cis)
    x = torch.randn(1, 8, 4, 32).repeat_interleave(2, dim=2)  # columns 2j and 2j+1 identical
    with torch.no_grad():
        exact = blk.attn(blk.norm1(x))
    apply_merging(m, 0, 32)
    m._merge_info.begin(len(m.blocks), m.r)
    with torch.no_grad():
        merged = blk.attn(blk.norm1(x))
    torch.testing.assert_close(merged, exact, atol=1e-5, rtol=1e-4)


def test_fidelity_falls_with_r():
    """Cosine to the exact embedding falls as r grows (r=0 is exact)."""
    x = _inputs()
    with torch.no_grad():
        exact = _sharp()(x)
    cos = []
    for r in (0, 2, 6):
        m = apply_merging(_sharp(), r, 4 * r)
        with torch.no_grad():
            y = m(x)
        e = embedding_error(exact, y)
        cos.append(e["cos_sum"] / e["cos_n"])
    assert abs(cos[0] - 1.0) < 1e-6
    assert cos[0] > cos[1] > cos[2]


def test_block_mode_duplicates_exact():
    """mode="block": with exact twins and identity RoPE, attention, projection and MLP on the merged set and
    unmerged equal the full block."""
    m = _sharp()
    blk = m.blocks[1]
    blk.attn.freqs_cis = torch.ones_like(blk.attn.freqs_cis)
    x = torch.randn(1, 8, 4, 32).repeat_interleave(2, dim=2)
    with torch.no_grad():
        exact = blk(x)
    apply_merging(m, 0, 32, mode="block")
    m._merge_info.begin(len(m.blocks), m.r)
    with torch.no_grad():
        merged = blk(x)
    assert m._merge_info.tokens == [] and m.r[1] == 32
    torch.testing.assert_close(merged, exact, atol=1e-4, rtol=1e-4)


def test_block_mode_differs_from_attn_mode():
    x = _inputs()
    with torch.no_grad():
        a = apply_merging(_sharp(), 4, 16, mode="attn")(x)
        b = apply_merging(_sharp(), 4, 16, mode="block")(x)
    assert not torch.allclose(a, b)
