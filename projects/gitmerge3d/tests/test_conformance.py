"""merge-core's adapter conformance suite on the GitMerge3D PT-v3m2 adapter.

The case is a Sonata 0c segmentor at toy widths with 16-token patches (every stage keeps >= 16 points, so
K = 16 in every block); ``model.r = 8`` removes 8 of 16 tokens per patch with stride 4 (4 destinations,
12 sources), so every attention block keeps 8 tokens per patch: the "tokens per layer" of this adapter
are the tokens attention sees per patch, since merging is undone before ``proj`` and the block keeps all
points. Not run: ``torch.compile(fullgraph=True)``. PT-v3m2 itself cannot be traced without graph breaks
(torch.unique in grid pooling, the patch size read from the batch, a Python dict of tensors flowing
between modules), with or without merging.
"""

import torch

from gitmerge3d import merging
from gitmerge3d.models import DefaultSegmentorV2, PointTransformerV3
from gitmerge3d.models.presets import reduced_config
from merge_core.binned import kept_tokens
from merge_core.testing.conformance import AdapterCase, AdapterConformance


def build():
    torch.manual_seed(0)
    backbone = PointTransformerV3(**reduced_config("0c", patch=16, shuffle_orders=False))
    return DefaultSegmentorV2(4, 16, backbone).eval()


def inputs():
    g = torch.Generator().manual_seed(0)
    coord = torch.rand(2000, 3, generator=g) * 2.0
    grid = torch.div(coord, 0.02, rounding_mode="trunc").int()
    return (
        {"coord": coord, "grid_coord": grid, "feat": torch.randn(2000, 9, generator=g), "offset": torch.tensor([2000])},
    )


def apply(model):
    merging.patch(model, {"tome": "patch", "r": 0.0, "stride": 4})


class TestGitMerge3DAdapter(AdapterConformance):
    cases = [
        AdapterCase(
            name="sonata-0c-tiny",
            build=build,
            inputs=inputs,
            patch=apply,
            num_tokens=16,
            r=8,
            expected_tokens=lambda schedule: [kept_tokens(16, r, 4) for r in schedule],
            run_compile=False,
        )
    ]
