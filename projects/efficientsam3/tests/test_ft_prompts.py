import pytest
import torch

from efficientsam3.finetune.prompts import collate_prompts, jitter_boxes, pad_prompts, sample_prompts
from efficientsam3.model.sam3_frozen import TINY_DIMS, build_frozen_sam3


def _ann(x, y, w, h, point=None):
    a = {"bbox": [x, y, w, h], "area": w * h}
    if point is not None:
        a["point_coords"] = [point, [0, 0]]
    return a


def test_jitter_bounds_and_spread():
    g = torch.Generator().manual_seed(0)
    big = torch.tensor([[0.0, 0.0, 1000.0, 800.0]]).repeat(2000, 1)  # std 100/80 px: mostly clamped
    d = jitter_boxes(big, g) - big
    assert d.abs().max().item() <= 20.0 + 1e-9
    assert (d.abs() == 20.0).float().mean().item() > 0.7  # P(|N(0, 80)| > 20) ~ 0.80
    small = torch.tensor([[0.0, 0.0, 10.0, 50.0]]).repeat(4000, 1)  # std 1 px in x, 5 px in y
    d = jitter_boxes(small, g) - small
    assert abs(d[:, 0].std().item() - 1.0) < 0.1 and abs(d[:, 1].std().item() - 5.0) < 0.4
    assert d.abs().max().item() <= 20.0


def test_no_jitter_normalisation_by_hand():
    # 200 x 100 image stretched to 1008: x scale 5.04, y scale 10.08; normalised = original / (w, h)
    p = sample_prompts([_ann(20, 10, 40, 30, point=[50, 25])], (100, 200), 1008, "sam3", jitter=False)
    assert torch.allclose(p["boxes"][0], torch.tensor([40 / 200, 25 / 100, 40 / 200, 30 / 100]))
    assert torch.allclose(p["points"][0], torch.tensor([50 / 200, 25 / 100]))
    # letterbox: long side 200 -> 1008, everything divided by 200 (padding below)
    p = sample_prompts([_ann(20, 10, 40, 30)], (100, 200), 1008, "letterbox", jitter=False)
    assert torch.allclose(p["boxes"][0], torch.tensor([40 / 200, 25 / 200, 40 / 200, 30 / 200]))
    assert torch.allclose(p["points"][0], torch.tensor([40 / 200, 25 / 200]))  # no point: box centre
    p = sample_prompts([_ann(20, 10, 40, 30, point=[50, 25])], (100, 200), 1008, "sam3", jitter=False, flip=True)
    assert torch.allclose(p["boxes"][0], torch.tensor([160 / 200, 25 / 100, 40 / 200, 30 / 100]))
    assert torch.allclose(p["points"][0], torch.tensor([150 / 200, 25 / 100]))


def test_cap_16_random_subset_in_area_order():
    anns = [_ann(0, 0, i + 1, 1) for i in range(40)]  # area i + 1
    subsets = set()
    for seed in range(5):
        p = sample_prompts(anns, (10, 100), 1008, "sam3", jitter=False, generator=torch.Generator().manual_seed(seed))
        widths = (p["boxes"][:, 2] * 100).round().tolist()
        assert len(widths) == 16 and len(set(widths)) == 16
        assert widths == sorted(widths, reverse=True)
        subsets.add(tuple(widths))
    assert len(subsets) > 1
    p = sample_prompts(anns[:5], (10, 100), 1008, "sam3", jitter=False)
    assert (p["boxes"][:, 2] * 100).round().tolist() == [5, 4, 3, 2, 1]


def test_padding_mask_and_single_mode():
    g = torch.Generator().manual_seed(1)
    a = sample_prompts([_ann(0, 0, 5, 5), _ann(1, 1, 4, 4), _ann(2, 2, 3, 3)], (10, 10), 1008, generator=g)
    b = sample_prompts([_ann(0, 0, 5, 5)], (10, 10), 1008, generator=g)
    batch = collate_prompts([a, b])
    expected = torch.tensor([[False, False, False], [False, True, True]])
    assert torch.equal(batch["box_pad"], expected) and torch.equal(batch["point_pad"], expected)
    assert batch["boxes"].shape == (2, 3, 4) and batch["boxes"][1, 1:].abs().sum() == 0
    kinds = set()
    for seed in range(20):
        p = sample_prompts([_ann(0, 0, 5, 5)] * 4, (10, 10), 1008, single=True,
                           generator=torch.Generator().manual_seed(seed))  # fmt: skip
        assert len(p["boxes"]) == 1 and bool(p["box_pad"][0]) != bool(p["point_pad"][0])
        kinds.add(bool(p["box_pad"][0]))
    assert kinds == {True, False}
    with pytest.raises(ValueError, match="no annotation"):
        sample_prompts([{"bbox": [0, 0, 0, 3]}], (10, 10))


def test_pad_prompts_keeps_the_frozen_path_outputs():
    """Padding a batch to more prompt slots (the compiled path's static shape) changes no output of the frozen
    path: padded tokens are masked out of every attention and of the scoring mean."""
    torch.manual_seed(0)
    frozen = build_frozen_sam3(dims=TINY_DIMS)
    p = {"points": torch.rand(2, 2, 2), "boxes": torch.cat([torch.rand(2, 2, 2) * 0.4 + 0.3,
         torch.rand(2, 2, 2) * 0.2 + 0.1], -1), "point_pad": torch.tensor([[False, True], [False, False]]),
         "box_pad": torch.tensor([[False, False], [True, True]])}  # fmt: skip
    padded = pad_prompts(p, 5)
    assert padded["boxes"].shape == (2, 5, 4) and padded["points"].shape == (2, 5, 2)
    assert padded["box_pad"][:, 2:].all() and torch.equal(padded["box_pad"][:, :2], p["box_pad"])
    assert pad_prompts(p, 2) is p
    embed = torch.randn(2, TINY_DIMS.embed_dim, 8, 8)
    args = lambda q: (q["points"], q["point_pad"], q["boxes"], q["box_pad"])  # noqa: E731
    a, b = frozen(embed, *args(p), mask_query="best"), frozen(embed, *args(padded), mask_query="best")
    for k in ("pred_logits", "pred_masks", "presence_logit", "query"):
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="DISTILL.MAX_PROMPTS: a batch has 2 prompts, more than 1"):
        pad_prompts(p, 1)
