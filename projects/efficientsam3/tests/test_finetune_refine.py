"""EdgeSAM-style refinement points on hand-made masks (the reference's rule: a uniform pixel of the
teacher/student disagreement; false negative -> positive label 1, false positive -> negative label 0; no
point when fewer than 10 x n pixels disagree), packing, and the decode iterations of the FT loss."""

import torch

from efficientsam3.finetune.losses import LossWeights, best_query, embedding_mse, pick, soft_bce, soft_dice
from efficientsam3.finetune.refine import append_points, sample_refinement_points
from efficientsam3.finetune.step import DecodeSettings, ft_loss
from efficientsam3.model.sam3_frozen import TINY_DIMS, build_frozen_sam3

ON, OFF = 5.0, -5.0


def _masks(h=8, w=8):
    return torch.full((1, h, w), OFF), torch.full((1, h, w), OFF), torch.ones(1, h, w, dtype=torch.bool)


def _cell(point, h=8, w=8):
    """The mask pixel (row, col) a normalised point falls in."""
    x, y = point.tolist()
    return int(y * h), int(x * w)


def test_false_negative_gives_positive_point_on_it():
    s, t, valid = _masks()
    t[0, 2:5, 3:7] = ON  # teacher sees 12 pixels the student misses
    for u in (0.0, 0.3, 0.99):
        pts, labels, pad = sample_refinement_points(s, t, valid, torch.tensor([[u]]))
        assert not pad.any() and labels.tolist() == [[1]]
        r, c = _cell(pts[0, 0])
        assert 2 <= r < 5 and 3 <= c < 7
    pts, _, _ = sample_refinement_points(s, t, valid, torch.tensor([[0.0]]))
    assert _cell(pts[0, 0]) == (2, 3)  # the first disagreeing pixel in raster order
    torch.testing.assert_close(pts[0, 0], torch.tensor([3.5 / 8, 2.5 / 8]))  # its centre, xy


def test_false_positive_gives_negative_point_on_it():
    s, t, valid = _masks()
    s[0, 6:8, 0:6] = ON  # the student claims 12 pixels the teacher does not
    pts, labels, pad = sample_refinement_points(s, t, valid, torch.tensor([[0.999]]))
    assert not pad.any() and labels.tolist() == [[0]]
    assert _cell(pts[0, 0]) == (7, 5)  # the last disagreeing pixel


def test_both_regions_label_follows_the_pixel():
    s, t, valid = _masks()
    t[0, 0, 0:5] = ON  # 5 FN pixels first in raster order: (0,0)..(0,4)
    s[0, 5, 0:7] = ON  # 7 FP pixels: (5,0)..(5,6); 12 disagreeing pixels in all
    # k = floor(u x 12): k 0..4 are FN, 5..11 are FP
    for u, label, cell in ((0.0, 1, (0, 0)), (4.5 / 12, 1, (0, 4)), (5.5 / 12, 0, (5, 0)), (11.5 / 12, 0, (5, 6))):
        pts, labels, pad = sample_refinement_points(s, t, valid, torch.tensor([[u]]))
        assert labels.item() == label and _cell(pts[0, 0]) == cell and not pad.any()


def test_agreement_is_not_an_error():
    s, t, valid = _masks()
    s[0, :4] = ON
    t[0, :4] = ON  # 32 pixels both on: no disagreement
    t[0, 7, :2] = ON  # 2 FN pixels only
    _, _, pad = sample_refinement_points(s, t, valid, torch.tensor([[0.5]]))
    assert pad.all()


def test_too_few_error_pixels_skip_the_image():
    s, t, valid = _masks()
    t[0, 1, 0:8] = ON
    t[0, 2, 0] = ON  # 9 < 10 x 1 -> no point
    _, _, pad = sample_refinement_points(s, t, valid, torch.tensor([[0.5]]))
    assert pad.all()
    t[0, 2, 1] = ON  # exactly 10 -> a point
    _, _, pad = sample_refinement_points(s, t, valid, torch.tensor([[0.5]]))
    assert not pad.any()
    _, _, pad = sample_refinement_points(s, t, valid, torch.tensor([[0.5, 0.6]]))  # 2 points need 20
    assert pad.all() and pad.shape == (1, 2)


def test_padded_region_and_threshold():
    s, t, valid = _masks()
    t[0, :, 4:] = ON  # 32 FN pixels, but all in the padded right half
    valid[0, :, 4:] = False
    _, _, pad = sample_refinement_points(s, t, valid, torch.tensor([[0.5]]))
    assert pad.all()
    s, t, valid = _masks()
    s[0, :2] = 1.0  # logits 1.0: on at threshold 0, off at threshold 2
    _, labels, pad = sample_refinement_points(s, t, valid, torch.tensor([[0.5]]), threshold=0.0)
    assert not pad.any() and labels.item() == 0
    _, _, pad = sample_refinement_points(s, t, valid, torch.tensor([[0.5]]), threshold=2.0)
    assert pad.all()


def test_batch_images_are_independent():
    s, t, valid = (x.repeat(2, 1, 1) for x in _masks())
    t[0, 0:2, :] = ON  # image 0: 16 FN
    s[1, 0:2, :] = ON  # image 1: 16 FP
    pts, labels, pad = sample_refinement_points(s, t, valid, torch.tensor([[0.0], [0.0]]))
    assert labels.tolist() == [[1], [0]] and not pad.any()


