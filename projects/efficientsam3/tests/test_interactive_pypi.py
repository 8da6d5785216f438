"""The interactive predictor against sam3 0.1.4's own modules (SAM3_SRC = an unpacked wheel): prompt encoder
and mask decoder as the tracker builds them, and the whole `SAM3InteractiveImagePredictor` path (neck ->
no_mem_embed -> heads -> hole filling -> upsampling) on the same random weights. The wheel is imported
without its package __init__ (which needs CUDA-only and undeclared dependencies): two imports it does not
use on this path are stubbed (`sam3.sam.rope`, needing einops; the training collator, needing iopath)."""

import importlib
import os
import sys
import types

import numpy as np
import pytest
import torch

from efficientsam3.model.sam3_interactive import (
    HEAD_PREFIXES,
    NO_MEM_KEY,
    InteractiveDims,
    InteractiveHeads,
    InteractivePredictor,
    load_heads,
)

pytestmark = pytest.mark.skipif(not os.environ.get("SAM3_SRC"), reason="set SAM3_SRC to an unpacked sam3 wheel")


@pytest.fixture
def wheel(monkeypatch):
    root = os.path.join(os.environ["SAM3_SRC"], "sam3")
    for name in ("sam3", "sam3.model", "sam3.model.utils", "sam3.sam", "sam3.perflib", "sam3.train", "sam3.train.data"):
        pkg = types.ModuleType(name)
        pkg.__path__ = [os.path.join(root, *name.split(".")[1:])]
        monkeypatch.setitem(sys.modules, name, pkg)
    rope = types.ModuleType("sam3.sam.rope")
    rope.apply_rotary_enc = rope.apply_rotary_enc_real = rope.compute_axial_cis = None
    monkeypatch.setitem(sys.modules, "sam3.sam.rope", rope)
    collator = types.ModuleType("sam3.train.data.collator")
    collator.BatchedDatapoint = object
    monkeypatch.setitem(sys.modules, "sam3.train.data.collator", collator)
    before = set(sys.modules)

    mods = types.SimpleNamespace(
        pe=importlib.import_module("sam3.sam.prompt_encoder"),
        md=importlib.import_module("sam3.sam.mask_decoder"),
        tw=importlib.import_module("sam3.sam.transformer"),
        tb=importlib.import_module("sam3.model.sam3_tracker_base"),
        pred=importlib.import_module("sam3.model.sam1_task_predictor"),
        necks=importlib.import_module("sam3.model.necks"),
        vl=importlib.import_module("sam3.model.vl_combiner"),
        pos=importlib.import_module("sam3.model.position_encoding"),
    )
    yield mods
    for name in set(sys.modules) - before:
        if name.startswith("sam3"):
            del sys.modules[name]


DIMS = InteractiveDims(embed_dim=32, d_model=32, heads=4, mlp_dim=64, iou_hidden=24, mask_in_chans=8, image_size=112)


def _wheel_heads(w, d: InteractiveDims):
    s = d.grid
    pe = w.pe.PromptEncoder(embed_dim=d.d_model, image_embedding_size=(s, s), input_image_size=(d.image_size,) * 2,
                            mask_in_chans=d.mask_in_chans)  # fmt: skip
    md = w.md.MaskDecoder(
        num_multimask_outputs=3,
        transformer_dim=d.d_model,
        iou_head_depth=3,
        iou_head_hidden_dim=d.iou_hidden,
        transformer=w.tw.TwoWayTransformer(depth=2, embedding_dim=d.d_model, mlp_dim=d.mlp_dim, num_heads=d.heads),
        use_high_res_features=True,
        iou_prediction_use_sigmoid=True,
        pred_obj_scores=True,
        pred_obj_scores_mlp=True,
        use_multimask_token_for_obj_ptr=True,
        dynamic_multimask_via_stability=True,
        dynamic_multimask_stability_delta=0.05,
        dynamic_multimask_stability_thresh=0.98,
    )  # fmt: skip  (the arguments of Sam3TrackerBase._build_sam_heads + build_tracker's extra args)
    return pe.eval(), md.eval()


def _perturbed(sd, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in sd.items()}


