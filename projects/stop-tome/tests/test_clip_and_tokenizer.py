"""CLIP in the OpenAI layout, the weight loader and the tokenizer, against independent references."""

from __future__ import annotations

import pytest
import torch

from stop_tome.clip_model import CLIP, spec_from_state_dict
from stop_tome.testing import TINY
from stop_tome.tokenizer import ClipTokenizer
from stop_tome.weights import clip_file, load_clip_state_dict


def test_tokenizer_matches_open_clip_ids():
    tok = ClipTokenizer()
    # ids produced by open_clip.tokenizer.SimpleTokenizer (an independent implementation) on this machine
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tok.encode("Hello,   World! It's 2 dogs.") == [3306, 267, 1002, 256, 585, 568, 273, 3255, 269]
    ids, mask = tok.encode_padded("a photo of a cat", 10)
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407, 0, 0, 0] and mask == [1] * 7 + [0] * 3
    ids, _ = tok.encode_padded("a photo of a cat", 4)  # truncation keeps EOT
    assert ids == [49406, 320, 1125, 49407]
    assert tok.decode(tok.encode("a photo of a cat")) == "a photo of a cat"
    assert tok.convert_tokens_to_ids(tok.tokenize("cat")) == [2368]


def test_openai_key_layout_and_spec(clip_sd):
    for key in (
        "visual.conv1.weight",
        "visual.class_embedding",
        "visual.transformer.resblocks.0.attn.in_proj_weight",
        "visual.proj",
        "transformer.resblocks.1.mlp.c_fc.weight",
        "token_embedding.weight",
        "text_projection",
        "logit_scale",
        "ln_final.weight",
        "visual.ln_post.bias",
    ):
        assert key in clip_sd
    assert spec_from_state_dict(clip_sd) == TINY


def test_loads_state_dict_and_torchscript(weights_dir, clip_sd):
    for name in ("ViT-B/32", "ViT-B/16"):
        sd = load_clip_state_dict(clip_file(name, weights_dir))
        assert set(sd) == set(clip_sd)
        assert all(torch.equal(sd[k], clip_sd[k]) for k in sd)


def test_missing_and_bad_weight_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="--pretrained_clip_name 'ViT-B/32'.*ViT-B-32.pt"):
        clip_file("ViT-B/32", tmp_path)
    (tmp_path / "ViT-B-32.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="neither a TorchScript archive nor a state dict"):
        load_clip_state_dict(tmp_path / "ViT-B-32.pt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an OpenAI CLIP state dict"):
        load_clip_state_dict(tmp_path / "other.pt")


def _reference_text(model: CLIP, ids: torch.Tensor) -> torch.Tensor:
    """OpenAI's text tower written with nn.MultiheadAttention in LND and an explicit causal mask."""
    x = model.token_embedding(ids) + model.positional_embedding[: ids.shape[1]]
    x = x.permute(1, 0, 2)
    n = ids.shape[1]
    mask = torch.full((n, n), float("-inf")).triu_(1)
    for blk in model.transformer.resblocks:
        h = blk.ln_1(x)
        x = x + blk.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        x = x + blk.mlp(blk.ln_2(x))
    x = model.ln_final(x.permute(1, 0, 2))
    return x[torch.arange(x.shape[0]), ids.argmax(-1)] @ model.text_projection


def _reference_image(model: CLIP, image: torch.Tensor) -> torch.Tensor:
    v = model.visual
    x = v.conv1(image).flatten(2).permute(0, 2, 1)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], 1) + v.positional_embedding
    x = v.ln_pre(x).permute(1, 0, 2)
    for blk in v.transformer.resblocks:
        h = blk.ln_1(x)
        x = x + blk.attn(h, h, h, need_weights=False)[0]
        x = x + blk.mlp(blk.ln_2(x))
    return v.ln_post(x[0]) @ v.proj


def test_plain_clip_matches_reference(clip_sd):
    model = CLIP(TINY).eval()
    model.load_state_dict(clip_sd)
    ids = torch.randint(1, 400, (3, 9))
    ids[:, 6] = 49407
    ids[:, 7:] = 0
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids), _reference_text(model, ids), atol=1e-5, rtol=1e-4)
        tokens, _ = model.visual(image[:, None])
        ours = model.visual.ln_post(tokens[:, 0]) @ model.visual.proj
        torch.testing.assert_close(ours, _reference_image(model, image), atol=1e-5, rtol=1e-4)
