import math

import torch

from efficientsam3.finetune.losses import LossWeights, embedding_mse, geometry_loss, soft_bce, soft_dice


def test_embedding_mse_masked_hand_values():
    pred = torch.zeros(1, 2, 2, 2)
    target = torch.zeros(1, 2, 2, 2)
    target[0, 0, 0, 0], target[0, 1, 0, 0] = 1.0, 2.0  # cell (0,0): 1 + 4 = 5
    target[0, :, 1, 1] = 100.0  # padded cell, must not count
    valid = torch.tensor([[[True, True], [True, False]]])
    assert math.isclose(embedding_mse(pred, target, valid).item(), 5 / 3, rel_tol=1e-6)


def test_soft_bce_hand_values():
    s = torch.tensor([[[0.0, 2.0, 9.0]]])
    t = torch.tensor([[[0.0, 0.0, -9.0]]])
    valid = torch.tensor([[[True, True, False]]])
    # pixel 1: target 0.5, logit 0 -> ln 2; pixel 2: target 0.5, logit 2 -> -(0.5 ln s(2) + 0.5 ln(1 - s(2)))
    sig2 = 1 / (1 + math.exp(-2))
    p2 = -(0.5 * math.log(sig2) + 0.5 * math.log(1 - sig2))
    assert math.isclose(soft_bce(s, t, valid).item(), (math.log(2) + p2) / 2, rel_tol=1e-6)


def test_soft_dice_hand_values():
    big = 50.0
    s = torch.tensor([[[big, big], [-big, big]]])  # p = 1, 1, 0, 1(padded)
    t = torch.tensor([[[big, -big], [-big, -big]]])  # q = 1, 0, 0, 0
    valid = torch.tensor([[[True, True], [True, False]]])
    # sum pq = 1, sum p = 2, sum q = 1 -> dice = (2 + 1) / (3 + 1)
    assert math.isclose(soft_dice(s, t, valid).item(), 1 - 3 / 4, rel_tol=1e-6)
    assert soft_dice(t, t, valid).item() < 1e-6


def test_geometry_loss_uses_teacher_best_query():
    emb_s = torch.zeros(1, 1, 1, 1)
    emb_t = torch.full((1, 1, 1, 1), 2.0)  # mse 4
    valid_e = torch.ones(1, 1, 1, dtype=torch.bool)
    big = 50.0
    t_masks = torch.full((1, 3, 1, 2), -big)
    s_masks = torch.full((1, 3, 1, 2), -big)
    t_masks[0, 2] = big  # teacher's best query (index 2) says foreground everywhere
    s_masks[0, 2, 0, 0] = big  # student agrees on one pixel of query 2
    s_masks[0, 0] = big  # a student query the teacher does not pick
    scores = torch.tensor([[0.9, 0.1, 3.0]])
    valid_m = torch.ones(1, 1, 2, dtype=torch.bool)
    total, parts = geometry_loss(emb_s, emb_t, valid_e, s_masks, t_masks, scores, valid_m, LossWeights())
    # BCE: pixel 0 ~0, pixel 1 = 50 (logit -50 vs target 1) -> mean 25; Dice: 1 - (2*1 + 1)/(1 + 2 + 1) = 0.25
    assert math.isclose(parts["embed_mse"], 4.0, rel_tol=1e-6)
    assert math.isclose(parts["mask_bce"], 25.0, rel_tol=1e-4)
    assert math.isclose(parts["mask_dice"], 0.25, rel_tol=1e-4)
    assert math.isclose(total.item(), 0.0015 * 4 + 25.0 + 0.25, rel_tol=1e-4)
