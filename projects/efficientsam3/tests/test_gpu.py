"""CUDA paths (skipped without a GPU): bf16 teacher export, fp16-AMP training, merged trunk under inductor."""

import pytest
import torch

from efficientsam3.engine.export import export
from efficientsam3.engine.stage1 import train
from efficientsam3.model.merged_teacher import apply_merging
from efficientsam3.model.sam3_vit import TINY_VIT, SAM3ViT
from efficientsam3.store import EmbeddingStore

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_cuda_export_and_train(tiny_cfg, sa1b, tmp_path):
    store = tmp_path / "emb"
    common = ["--cfg", str(tiny_cfg), "--data-path", str(sa1b), "--device", "cuda"]
    r = export([*common, "--teacher-embed-path", str(store)])
    assert r["written"] == 4 and len(EmbeddingStore(str(store))) == 4
    out = train([*common, "--teacher-embed-path", str(store), "--output", str(tmp_path / "o"),
                 "--opts", "AMP_ENABLE", "True", "TRAIN.EPOCHS", "1"])  # fmt: skip
    assert out["epochs_run"] == 1 and out["final_loss"] == out["final_loss"]


@pytest.mark.parametrize("mode", ["attn", "block"])
def test_merged_trunk_compiles_on_cuda(mode):
    torch.manual_seed(0)
    m = SAM3ViT(TINY_VIT).eval().cuda().to(torch.bfloat16)
    x = torch.randn(2, 3, 112, 112, device="cuda", dtype=torch.bfloat16)
    apply_merging(m, 3, 8, mode=mode)
    with torch.no_grad():
        eager = m(x)
        torch._dynamo.reset()
        compiled = torch.compile(m, fullgraph=True)(x)
    torch.testing.assert_close(compiled.float(), eager.float(), atol=5e-2, rtol=5e-2)
