"""The ``merge_core::*`` custom ops (``merge_core.kernels.ops``): registration, ``opcheck``, hand-computed results,
and what they buy under ``torch.compile`` (issue 9 target 6): a patched ViT compiles as one graph in which each
layer's matching and merging are single opaque nodes, so the graph and Inductor's generated code shrink.

On CPU the ops run the torch reference; compiling with ``kernel_mode("always")`` routes a CPU model through
them (``auto`` does so for CUDA tensors only). GPU tests (``gpu``) run the Triton side.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import merge_core as mc
from merge_core import kernels

OPS = ("best_destinations", "match_plan", "merge_wavg")


def _tiny(depth: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=7)
    return timm.create_model("vit_tiny_patch16_224", **cfg).eval()


def _images(batch: int = 2, device: str = "cpu") -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ the ops alone
def test_ops_are_registered_under_merge_core():
    for name in OPS:
        assert isinstance(getattr(torch.ops.merge_core, name), torch._ops.OpOverloadPacket)


def test_match_plan_and_merge_by_hand():
    """Four tokens, a = tokens (0, 2), b = tokens (1, 3). cos(t0, t1) = 1/sqrt(1.01) ~ 0.995 beats
    cos(t2, t3) = 1/sqrt(1.25) ~ 0.894, so with r = 1 token 0 merges into token 1 and token 2 stays."""
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.5, 1.0]]])
    plan = torch.ops.merge_core.match_plan(metric, 0, 0, 1, None, 0.0, "", False)
    assert plan.tolist() == [[1, 0, 0]]  # [unm | src | dst] in a-row / b-row indices
    best, idx = torch.ops.merge_core.best_destinations(metric[:, ::2], metric[:, 1::2], 0, 0, None, 0.0, "")
    assert idx.tolist() == [[0, 1]]
    torch.testing.assert_close(best, torch.tensor([[1 / 1.01**0.5, 1 / 1.25**0.5]]))
    x = torch.tensor([[[2.0], [4.0], [8.0], [16.0]]])
    size = torch.tensor([[[1.0], [3.0], [1.0], [1.0]]])
    unm, src, dst = plan[:, :1, None], plan[:, 1:2, None], plan[:, 2:, None]
    out, out_size = torch.ops.merge_core.merge_wavg(x, size, unm, src, dst, 0, 0)
    # [unmerged token 2, destination 1 = (3 * 4 + 1 * 2) / 4, destination 3]
    assert out[0, :, 0].tolist() == [8.0, 3.5, 16.0]
    assert out_size[0, :, 0].tolist() == [1.0, 4.0, 1.0]
    out, out_size = torch.ops.merge_core.merge_wavg(x, None, unm, src, dst, 0, 0)
    assert out[0, :, 0].tolist() == [8.0, 3.0, 16.0] and out_size[0, :, 0].tolist() == [1.0, 2.0, 1.0]


def test_protected_prefix_stays_first():
    """A protected class token (a row 0) is never a source: with r = 2 of a's rows 1..2 both merge."""
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.1]]])
    plan = torch.ops.merge_core.match_plan(metric, 1, 0, 2, None, 0.0, "", True)
    # a = tokens (0, 2, 4), b = tokens (1, 3): token 2 -> b0 (cos 1), token 4 -> b1 (cos 0.77 > 0.1)
    assert plan.tolist() == [[0, 1, 2, 0, 1]]


def _plan_args(batch: int = 2, n: int = 11, c: int = 8, penalty: bool = False):
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(batch, n, c, generator=g)
    phi = torch.rand(batch, n, generator=g) if penalty else None
    return metric, phi


@pytest.mark.parametrize(("penalty", "sort_unm"), [(False, True), (True, False)])
def test_opcheck_match_plan_and_best_destinations(penalty, sort_unm):
    metric, phi = _plan_args(penalty=penalty)
    mode = "shifted" if penalty else ""
    torch.library.opcheck(torch.ops.merge_core.match_plan.default, (metric, 1, 0, 3, phi, 0.5, mode, sort_unm))
    a, b = metric[:, ::2], metric[:, 1::2]
    torch.library.opcheck(torch.ops.merge_core.best_destinations.default, (a, b, 1, 0, phi, 0.5, mode))


@pytest.mark.parametrize("with_size", [False, True])
def test_opcheck_merge_wavg(with_size):
    metric, _ = _plan_args()
    plan = torch.ops.merge_core.match_plan(metric, 1, 0, 3, None, 0.0, "", True)
    unm, src, dst = kernels.ops.split_plan(plan, 6, 3)
    x = torch.randn(2, 11, 5)
    size = torch.rand(2, 11, 1) + 1 if with_size else None
    torch.library.opcheck(torch.ops.merge_core.merge_wavg.default, (x, size, unm, src, dst, 1, 0))


