"""The conformance suite on timm ViT variants (tiny random-weight models, CPU)."""

from __future__ import annotations

import timm
import torch

import merge_core as mc
from merge_core.testing.conformance import AdapterCase, AdapterConformance

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)


def _builder(name="vit_tiny_patch16_224", **kwargs):
    def build():
        torch.manual_seed(0)
        cfg = {**TINY, **kwargs}
        fused = cfg.pop("fused_attn", True)
        model = timm.create_model(name, pretrained=False, **cfg).eval()
        for block in model.blocks:
            block.attn.fused_attn = fused
        return model

    return build


def _images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _case(case_name, prefix=1, compile=False, patch=None, **kwargs):
    return AdapterCase(
        name=case_name,
        build=_builder(**kwargs),
        inputs=_images,
        patch=patch or mc.patch.timm,
        num_tokens=16 + prefix,
        r=[3, 2, 2],
        run_compile=compile,
    )


class TestTimmConformance(AdapterConformance):
    cases = [
        _case("cls", compile=True),
        _case("registers", prefix=5, reg_tokens=4),
        _case("layerscale_qknorm", init_values=0.5, qk_norm=True),
        _case("avg_no_cls", prefix=0, global_pool="avg", class_token=False, fc_norm=True),
        _case("map_pool", global_pool="map"),
        _case("explicit_attn", fused_attn=False),
        _case("no_prop_attn", patch=lambda m: mc.patch.timm(m, prop_attn=False)),
        _case("distilled", prefix=2, name="deit_tiny_distilled_patch16_224"),
    ]
