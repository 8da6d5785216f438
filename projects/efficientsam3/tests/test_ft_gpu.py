"""CUDA paths of the geometry fine-tune's frozen SAM3 (skipped without a GPU): the inductor-compiled frozen path
(the trainer's CUDA default) equals eager, forward and gradient to the embedding (fp32, TF32 off: tight; the
autocast dtypes run compiled in the trainer's GPU test and the benchmark). One dtype: each compile costs ~half
a minute whatever the model size (the graph, not the tensors, sets it)."""

import copy

import pytest
import torch

from efficientsam3.finetune.step import DecodeSettings, ft_loss
from efficientsam3.model.sam3_frozen import TINY_DIMS, build_frozen_sam3, compile_frozen

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", [torch.float32])
def test_compiled_frozen_path_equals_eager_on_cuda(dtype):
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    eager = build_frozen_sam3(dims=TINY_DIMS).cuda()
    compiled = compile_frozen(copy.deepcopy(eager))
    embed = torch.randn(2, TINY_DIMS.embed_dim, 8, 8, device="cuda")
    pts = torch.rand(2, 3, 2, device="cuda")
    boxes = torch.cat([torch.rand(2, 3, 2) * 0.5 + 0.25, torch.rand(2, 3, 2) * 0.3 + 0.1], -1).cuda()
    pad = torch.tensor([[False, False, True], [False, False, False]], device="cuda")
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 6e-2, "rtol": 6e-2}
    amp = torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)
    with torch.no_grad(), amp:
        a = eager(embed, pts, pad, boxes, pad, mask_query="best")
        b = compiled(embed, pts, pad, boxes, pad, mask_query="best")
    torch.testing.assert_close(b["pred_masks"].float(), a["pred_masks"].float(), **tol)
    torch.testing.assert_close(b["pred_logits"].float(), a["pred_logits"].float(), **tol)
    grads = []
    for m in (eager, compiled):
        e = embed.clone().requires_grad_(True)
        with amp:
            out = m(e, pts, pad, boxes, pad, mask_query=a["query"])["pred_masks"]
        out.float().sigmoid().mean().backward()
        grads.append(e.grad)
    scale = grads[0].abs().max()
    torch.testing.assert_close(grads[1] / scale, grads[0] / scale, **tol)
    assert all(p.grad is None for p in compiled.parameters())


def test_graphed_frozen_path_equals_eager_over_steps():
    """MODEL.COMPILE_FROZEN reduce-overhead (CUDA graphs): three FT steps (teacher "best" pass without grad,
    student pass with grad to the embedding) with new embeddings and indices each step give the eager
    outputs and gradients (the graphs replay with the new inputs, none is stale)."""

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch._dynamo.reset()
    eager = build_frozen_sam3(dims=TINY_DIMS).cuda()
    graphed = compile_frozen(copy.deepcopy(eager), mode="reduce-overhead")
    pts = torch.rand(2, 3, 2, device="cuda")
    boxes = torch.cat([torch.rand(2, 3, 2) * 0.5 + 0.25, torch.rand(2, 3, 2) * 0.3 + 0.1], -1).cuda()
    pad = torch.zeros(2, 3, dtype=torch.bool, device="cuda")
    prompts = {"points": pts, "point_pad": pad, "boxes": boxes, "box_pad": pad}
    ev = torch.ones(2, 8, 8, dtype=torch.bool, device="cuda")
    mv = torch.ones(2, 32, 32, dtype=torch.bool, device="cuda")
    for step in range(4):
        target = torch.randn(2, TINY_DIMS.embed_dim, 8, 8, device="cuda")
        base = target + 0.5 * torch.randn_like(target)
        out = []
        for m in (eager, graphed):
            pred = base.clone().requires_grad_(True)
            loss, parts = ft_loss(m, pred, target, prompts, ev, mv, DecodeSettings())
            loss.backward()
            out.append((loss.detach(), pred.grad, parts["mask_bce"]))
        (la, ga, ba), (lb, gb, bb) = out
        torch.testing.assert_close(lb, la, atol=1e-4, rtol=1e-4, msg=f"step {step}")
        torch.testing.assert_close(bb, ba, atol=1e-4, rtol=1e-4)
        scale = ga.abs().max()
        torch.testing.assert_close(gb / scale, ga / scale, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()
