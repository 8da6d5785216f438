import importlib.util
import os
import sys
import types

import pytest
import torch

from efficientsam3.model.sam3_vit import (
    SAM3_VIT,
    TINY_VIT,
    SAM3ViT,
    axial_rope,
    from_window_major,
    rope_tables,
    rotate,
    rotate_fast,
    to_window_major,
    window_major_order,
)
from efficientsam3.model.teacher import CheckpointKeyError, StandInTeacher, build_teacher, load_trunk

PREFIX = "detector.backbone.vision_backbone.trunk."


def test_full_layout_420_keys_446m():
    with torch.device("meta"):
        m = SAM3ViT(SAM3_VIT)
    sd = m.state_dict()
    assert len(sd) == 420  # research notes 2.1: 420 trunk entries
    assert abs(sum(p.numel() for p in m.parameters()) / 1e6 - 446.24) < 0.01
    assert sd["blocks.0.attn.freqs_cis"].shape == (24 * 24, 32)  # window RoPE
    assert sd["blocks.7.attn.freqs_cis"].shape == (72 * 72, 32)  # global RoPE
    assert "patch_embed.proj.bias" not in sd and sd["pos_embed"].shape == (1, 577, 1024)


def test_rope_matches_complex_multiplication():
    f = axial_rope(8, 3, 1.0, 10000.0)
    x = torch.randn(2, 9, 8)
    ref = torch.view_as_real(torch.view_as_complex(x.reshape(2, 9, 4, 2)) * f).flatten(-2)
    torch.testing.assert_close(rotate(x, f), ref)
    # angle of the first x frequency equals the x position; y starts at index head_dim/4
    assert torch.allclose(f[4].angle()[0], torch.tensor(1.0)) and torch.allclose(f[4].angle()[2], torch.tensor(1.0))
    g = axial_rope(8, 3, 1 / 3, 10000.0)
    assert torch.allclose(g[1].angle()[0], torch.tensor(1 / 3))


def _naive_block(block, x):
    """Window attention written out: each window through norm1 -> attention -> proj on its own."""
    ws = block.window_size
    h = x.shape[1]
    y = block.norm1(x)
    out = torch.zeros_like(x)
    a = block.attn
    for i in range(0, h, ws):
        for j in range(0, h, ws):
            win = y[:, i : i + ws, j : j + ws].reshape(x.shape[0], ws * ws, -1)
            q, k, v = a.qkv(win).chunk(3, dim=-1)
            q, k, v = (t.reshape(x.shape[0], ws * ws, a.num_heads, -1).transpose(1, 2) for t in (q, k, v))
            q, k = rotate(q, a.freqs_cis), rotate(k, a.freqs_cis)
            att = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
            o = (att @ v).transpose(1, 2).reshape(x.shape[0], ws, ws, -1)
            out[:, i : i + ws, j : j + ws] = a.proj(o)
    x = x + out
    return x + block.mlp(block.norm2(x))


def test_window_block_equals_naive_loop():
    m = SAM3ViT(TINY_VIT).eval()
    x = torch.randn(2, 8, 8, 32)
    with torch.no_grad():
        torch.testing.assert_close(m.blocks[0](x), _naive_block(m.blocks[0], x), atol=1e-5, rtol=1e-4)


def test_tiny_forward_and_standin_interface():
    t = build_teacher("sam3_tiny")
    y = t(torch.randn(1, 3, 112, 112))
    assert y.shape == (1, t.embed_dim, t.embed_size, t.embed_size) == (1, 32, 8, 8)
    s = build_teacher("standin", embed_dim=16, embed_size=8, img_size=64)
    assert isinstance(s, StandInTeacher) and s(torch.randn(2, 3, 64, 64)).shape == (2, 16, 8, 8)
    assert not any(p.requires_grad for p in t.parameters())


