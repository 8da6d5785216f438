import importlib.util
import math
import os
import sys
import types

import pytest
import torch

from efficientsam3.model.sam3_neck import load_sam3_part
from efficientsam3.model.sam3_scoring import SCORING_PREFIX, DotProductScoring


def test_size_and_keys():
    with torch.device("meta"):
        s = DotProductScoring()
    assert sum(p.numel() for p in s.parameters()) == 1_182_976  # notes 2.1: dot_prod_scoring 1.18M
    assert sorted(s.state_dict()) == sorted(
        ["prompt_mlp.layers.0.weight", "prompt_mlp.layers.0.bias", "prompt_mlp.layers.1.weight",
         "prompt_mlp.layers.1.bias", "prompt_mlp.out_norm.weight", "prompt_mlp.out_norm.bias",
         "prompt_proj.weight", "prompt_proj.bias", "hs_proj.weight", "hs_proj.bias"])  # fmt: skip


def test_score_by_hand(tmp_path):
    s = DotProductScoring(d_model=2, d_proj=2, hidden=3).eval()
    sd = {k: torch.zeros_like(v) for k, v in s.state_dict().items()}
    sd["prompt_mlp.out_norm.weight"] = torch.ones(2)
    sd["prompt_proj.weight"] = sd["hs_proj.weight"] = torch.eye(2)
    torch.save({"model": {SCORING_PREFIX + k: v for k, v in sd.items()}}, tmp_path / "sam3.pt")
    load_sam3_part(s, str(tmp_path / "sam3.pt"), SCORING_PREFIX)
    # MLP is zero -> LayerNorm([1, 3]) = [-1, 1]; the padded token [100, 0] is ignored; query (2, 5)
    prompt = torch.tensor([[[1.0, 3.0]], [[100.0, 0.0]]])
    hs = torch.tensor([2.0, 5.0]).view(1, 1, 1, 2)
    out = s(hs, prompt, torch.tensor([[False, True]]))
    assert out.shape == (1, 1, 1, 1)
    assert out.item() == pytest.approx((2 * -1 + 5 * 1) / math.sqrt(2), rel=1e-4)
    assert s(hs * 100, prompt, torch.tensor([[False, True]])).item() == pytest.approx(12.0)


@pytest.mark.skipif(not os.environ.get("SAM3_SRC"), reason="set SAM3_SRC to an unpacked sam3 wheel (sam3/model/...)")
def test_equals_pypi_sam3_scoring():
    root = os.path.join(os.environ["SAM3_SRC"], "sam3", "model") + os.sep
    pkg = types.ModuleType("_s3sc")
    pkg.__path__ = [root]
    sys.modules["_s3sc"] = pkg
    spec = importlib.util.spec_from_file_location("_s3sc.model_misc", root + "model_misc.py")
    misc = importlib.util.module_from_spec(spec)
    sys.modules["_s3sc.model_misc"] = misc
    spec.loader.exec_module(misc)
    mlp = misc.MLP(32, 64, 32, 2, dropout=0.1, residual=True, out_norm=torch.nn.LayerNorm(32))
    ref = misc.DotProductScoring(d_model=32, d_proj=16, prompt_mlp=mlp).eval()
    mine = DotProductScoring(32, 16, 64).eval()
    assert sorted(ref.state_dict()) == sorted(mine.state_dict())
    mine.load_state_dict(ref.state_dict())
    hs, prompt = torch.randn(6, 2, 5, 32), torch.randn(4, 2, 32)
    pad = torch.tensor([[False, False, True, True], [False, False, False, False]])
    with torch.no_grad():
        torch.testing.assert_close(mine(hs, prompt, pad), ref(hs, prompt, pad), atol=1e-5, rtol=1e-5)
