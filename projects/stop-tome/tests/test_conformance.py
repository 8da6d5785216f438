"""merge-core's adapter conformance suite on our adapter: STOP, DGL, plain CLIP4Clip and the cross-frame mode.

The root under test is the visual tower (its outputs keep the model dtype); ``model.r`` is set on it.
"""

from __future__ import annotations

import pytest
import torch

from merge_core.testing.conformance import AdapterCase, AdapterConformance, check_compile
from stop_tome.merging import apply_tome_patch, plan
from stop_tome.model import CLIP4Clip, task_config
from stop_tome.testing import tiny_state_dict

T, L = 2, 3
_SD = tiny_state_dict()


def _build(mode: str):
    def build():
        torch.manual_seed(0)
        model = CLIP4Clip.from_pretrained(_SD, task_config(temporal_prompt=mode, max_frames=T))
        return model.clip.visual.eval()

    return build


def _inputs(mode: str):
    def inputs():
        g = torch.Generator().manual_seed(1)
        video = torch.randn(2, T, 3, 64, 64, generator=g)
        if mode == "none":
            return video
        return (video, 0.02 * torch.randn(L, 2, T, 4, 64, generator=g))

    return inputs


def _cross_tokens(schedule):
    return plan(schedule, 17, 1, T, {2: 2}, 0.5)[1]  # 17 -> 16 -> 15, join: 30 tokens, 14 merged -> 16


CASES = [
    AdapterCase(
        "stop-group2-2",
        _build("group2-2"),
        _inputs("group2-2"),
        apply_tome_patch,
        num_tokens=21,
        r=2,
        dtypes=(torch.bfloat16,),
        run_compile=False,
    ),
    AdapterCase("dgl", _build("DGL"), _inputs("DGL"), apply_tome_patch, num_tokens=21, r=[3, 2, 2]),
    # compile is checked on the DGL case (same blocks with global prompts); the plain case adds nothing new there
    AdapterCase("clip4clip", _build("none"), _inputs("none"), apply_tome_patch, num_tokens=17, r=2, run_compile=False),
    AdapterCase(
        "clip4clip-cross",
        _build("none"),
        _inputs("none"),
        lambda m: apply_tome_patch(m, cross_layers=[2], cross_frames=[2], cross_ratio=0.5),
        num_tokens=17,
        r=1,
        expected_tokens=_cross_tokens,
    ),
]


class TestStopAdapter(AdapterConformance):
    cases = CASES


@pytest.mark.slow
def test_compile_fullgraph_stop():
    """STOP's prompter (sort, Conv3d, top-k mask) traces too; slow on CPU, so outside the suite's default cases."""
    check_compile(CASES[0])
