"""STOP's prompter details, the linear latent space, and the optimiser/schedule against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from stop_tome.model import CLIP4Clip, task_config
from stop_tome.optim import BertAdam, param_groups, warmup_cosine
from stop_tome.prompts import TemporalPrompt
from stop_tome.testing import tiny_state_dict


def _prompter(pooling: str) -> TemporalPrompt:
    tp = TemporalPrompt(width=8, heads=1, grid=4, patch_size=4, local_prompts=2, eta=3, region_pooling=pooling)
    with torch.no_grad():  # Cal_Net = "take channel 0 of the middle frame tap": the dynamics map is the input itself
        tp.Cal_Net.weight.zero_()
        tp.Cal_Net.bias.zero_()
        tp.Cal_Net.weight[0, 0, 2, 5, 5] = 1.0
    return tp


def test_region_mask_patch_pooling_top_eta():
    values = torch.arange(16.0).view(4, 4)  # patch (i, j) has value 4i + j
    img = values.repeat_interleave(4, 0).repeat_interleave(4, 1)  # 16 x 16 pixels, constant per 4 x 4 patch
    video = img.expand(1, 1, 3, 16, 16).clone()
    mask = _prompter("patch").region_mask(video)[0, 0]
    assert mask.sum() == 3 and mask.view(-1)[13:].all()  # the three largest patches: 13, 14, 15


def test_region_mask_stop_strided_pooling():
    torch.manual_seed(0)
    img = torch.randn(16, 16)
    video = img.expand(1, 1, 3, 16, 16).clone()
    pooled = torch.stack([torch.stack([img[i::4, j::4].mean() for j in range(4)]) for i in range(4)])  # by hand
    top3 = pooled.view(-1).topk(3).indices
    mask = _prompter("stop").region_mask(video)[0, 0].view(-1)
    assert set(mask.nonzero().view(-1).tolist()) == set(top3.tolist())


def test_linear_latent_space_runs():
    model = CLIP4Clip.from_pretrained(
        tiny_state_dict(), task_config(temporal_prompt="group2-2", shared_latent_space="linear", max_frames=2)
    )
    ids = torch.randint(1, 400, (2, 6))
    ids[:, -1] = 49407
    out = model(ids, torch.randn(2, 2, 3, 64, 64))
    assert torch.isfinite(out["loss"])
    text, local = model.encode_prompts()
    assert text.shape == (3, 8, 64) and local.shape == (3, 2, 4, 64) and torch.equal(local[:, 0], local[:, 1])


def test_bertadam_one_step_by_hand():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = BertAdam([p], lr=0.1, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    p.grad = torch.tensor([0.5])
    opt.step()
    m, v = 0.1 * 0.5, 0.02 * 0.25  # no bias correction
    update = m / (math.sqrt(v) + 1e-6) + 0.1 * 1.0
    assert p.item() == pytest.approx(1.0 - 0.1 * update, abs=1e-6)


def test_warmup_cosine_values():
    fn = warmup_cosine(10, 0.2)  # 2 warm-up steps
    assert [fn(0), fn(1), fn(2)] == [0.5, 1.0, 1.0]
    assert fn(6) == pytest.approx(0.5) and fn(10) == pytest.approx(0.0)


def test_param_groups_coef_lr():
    model = CLIP4Clip(None, tiny_state_dict(), task_config(temporal_prompt="DGL", max_frames=2))
    groups = param_groups(model, lr=1e-3, coef_lr=5e-4, weight_decay=0.2)
    by_param = {id(p): g for g in groups for p in g["params"]}
    clip_w = model.clip.visual.transformer.resblocks[0].mlp.c_fc.weight
    lora_w = model.clip.visual.transformer.resblocks[0].LoRA[0].weight
    bias = model.clip.visual.transformer.resblocks[0].mlp.c_fc.bias
    assert by_param[id(clip_w)]["lr"] == pytest.approx(5e-7) and by_param[id(clip_w)]["weight_decay"] == 0.2
    assert by_param[id(lora_w)]["lr"] == 1e-3 and by_param[id(bias)]["weight_decay"] == 0.0
    assert by_param[id(model.prompts.unified_prompt_embedding.weight)]["lr"] == 1e-3
