"""The conformance suite on torchvision's ViT and Hugging Face ViT / DINOv2 / CLIP-vision / SigLIP-vision
encoders, built from tiny configs with random weights (no download)."""

from __future__ import annotations

import pytest
import torch

import merge_core as mc
from merge_core.testing.conformance import AdapterCase, AdapterConformance

torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

HF = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)


def _seeded(fn):
    def build():
        torch.manual_seed(0)
        return fn().eval()

    return build


def _tv():
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
    )


def _images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _pixels():
    return {"pixel_values": _images()}


def _hf_case(name, build, tokens, compile=False):
    return AdapterCase(
        name=name,
        build=_seeded(build),
        inputs=_pixels,
        patch=mc.patch.hf,
        num_tokens=tokens,
        r=[3, 2, 2],
        run_compile=compile,
        compile_marks=("slow",),  # the timm case compiles in the fast suite; one tiny compile is enough there
    )


class TestTorchvisionHFConformance(AdapterConformance):
    cases = [
        AdapterCase(
            name="torchvision",
            build=_seeded(_tv),
            inputs=_images,
            patch=mc.patch.swag,
            num_tokens=17,
            r=[3, 2, 2],
            run_compile=True,
            compile_marks=("slow",),
        ),
        _hf_case("hf_vit", lambda: transformers.ViTModel(transformers.ViTConfig(**HF)), 17, compile=True),
        _hf_case(
            "hf_vit_classifier",
            lambda: transformers.ViTForImageClassification(transformers.ViTConfig(**HF, num_labels=5)),
            17,
        ),
        _hf_case("hf_dinov2", lambda: transformers.Dinov2Model(transformers.Dinov2Config(**HF)), 17),
        _hf_case(
            "hf_dinov2_registers",
            lambda: transformers.Dinov2WithRegistersModel(
                transformers.Dinov2WithRegistersConfig(**HF, num_register_tokens=2)
            ),
            19,
        ),
        _hf_case("hf_clip_vision", lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**HF)), 17),
        _hf_case("hf_siglip_vision", lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**HF)), 16),
    ]
