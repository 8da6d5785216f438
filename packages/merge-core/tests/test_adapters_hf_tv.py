"""torchvision / Hugging Face adapters beyond the conformance suite: pooling, towers, clear refusals."""

from __future__ import annotations

import pytest
import timm
import torch

import merge_core as mc
from merge_core.testing.conformance import tensors

transformers = pytest.importorskip("transformers")
HF = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)


def _images(batch=2):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_siglip_attention_pool_is_size_weighted():
    torch.manual_seed(0)
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**HF)).eval()
    head_cls = type(model.head)
    mc.patch.hf(model)
    model.r = 4
    with torch.no_grad():
        out = model(pixel_values=_images())
        size = model._merge_info.size
        tokens = out.last_hidden_state
        assert tokens.shape[1] == 16 - 8
        # a token of size s must pool like s copies of it, through the unpatched head
        plain = head_cls.forward
        copies = [t.repeat_interleave(s[:, 0].long(), dim=0)[None] for t, s in zip(tokens, size, strict=True)]
        expected = torch.cat([plain(model.head, c) for c in copies])
    torch.testing.assert_close(out.pooler_output, expected, rtol=1e-5, atol=1e-5)


def test_clip_model_merges_only_the_vision_tower():
    torch.manual_seed(0)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = transformers.CLIPModel(transformers.CLIPConfig(vision_config=HF, text_config=text)).eval()
    ids = torch.tensor([[0, 5, 6, 2]])
    with torch.no_grad():
        text_before = model.get_text_features(input_ids=ids)
        mc.patch.hf(model)
        model.r = 3
        feats = model.get_image_features(pixel_values=_images())
        assert model._merge_info.tokens == [14, 11]
        features = getattr(feats, "pooler_output", feats)
        assert torch.isfinite(features).all()
        text_after = model.get_text_features(input_ids=ids)
        for a, b in zip(tensors(text_after), tensors(text_before), strict=True):
            assert torch.equal(a, b)
    assert type(model.text_model.encoder.layers[0]).__name__ == "CLIPEncoderLayer"


def test_hf_rejects_unsupported_heads_and_masks():
    torch.manual_seed(0)
    with pytest.raises(TypeError, match="Dinov2ForImageClassification is not supported: it averages patch tokens"):
        mc.patch.hf(transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**HF)))
    with pytest.raises(TypeError, match="model must be one of the Hugging Face vision encoders"):
        mc.patch.hf(torch.nn.Linear(2, 2))
    model = transformers.Dinov2Model(transformers.Dinov2Config(**HF)).eval()
    mc.patch.hf(model)
    model.r = 2
    with pytest.raises(ValueError, match="attention_mask cannot be combined with token merging"):
        mask = torch.ones(2, 17, dtype=torch.bool)
        mask[:, -1] = False
        model(pixel_values=_images(), attention_mask=mask)


def test_unsupported_models_keep_a_clear_error():
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=1)
    with pytest.raises(TypeError, match="model must be a timm VisionTransformer .*got Eva"):
        mc.patch.timm(eva)
    resnet = timm.create_model("resnet10t", pretrained=False)
    with pytest.raises(TypeError, match="model must be a timm VisionTransformer"):
        mc.patch.timm(resnet)
    with pytest.raises(TypeError, match="model must be a torchvision VisionTransformer"):
        mc.patch.swag(resnet)


def test_no_module_imports_transformers_or_torchvision():
    """Optional extras: no merge_core module imports them (adapters recognise classes by name)."""
    import ast
    from pathlib import Path

    offenders = []
    for path in Path(mc.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("transformers", "torchvision")]
    assert not offenders


def test_hf_gradient_checkpointing_with_merging():
    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(**HF)).train()
    mc.patch.hf(model)
    model.r = 3
    x = _images()

    def grads():
        model.zero_grad(set_to_none=True)
        model(pixel_values=x).last_hidden_state.square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected = grads()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got = grads()
    assert model._merge_info.checkpointing and got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_hf_hidden_states_and_attentions():
    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(**HF)).eval()
    x = _images()
    with torch.no_grad():
        expected = model(pixel_values=x, output_hidden_states=True).hidden_states
        mc.patch.hf(model)
        got = model(pixel_values=x, output_hidden_states=True).hidden_states
        assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
        model.r = 3
        merged = model(pixel_values=x, output_hidden_states=True).hidden_states
        assert [h.shape[1] for h in merged] == [17, 14, 11]  # embeddings, then each merged layer
        with pytest.raises(ValueError, match="output_attentions=True cannot be combined with token merging"):
            model(pixel_values=x, output_attentions=True)


def test_dinov2_registers_are_protected():
    torch.manual_seed(0)
    cfg = transformers.Dinov2WithRegistersConfig(**HF, num_register_tokens=2)
    model = transformers.Dinov2WithRegistersModel(cfg).eval()
    mc.patch.hf(model)
    model.r = [8, 0]
    with torch.no_grad():
        model(pixel_values=_images())
    size = model._merge_info.size
    # class token + 2 registers never merge: at most (19 - 3) // 2 = 8 of the 16 patches go
    assert model._merge_info.protected == 3 and size.shape[1] == 11
    assert torch.all(size[:, :3] == 1) and torch.all(size.sum(1) == 19)


def test_hf_mask_built_by_transformers_is_not_a_user_mask():
    """Some transformers versions hand every layer an all-visible mask they built themselves (seen under
    torch.compile with transformers 5.17 on an H200): with no user mask, merging must still run and give the
    same output as without that mask."""
    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(**HF), add_pooling_layer=False).eval()
    mc.patch.hf(model)
    model.r = 2
    x = _images()
    expected = model(pixel_values=x).last_hidden_state
    blocks = [m for m in model.modules() if any(c.__name__ == "ViTLayer" for c in type(m).__mro__)]
    assert len(blocks) == HF["num_hidden_layers"]

    def with_builtin_mask(self, hidden_states, attention_mask=None, *args, **kwargs):
        b, n = hidden_states.shape[:2]
        return type(self).forward(self, hidden_states, torch.zeros(b, 1, n, n), *args, **kwargs)

    for block in blocks:
        block.forward = with_builtin_mask.__get__(block)
    got = model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(got, expected)
    assert got.shape[1] == 1 + (HF["image_size"] // HF["patch_size"]) ** 2 - 2 * HF["num_hidden_layers"]
