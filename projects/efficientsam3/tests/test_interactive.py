"""SAM3's interactive predictor: sizes and key layout, hand-computed pieces (position code, label
embeddings, the stability rule, hole filling, preprocessing, coordinates) and the checkpoint loaders
(SAM3, converted student, stage-1 / FT checkpoint + sam3.pt) on the tiny stand-in."""

import math

import numpy as np
import pytest
import torch

from efficientsam3.model.sam3_interactive import (
    HEAD_PREFIXES,
    NO_MEM_KEY,
    SAM3_INTERACTIVE,
    STUDENT_PREFIX,
    TINY_INTERACTIVE,
    TRUNK_PREFIX,
    InteractiveHeads,
    InteractivePredictor,
    build_predictor,
    fill_holes,
    infer_backbone,
    preprocess_image,
)
from efficientsam3.model.sam3_interactive_decoder import MaskDecoder
from efficientsam3.model.sam3_interactive_prompt import PromptEncoder
from efficientsam3.model.sam3_vit import SAM3_VIT, TINY_VIT, SAM3ViT
from efficientsam3.model.students import build_student
from run_kit import CheckpointError


def test_sizes_and_key_counts():
    with torch.device("meta"):
        heads, trunk = InteractiveHeads(SAM3_INTERACTIVE), SAM3ViT(SAM3_VIT)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # by hand: 6 x 256 embeddings + mask path (20 + 8 + 272 + 32 + 4352) (notes 2.1: 6K)
    assert n(heads.sam_prompt_encoder) == 6 * 256 + 4684
    # by hand (notes 2.1: 4.2M): two-way block = self-attn 4 x 65,792 + 2 half-width cross-attns 2 x 131,712
    # + MLP 1,050,880 + 4 norms 2,048 = 1,579,520; transformer = 2 blocks + final attn 131,712 + norm 512;
    # 6 tokens; upscaling 65,600 + 128 + 8,224; conv_s0 8,224, conv_s1 16,448; 4 hypernetwork MLPs x 139,808;
    # IoU head 132,612; object-score head 131,841
    transformer = 2 * 1_579_520 + 131_712 + 512
    want = transformer + 6 * 256 + 73_952 + 8_224 + 16_448 + 4 * 139_808 + 132_612 + 131_841
    assert n(heads.sam_mask_decoder) == want == 4_215_109
    assert n(heads.sam2_convs) == 7_802_112  # a clone of SAM3's SimpleFPN (notes 2.1: 7.80M)
    # key counts as in sam3 0.1.4 (tracker: 309 keys of which sam_mask_decoder 131, sam_prompt_encoder 17,
    # no_mem_embed 1; vision backbone: trunk 420, convs 22, sam2_convs 22 -> 1134 + 22 + 309 = 1465)
    assert len(heads.sam_prompt_encoder.state_dict()) == 17
    assert len(heads.sam_mask_decoder.state_dict()) == 131
    assert len(heads.sam2_convs.state_dict()) == 22
    assert len(heads.state_dict()) == 17 + 131 + 22 + 1
    assert len(trunk.state_dict()) == 420
    keys = set(heads.state_dict())
    for k in ("sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
              "sam_prompt_encoder.mask_downscaling.6.bias",
              "sam_mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.weight",
              "sam_mask_decoder.transformer.final_attn_token_to_image.v_proj.bias", "sam_mask_decoder.conv_s0.weight",
              "sam_mask_decoder.pred_obj_score_head.layers.2.weight", "sam_mask_decoder.output_upscaling.1.weight",
              "sam_mask_decoder.output_hypernetworks_mlps.3.layers.2.bias", "sam2_convs.0.dconv_2x2_1.weight",
              "no_mem_embed"):  # fmt: skip
        assert k in keys