def test_heads_equal_wheel(wheel):
    torch.manual_seed(0)
    pe, md = _wheel_heads(wheel, DIMS)
    heads = InteractiveHeads(DIMS).eval()
    assert sorted(pe.state_dict()) == sorted(heads.sam_prompt_encoder.state_dict())
    assert sorted(md.state_dict()) == sorted(heads.sam_mask_decoder.state_dict())
    pe.load_state_dict(_perturbed(pe.state_dict(), 1))
    md.load_state_dict(_perturbed(md.state_dict(), 2))
    heads.sam_prompt_encoder.load_state_dict(pe.state_dict())
    heads.sam_mask_decoder.load_state_dict(md.state_dict())
    s, d = DIMS.grid, DIMS.d_model
    img = torch.randn(1, d, s, s)
    hr = (torch.randn(1, d // 8, 4 * s, 4 * s), torch.randn(1, d // 4, 2 * s, 2 * s))
    coords = torch.rand(5, 3, 2) * DIMS.image_size
    labels = torch.tensor([[2, 3, 1], [2, 3, 0], [2, 3, 1], [1, 0, 1], [2, 3, -1]])
    with torch.no_grad():
        sp_w, de_w = pe(points=(coords, labels), boxes=None, masks=None)
        sp, de = heads.sam_prompt_encoder.embed_points(coords, labels), heads.sam_prompt_encoder.embed_dense(5)
        torch.testing.assert_close(sp, sp_w)
        torch.testing.assert_close(de, de_w)
        torch.testing.assert_close(heads.sam_prompt_encoder.dense_pe(), pe.get_dense_pe())
        mask_in = torch.randn(5, 1, 4 * s, 4 * s)
        torch.testing.assert_close(heads.sam_prompt_encoder.embed_dense(5, mask_in), pe(None, None, mask_in)[1])
        for multimask in (False, True):
            want_m, want_iou, _, _ = md(img, pe.get_dense_pe(), sp_w, de_w, multimask, True, list(hr))
            got_m, got_iou = heads.sam_mask_decoder(img, heads.sam_prompt_encoder.dense_pe(), sp, de, hr, multimask)
            torch.testing.assert_close(got_m, want_m, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(got_iou, want_iou, atol=1e-5, rtol=1e-4)
        # both branches of the stability rule occur in this draw
        all_m, _, _ = heads.sam_mask_decoder.predict_all(img, heads.sam_prompt_encoder.dense_pe(), sp, de, hr)
        stable = heads.sam_mask_decoder.stability(all_m[:, 0]) >= 0.98
        sharp = all_m.clone()
        sharp[:2, 0] = 50 * torch.sign(sharp[:2, 0])  # far from +-0.05: stable
        assert not stable.all()
        assert (heads.sam_mask_decoder.stability(sharp[:, 0]) >= 0.98)[:2].all()


class _PatchTrunk(torch.nn.Module):
    """The same stand-in trunk on both sides (the ViT is checked against the wheel elsewhere)."""

    channel_list = [DIMS.embed_dim]

    def __init__(self, wrap_list: bool):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, DIMS.embed_dim, DIMS.stride, stride=DIMS.stride)
        self.wrap_list = wrap_list

    def forward(self, x):
        return [self.proj(x)] if self.wrap_list else self.proj(x)


class _Memory(torch.nn.Module):
    d_model, decoder = DIMS.d_model, None


def test_predictor_equals_wheel_predict_inst_path(wheel):
    torch.manual_seed(0)
    pos = wheel.pos.PositionEmbeddingSine(num_pos_feats=DIMS.d_model, normalize=True, temperature=10000)
    neck = wheel.necks.Sam3DualViTDetNeck(_PatchTrunk(True), pos, d_model=DIMS.d_model, add_sam2_neck=True)
    backbone = wheel.vl.SAM3VLBackbone(visual=neck, text=None, scalp=1)
    tracker = wheel.tb.Sam3TrackerBase(
        backbone=backbone, transformer=_Memory(), maskmem_backbone=torch.nn.Identity(), image_size=DIMS.image_size,
        sam_mask_decoder_extra_args={"dynamic_multimask_via_stability": True,
                                     "dynamic_multimask_stability_delta": 0.05,
                                     "dynamic_multimask_stability_thresh": 0.98},
    )  # fmt: skip
    # SAM3's tracker hard-codes 8 heads / MLP 2048 / IoU hidden 256 / mask_in_chans 16: our dims follow it here
    dims = InteractiveDims(DIMS.embed_dim, DIMS.d_model, 8, 2048, 256, 16, DIMS.image_size)
    ref = wheel.pred.SAM3InteractiveImagePredictor(tracker, max_hole_area=256.0).eval()
    s = dims.grid
    ref._bb_feat_sizes = [(4 * s, 4 * s), (2 * s, 2 * s), (s, s)]  # hard-coded 288/144/72 in the wheel
    sd = _perturbed(tracker.state_dict(), 3)
    tracker.load_state_dict(sd)
    ckpt = {"detector.backbone.vision_backbone.sam2_convs." + k: v for k, v in neck.sam2_convs.state_dict().items()}
    ckpt |= {"tracker." + k: v for k, v in sd.items() if k.startswith(("sam_prompt_encoder.", "sam_mask_decoder."))}
    ckpt[NO_MEM_KEY] = sd["no_mem_embed"]
    assert all(any(k.startswith(p) for p in HEAD_PREFIXES.values()) for k in ckpt if k != NO_MEM_KEY)
    heads = InteractiveHeads(dims)
    load_heads(heads, ckpt, "test")
    trunk = _PatchTrunk(False)
    trunk.proj.load_state_dict(neck.trunk.proj.state_dict())
    mine = InteractivePredictor(trunk, heads, max_hole_area=256.0).eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    boxes = np.array([[5, 4, 60, 50], [30, 10, 88, 58], [0, 0, 89, 59]], dtype=np.float32)
    ref.set_image(image)
    mine.set_image(image)
    got_masks, got_iou, got_low = mine.predict(boxes=boxes)
    logits, _, _ = mine.predict(boxes=boxes)  # deterministic
    for i, box in enumerate(boxes):
        want_m, want_iou, want_low = ref.predict(box=box, multimask_output=False)
        torch.testing.assert_close(got_iou[i].numpy(), want_iou, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got_low[i].numpy(), want_low, atol=1e-4, rtol=1e-4)
        assert (got_masks[i].numpy() != want_m.astype(bool)).mean() < 1e-3  # bilinear ties at exactly 0
    pts, labs = np.array([[[20.0, 30.0], [70.0, 20.0]]]), np.array([[1, 0]])
    want_m, want_iou, _ = ref.predict(point_coords=pts[0], point_labels=labs[0], multimask_output=True)
    got_m, got_iou, _ = mine.predict(points=pts, labels=labs, multimask=True)
    torch.testing.assert_close(got_iou[0].numpy(), want_iou, atol=1e-5, rtol=1e-4)
    assert (got_m[0].numpy() != want_m.astype(bool)).mean() < 1e-3
    # hole filling + upsampling on logits with both signs (random heads give near-constant masks)
    g = torch.Generator().manual_seed(5)
    low = torch.nn.functional.interpolate(torch.randn(3, 1, 8, 8, generator=g), (32, 32), mode="bilinear") + 0.3
    low[2, 0, :20, :20] = -1.0  # a 400-px background region: above max_hole_area, kept
    want = ref._transforms.postprocess_masks(low.clone(), image.shape[:2]) > 0
    got = mine.postprocess(low.clone()) > 0
    unfilled = torch.nn.functional.interpolate(low, image.shape[:2], mode="bilinear") > 0
    assert (got != want).float().mean() < 1e-3 and (got != unfilled).any() and not got.all()
    want_m, _, _ = ref.predict(point_coords=pts[0], point_labels=labs[0], box=boxes[0], multimask_output=False)
    got_m, _, _ = mine.predict(boxes=boxes[:1], points=pts, labels=labs)
    assert (got_m[0].numpy() != want_m.astype(bool)).mean() < 1e-3


def test_key_layout_equals_wheel_tracker_and_backbone(monkeypatch):
    """SAM3's own builders at full size: the tracker has 309 keys (sam_mask_decoder 131, sam_prompt_encoder 17,
    no_mem_embed 1, the rest memory modules) and the vision backbone trunk 420 / convs 22 / sam2_convs 22;
    ours must hold exactly the keys and shapes the interactive path uses."""
    root = os.path.join(os.environ["SAM3_SRC"], "sam3")
    for name in ("sam3", "sam3.model", "sam3.model.utils", "sam3.sam", "sam3.perflib", "sam3.train", "sam3.train.data"):
        pkg = types.ModuleType(name)
        pkg.__path__ = [os.path.join(root, *name.split(".")[1:])]
        monkeypatch.setitem(sys.modules, name, pkg)
    collator = types.ModuleType("sam3.train.data.collator")
    collator.BatchedDatapoint = object
    monkeypatch.setitem(sys.modules, "sam3.train.data.collator", collator)
    for name in ("iopath", "iopath.common", "iopath.common.file_io", "psutil", "ftfy", "einops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))  # imported, unused on these builders
    sys.modules["iopath.common.file_io"].g_pathmgr = None
    sys.modules["einops"].rearrange = sys.modules["einops"].repeat = None
    before = set(sys.modules)
    try:
        pe = importlib.import_module("sam3.model.position_encoding")
        init = pe.PositionEmbeddingSine.__init__
        monkeypatch.setattr(pe.PositionEmbeddingSine, "__init__",
                            lambda self, *a, **k: init(self, *a, **{**k, "precompute_resolution": None}))  # fmt: skip
        mb = importlib.import_module("sam3.model_builder")
        tracker = mb.build_tracker(apply_temporal_disambiguation=False).state_dict()
        with torch.device("meta"):
            trunk = torch.nn.Module()
            trunk.channel_list = [1024]  # the neck reads only this from the ViT
            neck = mb._create_vit_neck(pe.PositionEmbeddingSine(256, normalize=True), trunk, True)
    finally:
        for name in set(sys.modules) - before:
            if name.startswith("sam3"):
                del sys.modules[name]
    assert len(tracker) == 309
    with torch.device("meta"):
        heads = InteractiveHeads()
    ours = heads.state_dict()
    used = {k: v for k, v in tracker.items() if k.startswith(("sam_prompt_encoder.", "sam_mask_decoder."))}
    used["no_mem_embed"] = tracker["no_mem_embed"]
    assert len(used) == 149 and {k: tuple(v.shape) for k, v in used.items()} == {
        k: tuple(v.shape) for k, v in ours.items() if not k.startswith("sam2_convs.")
    }
    sam2 = {k: tuple(v.shape) for k, v in neck.sam2_convs.state_dict().items()}
    assert sam2 == {k[len("sam2_convs.") :]: tuple(v.shape) for k, v in ours.items() if k.startswith("sam2_convs.")}
