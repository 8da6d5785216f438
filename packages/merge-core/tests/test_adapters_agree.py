"""torchvision and Hugging Face adapters merge exactly like the timm adapter (itself checked against the
loop-based ToMe oracle in test_patch_timm.py) when the three models carry the same weights."""

from __future__ import annotations

import pytest
import timm
import torch

import merge_core as mc

torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

DIM, DEPTH, HEADS, MLP = 32, 3, 2, 64


def _timm():
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        mlp_ratio=MLP / DIM,
        num_classes=5,
    ).eval()


def _copy_block(blk, norm1, qkv_w, qkv_b, proj, norm2, fc1, fc2):
    with torch.no_grad():
        blk.norm1.weight.copy_(norm1.weight), blk.norm1.bias.copy_(norm1.bias)
        blk.attn.qkv.weight.copy_(qkv_w), blk.attn.qkv.bias.copy_(qkv_b)
        blk.attn.proj.weight.copy_(proj.weight), blk.attn.proj.bias.copy_(proj.bias)
        blk.norm2.weight.copy_(norm2.weight), blk.norm2.bias.copy_(norm2.bias)
        blk.mlp.fc1.weight.copy_(fc1.weight), blk.mlp.fc1.bias.copy_(fc1.bias)
        blk.mlp.fc2.weight.copy_(fc2.weight), blk.mlp.fc2.bias.copy_(fc2.bias)


def _copy_stem(vit, conv, cls, pos, norm):
    with torch.no_grad():
        vit.patch_embed.proj.weight.copy_(conv.weight), vit.patch_embed.proj.bias.copy_(conv.bias)
        vit.cls_token.copy_(cls), vit.pos_embed.copy_(pos)
        vit.norm.weight.copy_(norm.weight), vit.norm.bias.copy_(norm.bias)


def _images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("prop_attn", [True, False])
def test_torchvision_equals_timm(prop_attn):
    torch.manual_seed(1)
    tv = torchvision.models.VisionTransformer(32, 8, DEPTH, HEADS, DIM, MLP, num_classes=5).eval()
    vit = _timm()
    _copy_stem(vit, tv.conv_proj, tv.class_token, tv.encoder.pos_embedding, tv.encoder.ln)
    for blk, layer in zip(vit.blocks, tv.encoder.layers, strict=True):
        att = layer.self_attention
        _copy_block(
            blk, layer.ln_1, att.in_proj_weight, att.in_proj_bias, att.out_proj, layer.ln_2, layer.mlp[0], layer.mlp[3]
        )
    with torch.no_grad():
        vit.head.weight.copy_(tv.heads.head.weight), vit.head.bias.copy_(tv.heads.head.bias)
    mc.patch.timm(vit, prop_attn=prop_attn)
    mc.patch.swag(tv, prop_attn=prop_attn)
    vit.r = tv.r = [4, 3, 2]
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(tv(x), vit(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tv._merge_info.size, vit._merge_info.size)


@pytest.mark.parametrize("prop_attn", [True, False])
def test_hf_vit_equals_timm(prop_attn):
    torch.manual_seed(1)
    cfg = transformers.ViTConfig(
        hidden_size=DIM,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        intermediate_size=MLP,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-6,
    )
    hf = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    vit = _timm()
    emb = hf.embeddings
    _copy_stem(vit, emb.patch_embeddings.projection, emb.cls_token, emb.position_embeddings, hf.layernorm)
    for blk, layer in zip(vit.blocks, hf.layers, strict=True):
        att = layer.attention
        qkv_w = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])
        qkv_b = torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias])
        _copy_block(
            blk, layer.layernorm_before, qkv_w, qkv_b, att.o_proj, layer.layernorm_after, layer.mlp.fc1, layer.mlp.fc2
        )
    mc.patch.timm(vit, prop_attn=prop_attn)
    mc.patch.hf(hf, prop_attn=prop_attn)
    vit.r = hf.r = [4, 3, 2]
    x = _images()
    with torch.no_grad():
        got = hf(pixel_values=x).last_hidden_state
        torch.testing.assert_close(got, vit.forward_features(x), rtol=1e-5, atol=1e-5)
    assert got.shape[1] == 17 - 9