def test_op_path_equals_torch_path_in_eager_merging():
    """The merge closure + ``merge_wavg`` (torch reference) and the two ops give the same tokens and sizes."""
    g = torch.Generator().manual_seed(3)
    metric, x = torch.randn(3, 17, 8, generator=g), torch.randn(3, 17, 6, generator=g)
    size = torch.randint(1, 4, (3, 17, 1), generator=g).float()
    with kernels.kernel_mode("never"):
        merge, _ = mc.bipartite_soft_matching(metric, 5, class_token=True)
        want_x, want_size = mc.merge_wavg(merge, x, size)
    plan = torch.ops.merge_core.match_plan(metric, 1, 0, 5, None, 0.0, "", True)
    got_x, got_size = torch.ops.merge_core.merge_wavg(x, size, *kernels.ops.split_plan(plan, 9, 5), 1, 0)
    torch.testing.assert_close(got_x, want_x)
    torch.testing.assert_close(got_size, want_size)


# ------------------------------------------------------------------------------------------ under torch.compile
def _compile_count_nodes(model, x, mode: str) -> tuple[torch.Tensor, list[int], set[str], int]:
    """Compile with a backend that records each graph's node count and the merge_core ops in it; two calls."""
    nodes: list[int] = []
    ops: set[str] = set()

    def backend(gm: torch.fx.GraphModule, example_inputs):
        nodes.append(len(gm.graph.nodes))
        ops.update(str(n.target) for n in gm.graph.nodes if "merge_core" in str(n.target))
        return gm

    with kernels.kernel_mode(mode), torch.no_grad():
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        out = compiled(x).clone()
        graphs = int(counters["stats"].get("unique_graphs", 0))
        compiled(x)
        assert int(counters["stats"].get("unique_graphs", 0)) == graphs, "the second call recompiled"
    return out, nodes, ops, graphs


def test_compiled_patched_vit_calls_the_ops_and_has_fewer_nodes():
    x = _images()
    results = {}
    for mode in ("never", "always"):
        torch._dynamo.reset()
        counters.clear()
        model = _tiny()
        mc.patch.timm(model, prop_attn=True)
        model.r = 4
        model.merge_policy = "force"
        results[mode] = _compile_count_nodes(model, x, mode)
        with torch.no_grad(), kernels.kernel_mode("never"):
            expected = model(x)
        torch.testing.assert_close(results[mode][0], expected, atol=1e-5, rtol=1e-5)
        assert model._merge_info.tokens == [13, 9, 5]
    (_, nodes_torch, ops_torch, graphs_torch), (_, nodes_ops, ops_ops, graphs_ops) = results.values()
    assert graphs_torch == graphs_ops == 1
    assert ops_torch == set()
    assert ops_ops == {"merge_core.match_plan.default", "merge_core.merge_wavg.default"}
    # the traced torch matcher + merge is ~30 nodes per merging layer, each op call a handful (slicing included)
    assert nodes_ops[0] < nodes_torch[0] - 20 * 3, (nodes_torch, nodes_ops)


def test_training_under_compile_keeps_the_differentiable_merge():
    """With autograd recording the merge stays the traced torch path (the op has no backward); the matcher
    (indices only) may still be the op. Gradients equal eager's."""
    model = _tiny(depth=2)
    mc.patch.timm(model)
    model.r = 4
    model.merge_policy = "force"
    x = _images()
    seen: set[str] = set()

    def backend(gm, example_inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if "merge_core" in str(n.target))
        return gm

    with kernels.kernel_mode("always"):
        torch.compile(model, backend=backend, fullgraph=True)(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with kernels.kernel_mode("never"):
        model(x).sum().backward()
    for got, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, atol=1e-5, rtol=1e-4)
    assert "merge_core.merge_wavg.default" not in seen


def _inductor_compile(model, x, mode: str) -> tuple[int, torch.Tensor, int]:
    """(Inductor kernels generated, first output, graphs compiled by a second call) for one kernel mode."""
    from torch._inductor import metrics

    torch._dynamo.reset()
    counters.clear()
    metrics.reset()
    with kernels.kernel_mode(mode), torch.no_grad():
        compiled = torch.compile(model, fullgraph=True)
        out = compiled(x).clone()
        generated = metrics.generated_kernel_count
        compiled(x)
    return generated, out, int(counters["stats"].get("unique_graphs", 0)) - 1