def test_load_from_sam3_checkpoint(tmp_path):
    src = SAM3ViT(TINY_VIT)
    sd = {PREFIX + k: v for k, v in src.state_dict().items() if not k.endswith("freqs_cis")}
    sd["detector.transformer.encoder.w"] = torch.zeros(2)
    sd["tracker.sam_mask_decoder.w"] = torch.zeros(2)
    path = tmp_path / "sam3.pt"
    torch.save({"model": sd}, path)
    t = build_teacher("sam3_tiny", checkpoint=str(path))
    torch.testing.assert_close(t.blocks[3].mlp.fc2.weight, src.blocks[3].mlp.fc2.weight)
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(t(x), src(x))
    bad = dict(sd)
    bad[PREFIX + "blocks.0.attn.qkv.weight"] = torch.zeros(5, 5)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointKeyError, match="shape mismatch for blocks.0.attn.qkv.weight"):
        build_teacher("sam3_tiny", checkpoint=str(tmp_path / "bad.pt"))
    del bad[PREFIX + "blocks.0.attn.qkv.weight"]
    bad[PREFIX + "blocks.0.attn.qkv.weight"] = sd[PREFIX + "blocks.0.attn.qkv.weight"]
    del bad[PREFIX + "pos_embed"]
    torch.save(bad, tmp_path / "bad2.pt")
    with pytest.raises(CheckpointKeyError, match="missing trunk key pos_embed"):
        build_teacher("sam3_tiny", checkpoint=str(tmp_path / "bad2.pt"))
    (tmp_path / "junk.pt").write_text("hello")
    with pytest.raises(CheckpointKeyError, match="not a torch checkpoint"):
        load_trunk(SAM3ViT(TINY_VIT), str(tmp_path / "junk.pt"))
    with pytest.raises(FileNotFoundError, match="TEACHER.CHECKPOINT"):
        build_teacher("sam3_tiny", checkpoint=str(tmp_path / "none.pt"))


@pytest.mark.skipif(not os.environ.get("SAM3_SRC"), reason="set SAM3_SRC to an unpacked sam3 wheel (sam3/model/...)")
def test_equals_pypi_sam3_vitdet():
    """Against sam3 0.1.4's own ViT (its two modules loaded standalone; the package itself needs CUDA shims)."""
    root = os.path.join(os.environ["SAM3_SRC"], "sam3", "model") + os.sep
    pkg = types.ModuleType("_s3m")
    pkg.__path__ = [root]
    sys.modules["_s3m"] = pkg
    mods = {}
    for name in ("model_misc", "vitdet"):
        spec = importlib.util.spec_from_file_location(f"_s3m.{name}", root + name + ".py")
        mods[name] = importlib.util.module_from_spec(spec)
        sys.modules[f"_s3m.{name}"] = mods[name]
        spec.loader.exec_module(mods[name])
    c = TINY_VIT
    ref = mods["vitdet"].ViT(
        img_size=c.img_size, pretrain_img_size=c.pretrain_img_size, patch_size=c.patch_size, embed_dim=c.embed_dim,
        depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, drop_path_rate=0.0, tile_abs_pos=True,
        global_att_blocks=c.global_att_blocks, rel_pos_blocks=(), use_rope=True, use_interp_rope=True,
        window_size=c.window_size, retain_cls_token=False, ln_pre=True, ln_post=False, bias_patch_embed=False,
    ).eval()  # fmt: skip
    mine = SAM3ViT(c).eval()
    assert sorted(ref.state_dict()) == sorted(mine.state_dict())
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, c.img_size, c.img_size)
    with torch.no_grad():
        want = ref(x)[-1]
        mine.fast = False
        torch.testing.assert_close(mine(x), want, atol=1e-6, rtol=1e-5)
        mine.fast = True
        torch.testing.assert_close(mine(x), want, atol=1e-5, rtol=1e-5)


def test_missing_checkpoint_is_reported_before_the_trunk_is_built(monkeypatch, tmp_path):
    import efficientsam3.model.teacher as teacher_module

    def never(*args, **kwargs):
        raise AssertionError("the 446M trunk must not be built for a checkpoint that does not exist")

    monkeypatch.setattr(teacher_module, "SAM3ViT", never)
    with pytest.raises(FileNotFoundError, match="TEACHER.CHECKPOINT: file not found"):
        teacher_module.build_teacher("sam3", str(tmp_path / "sam3.pt"))