def test_position_code_and_label_embeddings_by_hand():
    pe = PromptEncoder(embed_dim=4, embedding_size=2, image_size=8, mask_in_chans=4)
    with torch.no_grad():
        pe.pe_layer.positional_encoding_gaussian_matrix.copy_(torch.eye(2))
        for i, table in enumerate(pe.point_embeddings):
            table.weight.fill_(10.0 * (i + 1))
        pe.not_a_point_embed.weight.fill_(-7.0)
    # point (3.5, 1.5) + 0.5 -> (4, 2) / 8 -> (0.5, 0.25) -> 2c - 1 = (0, -0.5) -> x 2 pi -> sin (0, 0), cos (1, -1)
    emb = pe.embed_points(torch.tensor([[[3.5, 1.5], [3.5, 1.5]]]), torch.tensor([[1, 3]]), pad=True)
    code = torch.tensor([0.0, 0.0, 1.0, -1.0])
    torch.testing.assert_close(emb[0, 0], code + 20.0, atol=1e-5, rtol=0)  # label 1 -> point_embeddings[1]
    torch.testing.assert_close(emb[0, 1], code + 40.0, atol=1e-5, rtol=0)  # label 3 -> point_embeddings[3]
    torch.testing.assert_close(emb[0, 2], torch.full((4,), -7.0))  # the padding point: not_a_point only
    assert pe.embed_points(torch.zeros(1, 1, 2), torch.tensor([[0]]), pad=False).shape == (1, 1, 4)
    with torch.no_grad():
        pe.pe_layer.positional_encoding_gaussian_matrix.copy_(0.5 * torch.eye(2))
    dense = pe.dense_pe()[0]
    # 2x2 cell centres 0.25 / 0.75 -> 2c - 1 = -+0.5 -> x 0.5 x 2 pi = -+pi/2; channels sin x, sin y, cos x, cos y
    torch.testing.assert_close(dense[:, 0, 1], torch.tensor([1.0, -1.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(dense[:, 1, 0], torch.tensor([-1.0, 1.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    assert pe.embed_dense(3).shape == (3, 4, 2, 2) and pe.embed_dense(1, torch.zeros(1, 1, 8, 8)).shape == (1, 4, 2, 2)


def test_single_mask_stability_rule_by_hand():
    dec = MaskDecoder(dim=16, heads=2, mlp_dim=8, iou_hidden=8)
    masks = torch.full((2, 4, 4, 4), -1.0)
    masks[0, 0, :2] = 1.0  # 8 px > 0.05, 8 px < -0.05: stability 8/8 = 1 -> keep token 0
    masks[1, 0, :1] = 1.0
    masks[1, 0, 1:3] = 0.0  # 4 px > 0.05, 12 px > -0.05: stability 1/3 -> best multimask token
    iou = torch.tensor([[0.1, 0.9, 0.2, 0.3], [0.9, 0.1, 0.7, 0.3]])
    torch.testing.assert_close(dec.stability(masks[:, 0]), torch.tensor([1.0, 1 / 3]))
    for i in range(4):
        masks[:, i] += 10 * i  # tag each token's mask
    out, out_iou = dec.select(masks, iou, multimask=False)
    assert out.shape == (2, 1, 4, 4) and out[0, 0, 3, 3] == -1.0 and out[1, 0, 3, 3] == 19.0  # token 2
    torch.testing.assert_close(out_iou, torch.tensor([[0.1], [0.7]]))
    assert dec.select(masks, iou, multimask=True)[0].shape == (2, 3, 4, 4)
    dec.dynamic_multimask = False
    assert dec.select(masks, iou, multimask=False)[0][1, 0, 3, 3] == -1.0


def test_fill_holes_by_hand():
    x = torch.ones(1, 1, 6, 6)
    x[0, 0, 1, 1] = x[0, 0, 2, 2] = -1.0  # diagonal pair: one 8-connected component of 2 px
    x[0, 0, 4, 4] = -1.0  # a single-pixel hole
    x[0, 0, 0, 5] = 0.0  # logit 0 is background (<= threshold)
    got = fill_holes(x, max_area=1)
    assert got[0, 0, 4, 4] == 10.0 and got[0, 0, 0, 5] == 10.0  # areas 1 -> filled with threshold + 10
    assert got[0, 0, 1, 1] == -1.0 and got[0, 0, 2, 2] == -1.0  # area 2 > 1 (it would be two 1-px holes if 4-connected)
    assert fill_holes(x, max_area=2)[0, 0, 1, 1] == 10.0
    torch.testing.assert_close(fill_holes(x, max_area=0), x)


def test_preprocessing_and_coordinates_by_hand():
    img = torch.full((10, 20, 3), 255, dtype=torch.uint8)
    x, valid = preprocess_image(img, 40, "sam3")
    assert x.shape == (1, 3, 40, 40) and valid == (40, 40) and torch.allclose(x, torch.ones_like(x))
    x, valid = preprocess_image(img, 40, "letterbox")
    assert valid == (20, 40) and (x[..., 20:, :] == 0).all()
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([(255 - 123.675) / 58.395, (255 - 116.28) / 57.12,
                                                            (255 - 103.53) / 57.375]))  # fmt: skip
    with pytest.raises(ValueError, match="--preprocess: expected sam3 or letterbox"):
        preprocess_image(img, 40, "pad")
    pred = InteractivePredictor(SAM3ViT(TINY_VIT), InteractiveHeads(TINY_INTERACTIVE))
    pred.orig_hw, pred.valid_hw = (10, 20), (112, 112)
    torch.testing.assert_close(pred.to_input(torch.tensor([[20.0, 10.0], [5.0, 5.0]])),
                               torch.tensor([[112.0, 112.0], [28.0, 56.0]]))  # fmt: skip
    pred.valid_hw = (56, 112)  # letterbox: one scale for both axes
    torch.testing.assert_close(pred.to_input(torch.tensor([[5.0, 5.0]])), torch.tensor([[28.0, 28.0]]))


def _tiny_sam3_ckpt(seed=0):
    torch.manual_seed(seed)
    trunk, heads = SAM3ViT(TINY_VIT), InteractiveHeads(TINY_INTERACTIVE)
    sd = {TRUNK_PREFIX + k: v for k, v in trunk.state_dict().items()}
    for name, prefix in HEAD_PREFIXES.items():
        sd |= {prefix + k: v + 0.05 * torch.randn_like(v) for k, v in heads.get_submodule(name).state_dict().items()}
    sd[NO_MEM_KEY] = heads.no_mem_embed.detach().clone()
    sd["detector.backbone.vision_backbone.convs.0.conv_1x1.weight"] = torch.zeros(1)  # other SAM3 keys: ignored
    sd["tracker.maskmem_backbone.x"] = torch.zeros(1)
    return sd


def _image(seed=0, hw=(50, 70)):
    return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


def test_sam3_predictor_loads_and_predicts(tmp_path):
    sd = _tiny_sam3_ckpt()
    torch.save({"model": sd}, tmp_path / "sam3.pt")
    pred = build_predictor("sam3", sam3_checkpoint=str(tmp_path / "sam3.pt"), tiny=True)
    own = pred.state_dict()
    for k, v in sd.items():
        mine = ("trunk." + k[len(TRUNK_PREFIX) :]) if k.startswith(TRUNK_PREFIX) else None
        for name, prefix in HEAD_PREFIXES.items():
            if k.startswith(prefix):
                mine = f"heads.{name}." + k[len(prefix) :]
        if k == NO_MEM_KEY:
            mine = "heads.no_mem_embed"
        if mine is not None:
            assert torch.equal(own[mine], v), k
    pred.set_image(_image())
    masks, iou, low = pred.predict(boxes=np.array([[3.0, 4.0, 40.0, 45.0], [10, 10, 69, 49]]))
    assert masks.shape == (2, 1, 50, 70) and masks.dtype == torch.bool and iou.shape == (2, 1)
    assert low.shape == (2, 1, 32, 32) and ((iou >= 0) & (iou <= 1)).all()  # sigmoid IoU head
    multi, iou3, _ = pred.predict(points=np.array([[[20.0, 20.0]]]), labels=np.array([[1]]), multimask=True)
    assert multi.shape == (1, 3, 50, 70) and iou3.shape == (1, 3)
    assert pred.predict_boxes(np.array([[3.0, 4.0, 40.0, 45.0]])).shape == (1, 50, 70)
    assert pred.predict_boxes(np.zeros((0, 4))).shape == (0, 50, 70)
    # batched boxes equal one-at-a-time boxes (the reference prompts one box per call)
    one = pred.predict(boxes=np.array([[10, 10, 69, 49]]))[2]
    torch.testing.assert_close(one[0], low[1], atol=1e-5, rtol=1e-4)


def test_sam3_loader_refusals(tmp_path):
    sd = _tiny_sam3_ckpt()
    with pytest.raises(ValueError, match="--sam3-checkpoint: required for --predictor sam3"):
        build_predictor("sam3", tiny=True)
    with pytest.raises(FileNotFoundError, match="--sam3-checkpoint: file not found"):
        build_predictor("sam3", sam3_checkpoint=str(tmp_path / "none.pt"), tiny=True)
    bad = dict(sd)
    del bad["tracker.sam_mask_decoder.conv_s1.bias"]
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="missing key 'conv_s1.bias'"):
        build_predictor("sam3", sam3_checkpoint=str(tmp_path / "bad.pt"), tiny=True)
    bad = dict(sd)
    bad[NO_MEM_KEY] = torch.zeros(1, 1, 3)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="shape mismatch for tracker.no_mem_embed"):
        build_predictor("sam3", sam3_checkpoint=str(tmp_path / "bad.pt"), tiny=True)
    bad = {k: v for k, v in sd.items() if not k.startswith("tracker.")}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="no tracker.sam_prompt_encoder"):
        build_predictor("sam3", sam3_checkpoint=str(tmp_path / "bad.pt"), tiny=True)
    bad = {k: v for k, v in sd.items() if not k.startswith(TRUNK_PREFIX)}
    bad[STUDENT_PREFIX + "head.0.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="holds a student trunk"):
        build_predictor("sam3", sam3_checkpoint=str(tmp_path / "bad.pt"), tiny=True)
    with pytest.raises(ValueError, match="--predictor: expected sam3, student or finetuned"):
        build_predictor("vit", tiny=True)
    with pytest.raises(ValueError, match="--dtype: expected fp32, bf16 or fp16"):
        build_predictor("sam3", tiny=True, random_weights=True, dtype="int8")


def test_student_checkpoint_layouts_agree(tmp_path):
    """Converted (student under trunk.model.*, heads inside), stage-1 ckpt + sam3.pt and FT ckpt + sam3.pt load
    the same weights; the backbone comes from --backbone, the stage-1 config or the key shapes."""
    sam3 = _tiny_sam3_ckpt(1)
    torch.save(sam3, tmp_path / "sam3.pt")
    torch.manual_seed(2)
    student = build_student("efficientvit_b0", TINY_INTERACTIVE.embed_dim, TINY_INTERACTIVE.grid)
    ssd = student.state_dict()
    converted = {k: v for k, v in sam3.items() if not k.startswith(TRUNK_PREFIX)}
    converted |= {STUDENT_PREFIX + k: v for k, v in ssd.items()}
    torch.save({"model": converted}, tmp_path / "converted.pt")
    torch.save({"model": ssd, "config": {"MODEL": {"BACKBONE": "efficientvit_b0"}}}, tmp_path / "ckpt_epoch_1.pth")
    torch.save({"model": {"student_trunk." + k: v for k, v in ssd.items()}, "epoch": 3}, tmp_path / "ft.pth")
    preds = [
        build_predictor("finetuned", checkpoint=str(tmp_path / "converted.pt"), tiny=True),  # backbone from shapes
        build_predictor("student", checkpoint=str(tmp_path / "ckpt_epoch_1.pth"),
                        sam3_checkpoint=str(tmp_path / "sam3.pt"), tiny=True),
        build_predictor("finetuned", checkpoint=str(tmp_path / "ft.pth"), sam3_checkpoint=str(tmp_path / "sam3.pt"),
                        backbone="es_ev_s", tiny=True),
    ]  # fmt: skip
    img, boxes = _image(3), np.array([[5.0, 5.0, 60.0, 40.0]])
    outs = []
    for p in preds:
        assert all(torch.equal(p.trunk.state_dict()[k], v) for k, v in ssd.items())
        p.set_image(img)
        outs.append(p.predict(boxes=boxes)[2])
    torch.testing.assert_close(outs[1], outs[0])
    torch.testing.assert_close(outs[2], outs[0])
    with pytest.raises(ValueError, match="--sam3-checkpoint: required for the heads"):
        build_predictor("student", checkpoint=str(tmp_path / "ckpt_epoch_1.pth"), tiny=True)
    with pytest.raises(CheckpointError, match="matches none of the 9 backbones"):
        infer_backbone({"head.0.weight": torch.zeros(32, 999, 1, 1)}, "x.pt")
    with pytest.raises(CheckpointError, match="--checkpoint: .*ckpt_epoch_1.pth"):
        build_predictor("student", checkpoint=str(tmp_path / "ckpt_epoch_1.pth"), backbone="repvit_m0_9",
                        sam3_checkpoint=str(tmp_path / "sam3.pt"), tiny=True)  # fmt: skip
    with pytest.raises(FileNotFoundError, match="--checkpoint: file not found"):
        build_predictor("student", checkpoint=str(tmp_path / "none.pt"), tiny=True)
    with pytest.raises(ValueError, match="--checkpoint: required"):
        build_predictor("student", tiny=True)


def test_gradient_free_and_device_consistent():
    pred = build_predictor("sam3", tiny=True, random_weights=True)
    assert not any(p.requires_grad for p in pred.parameters()) and not pred.training
    with pytest.raises(RuntimeError, match="call set_image first"):
        pred.predict(boxes=np.zeros((1, 4)))
    pred.set_image(_image(hw=(20, 30)))
    with pytest.raises(ValueError, match="expected boxes and/or points"):
        pred.predict()
    assert math.isfinite(float(pred.predict(boxes=np.array([[0.0, 0.0, 10.0, 10.0]]))[1][0, 0]))


def test_letterbox_masks_map_back_to_the_image():
    pred = build_predictor("sam3", tiny=True, random_weights=True, preprocess="letterbox", max_hole_area=0)
    pred.set_image(_image(hw=(28, 56)))
    assert pred.valid_hw == (56, 112)  # long side 56 -> 112, rows 56..111 are padding
    low = torch.full((1, 1, 32, 32), -5.0)
    low[..., :16, :16] = 5.0  # left half of the valid (top) half of the padded square
    got = (pred.postprocess(low) > 0)[0, 0]
    assert got.shape == (28, 56) and got[:, :26].all() and not got[:, 30:].any()
    assert pred.predict_boxes(np.array([[1.0, 1.0, 30.0, 20.0]])).shape == (1, 28, 56)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_cpu_fp32(tmp_path):
    torch.save(_tiny_sam3_ckpt(4), tmp_path / "sam3.pt")
    img, boxes = _image(5), np.array([[3.0, 4.0, 40.0, 45.0], [10, 10, 69, 49]])
    lows = []
    for device, dtype in (("cpu", "fp32"), ("cuda", "bf16")):
        pred = build_predictor("sam3", sam3_checkpoint=str(tmp_path / "sam3.pt"), tiny=True, device=device, dtype=dtype)
        pred.set_image(img)
        lows.append(pred.predict(boxes=boxes)[2].cpu())
    assert (lows[1] - lows[0]).abs().mean() < 0.05 * lows[0].abs().mean()  # bf16 rounding only
