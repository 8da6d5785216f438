import copy

import pytest
import torch

from efficientsam3.model.sam3_frozen import PREFIXES, TINY_DIMS, FrozenSAM3, build_frozen_sam3, compile_frozen
from run_kit import CheckpointError


def test_component_sizes_match_research_notes():
    with torch.device("meta"):
        m = FrozenSAM3()
    sizes = m.component_sizes()
    assert sizes == {"neck.convs": 7_802_112, "geometry_encoder": 8_215_808, "encoder": 9_472_512,
                     "decoder": 11_575_093, "scoring": 1_182_976, "segmentation_head": 2_298_881}  # fmt: skip
    assert sum(p.numel() for p in m.parameters()) == 40_547_382


def _inputs(b=2, s=8):
    torch.manual_seed(0)
    embed = torch.randn(b, TINY_DIMS.embed_dim, s, s)
    pts = torch.rand(b, 3, 2)
    boxes = torch.cat([torch.rand(b, 3, 2) * 0.5 + 0.25, torch.rand(b, 3, 2) * 0.3 + 0.1], -1)
    pad = torch.tensor([[False, False, True], [False, False, False]])
    return embed, pts, pad, boxes, pad.clone()


@pytest.mark.parametrize("size", [72, 36])
def test_forward_shapes_and_gradient_to_embedding(size):
    torch.manual_seed(0)
    m = build_frozen_sam3(dims=TINY_DIMS, feature_size=size)
    embed, pts, ppad, boxes, bpad = _inputs()
    embed.requires_grad_(True)
    out = m(embed, pts, ppad, boxes, bpad)
    assert out["pred_logits"].shape == (2, TINY_DIMS.queries)
    assert out["pred_masks"].shape == (2, TINY_DIMS.queries, 32, 32)  # 4 x the embedding grid (288 for 72)
    assert out["presence_logit"].shape == (2,)
    out["pred_masks"].mean().backward()
    assert embed.grad is not None and embed.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.parameters())


def test_load_from_sam3_checkpoint_and_refusals(tmp_path):
    torch.manual_seed(1)
    src = FrozenSAM3(TINY_DIMS)
    full = src.state_dict()
    sd = {}
    for name, prefix in PREFIXES.items():
        for k, v in src.get_submodule(name).state_dict().items():
            sd[prefix + k] = v
    sd["detector.backbone.vision_backbone.trunk.blocks.0.x"] = torch.zeros(1)
    sd["tracker.sam_mask_decoder.y"] = torch.zeros(1)
    torch.save({"model": sd}, tmp_path / "sam3.pt")
    m = build_frozen_sam3(str(tmp_path / "sam3.pt"), TINY_DIMS)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in full.items())
    args = _inputs()
    torch.testing.assert_close(m(*args)["pred_masks"], src.eval()(*args)["pred_masks"])
    del sd["detector.transformer.decoder.query_embed.weight"]
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="missing key 'query_embed.weight'"):
        build_frozen_sam3(str(tmp_path / "bad.pt"), TINY_DIMS)
    with pytest.raises(FileNotFoundError, match="MODEL.SAM3_CHECKPOINT: file not found"):
        build_frozen_sam3(str(tmp_path / "none.pt"), TINY_DIMS)
    with pytest.raises(ValueError, match="MODEL.FEATURE_SIZE: expected 72 or 36"):
        FrozenSAM3(TINY_DIMS, 48)


@pytest.mark.parametrize("size", [72, 36])
def test_mask_query_equals_picking_from_all_masks(size):
    """One query's mask (what the FT needs) equals that query picked from all Q masks, forward and gradient."""
    torch.manual_seed(0)
    m = build_frozen_sam3(dims=TINY_DIMS, feature_size=size)
    embed, pts, ppad, boxes, bpad = _inputs()
    full = m(embed, pts, ppad, boxes, bpad)
    idx = torch.tensor([3, 5])
    rows = torch.arange(2)
    one = m(embed, pts, ppad, boxes, bpad, mask_query=idx)
    assert one["pred_masks"].shape == (2, 1, 32, 32) and one["query"] is idx
    torch.testing.assert_close(one["pred_masks"][:, 0], full["pred_masks"][rows, idx], atol=1e-5, rtol=1e-5)
    best = m(embed, pts, ppad, boxes, bpad, mask_query="best")
    want = full["pred_logits"].argmax(1)
    assert torch.equal(best["query"], want)
    torch.testing.assert_close(best["pred_masks"][:, 0], full["pred_masks"][rows, want], atol=1e-5, rtol=1e-5)
    grads = []
    for q in (None, idx):
        e = embed.clone().requires_grad_(True)
        out = m(e, pts, ppad, boxes, bpad, mask_query=q)["pred_masks"]
        (out[rows, idx] if q is None else out[:, 0]).square().mean().backward()
        grads.append(e.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="mask_query"):
        m(embed, pts, ppad, boxes, bpad, mask_query="all")


@pytest.mark.parametrize("size", [72, 36])
def test_image_features_reuse_and_unused_level_skipped(size):
    """forward(features=image_features(x)) equals forward(x); at 72 the 36x36 FPN branch never runs (nothing
    reads it), at 36 all four do."""
    torch.manual_seed(0)
    m = build_frozen_sam3(dims=TINY_DIMS, feature_size=size)
    embed, pts, ppad, boxes, bpad = _inputs()
    calls = []
    m.neck.convs[3].register_forward_hook(lambda *_: calls.append(1))
    a = m(embed, pts, ppad, boxes, bpad, mask_query="best")
    assert len(calls) == (0 if size == 72 else 1)
    feats, pos = m.image_features(embed)
    assert [f.shape[-1] for f in feats] == ([32, 16, 8] if size == 72 else [32, 16, 8, 4])
    b = m(None, pts, ppad, boxes, bpad, mask_query="best", features=(feats, pos))
    for k in a:
        torch.testing.assert_close(b[k], a[k])
    with pytest.raises(ValueError, match="mask_query: expected None, an index tensor or 'best'"):
        m(embed, pts, ppad, boxes, bpad, mask_query="all")


@pytest.mark.slow
def test_compiled_frozen_path_equals_eager():
    """compile_frozen (fullgraph, static shapes; aot_eager here: dynamo capture + AOTAutograd's forward/backward
    graphs without code generation, which takes minutes on 2 CPU cores) gives the eager outputs and the same
    gradient to the embedding; the teacher pass ("best", no grad) and the student pass (index, grad)."""
    torch.manual_seed(0)
    eager = build_frozen_sam3(dims=TINY_DIMS)
    compiled = compile_frozen(copy.deepcopy(eager), backend="aot_eager")
    embed, pts, ppad, boxes, bpad = _inputs()
    with torch.no_grad():
        a = eager(embed, pts, ppad, boxes, bpad, mask_query="best")
        b = compiled(embed, pts, ppad, boxes, bpad, mask_query="best")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5)
    grads = []
    for m in (eager, compiled):
        e = embed.clone().requires_grad_(True)
        out = m(e, pts, ppad, boxes, bpad, mask_query=a["query"])["pred_masks"]
        out.sigmoid().mean().backward()
        grads.append((out.detach(), e.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for p in compiled.parameters())