def _tiny(seed=0):
    torch.manual_seed(seed)
    return SAM3ViT(TINY_VIT).eval()


def test_fast_rope_equals_complex_rope():
    f = axial_rope(8, 3, 0.5, 10000.0)
    x = torch.randn(2, 9, 8)
    cos, sin = rope_tables(f)
    torch.testing.assert_close(rotate_fast(x, cos, sin), rotate(x, f))
    xb = x.bfloat16()
    got = rotate_fast(xb, cos.bfloat16(), sin.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), rotate(xb, f).float(), atol=3e-2, rtol=2e-2)


def test_window_major_order_round_trip():
    x = torch.arange(2 * 8 * 8 * 3, dtype=torch.float32).view(2, 8, 8, 3)
    t = to_window_major(x, 4)
    order = window_major_order(8, 4)
    torch.testing.assert_close(t, x.reshape(2, 64, 3)[:, order])  # raster index of each window-major slot
    assert order[:5].tolist() == [0, 1, 2, 3, 8]  # first window's first row, then its second row
    torch.testing.assert_close(from_window_major(t, 4, 8, 8), x.permute(0, 3, 1, 2))


def test_fast_path_equals_reference_path_fp32():
    m = _tiny()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert m.uses_fast_path()
        fast = m(x)
        m.fast = False
        ref = m(x)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and the reference path against the naive per-window loop (independent code)
        m.fast = True
        y = m.ln_pre(m.patch_embed(x) + m.abs_pos(8, 8))
        for blk in m.blocks:
            y = _naive_block(blk, y) if blk.window_size else blk(y)
        torch.testing.assert_close(fast, y.permute(0, 3, 1, 2), atol=1e-5, rtol=1e-5)


def test_fast_path_bf16_within_rounding_of_fp32_reference():
    m = _tiny()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        m.fast = False
        ref = m(x)
        m.fast = True
        got = m.to(torch.bfloat16)(x.bfloat16()).float()
    assert m.blocks[1].attn.rope_cos.dtype == torch.bfloat16  # RoPE in the compute dtype
    assert m.blocks[1].attn.freqs_cis.dtype == torch.complex64  # the checkpoint table stays complex
    cos = torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1))
    assert cos.min() > 0.9999
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_fast_tables_not_in_state_dict_and_refreshed_on_load():
    m = _tiny()
    sd = m.state_dict()
    assert len(sd) == len([k for k in sd if "rope_" not in k and not k.endswith(".order")])
    blk = m.blocks[1].attn  # a global block: its tables are in window-major order
    sd["blocks.1.attn.freqs_cis"] = torch.ones_like(sd["blocks.1.attn.freqs_cis"])  # angle 0 everywhere
    m.load_state_dict(sd)
    torch.testing.assert_close(blk.rope_cos, torch.ones_like(blk.rope_cos))
    torch.testing.assert_close(blk.rope_sin, torch.zeros_like(blk.rope_sin))


def test_merged_or_padded_trunk_takes_the_reference_path():
    from efficientsam3.model.merged_teacher import apply_merging, remove_merging

    m = _tiny()
    apply_merging(m, 0, 0)
    assert not m.uses_fast_path()
    remove_merging(m)
    assert m.uses_fast_path()
    cfg = TINY_VIT.__class__(**{**TINY_VIT.__dict__, "img_size": 84, "pretrain_img_size": 42})  # 6x6 grid
    padded = SAM3ViT(cfg).eval()
    assert not padded.uses_fast_path()
    assert padded(torch.randn(1, 3, 84, 84)).shape == (1, 32, 6, 6)


def test_fast_path_traces_as_one_graph():
    """fullgraph tracing (what `compile_trunk` asks inductor for) without inductor's slow CPU codegen."""
    m = _tiny()
    x = torch.randn(2, 3, 112, 112)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(m, fullgraph=True, dynamic=False, backend="aot_eager")(x)
        torch.testing.assert_close(got, m(x), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