@pytest.mark.slow
def test_inductor_compiled_patched_vit_equals_eager_with_fewer_kernels():
    """CPU Inductor (C++ code generation: ~1.5 min on 2 cores), depth 1, r = 4, prop_attn on, both dispatch
    modes: equal to eager, no recompile on the second call, and the ops remove the layer's matching/merging
    kernels (measured 2026-12-02, torch 2.15: 39 kernels traced vs 29 with the ops)."""
    import torch._inductor.config as inductor_config

    model = _tiny(depth=1)
    mc.patch.timm(model, prop_attn=True)
    model.r = 4
    model.merge_policy = "force"
    x = _images()
    with torch.no_grad(), kernels.kernel_mode("never"):
        expected = model(x)
    with inductor_config.patch(force_disable_caches=True):
        op_kernels, out_ops, recompiles_ops = _inductor_compile(model, x, "always")
        torch_kernels, out_torch, recompiles_torch = _inductor_compile(model, x, "never")
    torch.testing.assert_close(out_ops, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_torch, expected, atol=1e-4, rtol=1e-4)
    assert recompiles_ops == recompiles_torch == 0
    assert 0 < op_kernels <= torch_kernels - 8, (torch_kernels, op_kernels)


# ------------------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_ops_equal_cpu_reference(dtype):
    g = torch.Generator().manual_seed(5)
    metric, x = torch.randn(4, 197, 64, generator=g), torch.randn(4, 197, 96, generator=g)
    size = torch.randint(1, 4, (4, 197, 1), generator=g).float()
    want = torch.ops.merge_core.match_plan(metric, 1, 0, 16, None, 0.0, "", True)
    got = torch.ops.merge_core.match_plan(metric.cuda(), 1, 0, 16, None, 0.0, "", True)
    got = got.cpu()
    assert torch.equal(got[:, :83], want[:, :83])  # unmerged rows, in index order
    # merged (src, dst) pairs as sets: two near-equal scores may rank in either order (fp32 dot vs CPU BLAS)
    for plan in (got, want):
        order = plan[:, 83:99].argsort(dim=-1)
        plan[:, 83:99], plan[:, 99:] = plan[:, 83:99].gather(1, order), plan[:, 99:].gather(1, order)
    assert torch.equal(got, want)
    idx = kernels.ops.split_plan(want, 99, 16)
    want_x, want_s = torch.ops.merge_core.merge_wavg(x, size, *idx, 1, 0)
    cuda_idx = [t.cuda() for t in idx]
    got_x, got_s = torch.ops.merge_core.merge_wavg(x.cuda().to(dtype), size.cuda().to(dtype), *cuda_idx, 1, 0)
    tol = {"atol": 2e-3, "rtol": 2e-3} if dtype == torch.float16 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(got_x.float().cpu(), want_x, **tol)
    torch.testing.assert_close(got_s.float().cpu(), want_s)


@pytest.mark.gpu
def test_gpu_opcheck():
    g = torch.Generator(device="cuda").manual_seed(0)
    metric = torch.randn(2, 37, 16, device="cuda", generator=g)
    a, b = metric[:, ::2], metric[:, 1::2]
    torch.library.opcheck(torch.ops.merge_core.match_plan.default, (metric, 1, 0, 5, None, 0.0, "", True))
    torch.library.opcheck(torch.ops.merge_core.best_destinations.default, (a, b, 1, 0, None, 0.0, ""))
    plan = torch.ops.merge_core.match_plan(metric, 1, 0, 5, None, 0.0, "", True)
    x = torch.randn(2, 37, 24, device="cuda", generator=g)
    args = (x, None, *kernels.ops.split_plan(plan, 19, 5), 1, 0)
    torch.library.opcheck(torch.ops.merge_core.merge_wavg.default, args)


@pytest.mark.gpu
def test_gpu_inductor_compiled_patched_vit_equals_eager_without_recompiles():
    """CUDA + Inductor (default mode): one graph holding the ops, no recompile, equal to eager merging (fp32:
    fp16 near-ties in the metric could flip a merge between Inductor's and eager's arithmetic)."""
    model = _tiny().cuda()
    mc.patch.timm(model, prop_attn=True)
    model.r = 4
    model.merge_policy = "force"
    x = _images(4, "cuda")
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True)
        got = compiled(x).clone()
        compiled(x)
        assert int(counters["stats"].get("unique_graphs", 0)) == 1
        expected = model(x)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
def test_gpu_auto_mode_traces_the_ops():
    """Default dispatch (``auto``) on CUDA: the compiled graph calls both ops, one graph, equal to eager."""
    model = _tiny().cuda()
    mc.patch.timm(model, prop_attn=True)
    model.r = 4
    model.merge_policy = "force"
    x = _images(2, "cuda")
    out, _, ops, graphs = _compile_count_nodes(model, x, "auto")
    assert graphs == 1
    assert ops == {"merge_core.match_plan.default", "merge_core.merge_wavg.default"}
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), atol=1e-4, rtol=1e-4)