def test_append_points_keeps_valid_points_first():
    pts = torch.tensor([[[0.1, 0.1]], [[0.2, 0.2]]])
    labels = torch.tensor([[1], [1]])
    pad = torch.tensor([[True], [False]])  # image 0 is box-only: its one point slot is padding
    new = torch.tensor([[[0.7, 0.7]], [[0.8, 0.8]]])
    new_labels = torch.tensor([[0], [1]])
    new_pad = torch.tensor([[False], [True]])
    p, lab, pd = append_points(pts, labels, pad, new, new_labels, new_pad)
    assert pd.tolist() == [[False, True], [False, True]]
    torch.testing.assert_close(p[0, 0], torch.tensor([0.7, 0.7]))
    torch.testing.assert_close(p[1, 0], torch.tensor([0.2, 0.2]))
    assert lab[:, 0].tolist() == [0, 1]


def _setup():
    torch.manual_seed(0)
    frozen = build_frozen_sam3(dims=TINY_DIMS)
    b, c, s = 2, TINY_DIMS.embed_dim, 8
    pred, target = torch.randn(b, c, s, s), torch.randn(b, c, s, s)
    prompts = {
        "points": torch.rand(b, 1, 2),
        "point_pad": torch.tensor([[True], [False]]),  # image 0 box-only, image 1 point-only
        "boxes": torch.tensor([[[0.5, 0.5, 0.4, 0.4]], [[0.3, 0.3, 0.2, 0.2]]]),
        "box_pad": torch.tensor([[False], [True]]),
    }
    ev = torch.ones(b, s, s, dtype=torch.bool)
    mv = torch.ones(b, 4 * s, 4 * s, dtype=torch.bool)
    return frozen, pred, target, prompts, ev, mv


def _terms(frozen, pred, target, args, labels, mv):
    t_out = frozen(target, *args, point_labels=labels)
    idx = best_query(t_out["pred_logits"])
    t, s = pick(t_out["pred_masks"], idx), pick(frozen(pred, *args, point_labels=labels)["pred_masks"], idx)
    return soft_bce(s, t, mv), soft_dice(s, t, mv), s, t


def test_two_decode_iterations_average_the_mask_loss():
    """Iteration 2 decodes again with the refinement point appended (built here by hand from the masks)."""
    frozen, pred, target, prompts, ev, mv = _setup()
    u = torch.tensor([[0.25], [0.75]])
    total, parts = ft_loss(frozen, pred, target, prompts, ev, mv, DecodeSettings(LossWeights(), 2, True),
                           uniforms=lambda it: u)  # fmt: skip
    args = (prompts["points"], prompts["point_pad"], prompts["boxes"], prompts["box_pad"])
    bce1, dice1, s, t = _terms(frozen, pred, target, args, None, mv)
    err = (s > 0) != (t > 0)
    assert (err.flatten(1).sum(1) >= 10).all()  # random tiny SAM3 disagrees enough for a point per image
    new, new_labels = [], []
    for i in range(2):
        cells = err[i].nonzero()  # raster order
        r, col = cells[int(u[i, 0] * len(cells))].tolist()
        new.append([(col + 0.5) / 32, (r + 0.5) / 32])
        new_labels.append(int(t[i, r, col] > 0))
    # image 0 had only a padded point: the new point goes first; image 1 keeps its point, then the new one
    points = torch.tensor([[new[0], [0.0, 0.0]], [prompts["points"][1, 0].tolist(), new[1]]])
    point_pad = torch.tensor([[False, True], [False, False]])
    labels = torch.tensor([[new_labels[0], 0], [1, new_labels[1]]])
    bce2, dice2, _, _ = _terms(frozen, pred, target, (points, point_pad, *args[2:]), labels, mv)
    want = 0.0015 * embedding_mse(pred, target, ev) + (bce1 + bce2) / 2 + (dice1 + dice2) / 2
    torch.testing.assert_close(total, want, atol=1e-5, rtol=1e-5)
    assert parts["refine_points"] == 1.0


def test_box_only_without_iter_on_box_gets_no_point():
    """ITER_ON_BOX False: the box-only image keeps its prompt; a batch where no image refines repeats
    iteration 1, so the loss equals one decode iteration."""
    frozen, pred, target, prompts, ev, mv = _setup()
    box_only = {k: v[:1] for k, v in prompts.items()}
    one, _ = ft_loss(frozen, pred[:1], target[:1], box_only, ev[:1], mv[:1], DecodeSettings(decode_iters=1))
    two, parts = ft_loss(frozen, pred[:1], target[:1], box_only, ev[:1], mv[:1], DecodeSettings(decode_iters=2))
    torch.testing.assert_close(two, one)
    assert parts["refine_points"] == 0.0


def test_negative_label_reaches_the_geometry_encoder():
    frozen, pred, target, prompts, ev, mv = _setup()
    args = (prompts["points"], torch.zeros(2, 1, dtype=torch.bool), prompts["boxes"], prompts["box_pad"])
    ones = frozen(pred, *args)["pred_masks"]
    torch.testing.assert_close(frozen(pred, *args, point_labels=torch.ones(2, 1, dtype=torch.long))["pred_masks"], ones)
    neg = frozen(pred, *args, point_labels=torch.zeros(2, 1, dtype=torch.long))["pred_masks"]
    assert (neg - ones).abs().max() > 1e-4
