"""The FT step's hot path without host work: loss parts as tensors (same values as the loss written out by
hand from the frozen path's outputs), the device-resident teacher cache (same targets as the host cache and as
a fresh teacher pass, also when it spills past its cap), no recompile of the compiled frozen path when the
best-query index changes, the reduce-overhead config value, and the profiler summary on the CPU."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from efficientsam3.config import ConfigError
from efficientsam3.engine.geometry import frozen_compile_mode
from efficientsam3.finetune.cache import DeviceTeacherCache, HostTeacherCache, build_teacher_cache
from efficientsam3.finetune.config import load_ft_config
from efficientsam3.finetune.losses import best_query, embedding_mse, pick, soft_bce, soft_dice
from efficientsam3.finetune.step import DecodeSettings, ft_loss, teacher_targets
from efficientsam3.model.sam3_frozen import TINY_DIMS, build_frozen_sam3, compile_frozen
from efficientsam3.profile import busy_union_us, profile_step

S = 8  # embedding size of the tiny stand-in; masks are 4S x 4S


def _batch(b=3, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(b, TINY_DIMS.embed_dim, S, S, generator=g)
    pts = torch.rand(b, n, 2, generator=g)
    boxes = torch.cat([torch.rand(b, n, 2, generator=g) * 0.5 + 0.25, torch.full((b, n, 2), 0.2)], -1)
    pad = torch.zeros(b, n, dtype=torch.bool)
    prompts = {"points": pts, "point_pad": pad, "boxes": boxes, "box_pad": pad.clone()}
    return emb, prompts


def _frozen():
    torch.manual_seed(0)
    return build_frozen_sam3(dims=TINY_DIMS)


def test_ft_loss_parts_are_tensors_with_the_hand_written_values():
    """One decode iteration: embed 0.0015 x MSE + BCE + Dice on the teacher's best query, computed here from
    the frozen path's full outputs (all queries, then pick) with the plain loss functions."""
    frozen = _frozen()
    target, prompts = _batch()
    pred = (target + 0.3 * torch.randn_like(target)).requires_grad_(True)
    ev = torch.ones(3, S, S, dtype=torch.bool)
    mv = torch.ones(3, 4 * S, 4 * S, dtype=torch.bool)
    mv[:, :, -5:] = False
    total, parts = ft_loss(frozen, pred, target, prompts, ev, mv, DecodeSettings())
    args = (prompts["points"], prompts["point_pad"], prompts["boxes"], prompts["box_pad"])
    with torch.no_grad():
        t_out = frozen(target, *args)
        idx = best_query(t_out["pred_logits"])
        s = pick(frozen(pred, *args)["pred_masks"], idx)
        t = pick(t_out["pred_masks"], idx)
        want = {"embed_mse": embedding_mse(pred, target, ev), "mask_bce": soft_bce(s, t, mv),
                "mask_dice": soft_dice(s, t, mv)}  # fmt: skip
    assert set(parts) == set(want)
    for k, v in want.items():
        assert isinstance(parts[k], torch.Tensor) and parts[k].dim() == 0 and not parts[k].requires_grad, k
        torch.testing.assert_close(parts[k], v, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(total.detach(), 0.0015 * want["embed_mse"] + want["mask_bce"] + want["mask_dice"])
    total.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


@pytest.mark.parametrize("max_rows", [8, 1, 0])  # all on the device; one row then spilled; all spilled
def test_device_cache_returns_the_host_cache_targets(max_rows):
    frozen = _frozen()
    emb, p = _batch()
    args = (p["points"], p["point_pad"], p["boxes"], p["box_pad"])
    keys = ["a", "b", "c"]
    row_bytes = 2 * (4 * S) ** 2 + 8
    host, dev = HostTeacherCache(), DeviceTeacherCache(4, max_rows * row_bytes, (4 * S, 4 * S), torch.device("cpu"))
    assert dev.rows == min(max_rows, 4)
    idx, mask = teacher_targets(frozen, emb, args, keys, host)
    teacher_targets(frozen, emb, args, keys, dev)
    assert len(dev) == len(host) == 3 and dev.has_all(keys) and not dev.has_all(["a", "z"])
    for order in ([2, 0], [1, 2, 0], [0]):
        ks = [keys[i] for i in order]
        sub = {k: v[order] for k, v in p.items()}
        sub_args = (sub["points"], sub["point_pad"], sub["boxes"], sub["box_pad"])
        h_idx, h_mask = teacher_targets(frozen, emb[order], sub_args, ks, host)
        d_idx, d_mask = teacher_targets(frozen, emb[order], sub_args, ks, dev)
        assert d_idx.dtype == torch.long and d_mask.dtype == torch.float16
        assert d_idx.tolist() == h_idx.tolist() == idx[order].tolist()
        torch.testing.assert_close(d_mask, h_mask, atol=0, rtol=0)
        torch.testing.assert_close(d_mask.float(), mask[order].half().float())  # a fresh teacher pass, fp16


class ScalarReads(TorchDispatchMode):
    """Counts reads of a tensor value into Python (.item(), float(), bool(), .tolist()): on a GPU each waits
    for the stream, i.e. a host sync."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cache_kind", ["host", "device"])
def test_cached_step_reads_no_value_to_the_host(cache_kind):
    """A cached FT step (cache hit, loss, backward) reads no tensor value into Python (the former step read its
    three loss parts with .item())."""
    frozen = _frozen()
    target, prompts = _batch()
    ev = torch.ones(3, S, S, dtype=torch.bool)
    mv = torch.ones(3, 4 * S, 4 * S, dtype=torch.bool)
    cache = HostTeacherCache() if cache_kind == "host" else build_teacher_cache(1.0, 3, (4 * S, 4 * S), ev.device)
    keys = ["a", "b", "c"]

    def step() -> int:
        pred = target.clone().requires_grad_(True)
        with ScalarReads() as mode:
            loss, _ = ft_loss(frozen, pred, target, prompts, ev, mv, DecodeSettings(),
                              first_teacher=lambda a: teacher_targets(frozen, target, a, keys, cache))  # fmt: skip
            loss.backward()
        return mode.reads

    with ScalarReads() as sanity:
        target.sum().item()
        bool(target.sum() > 0)
    assert sanity.reads == 2  # the counter sees .item() and bool()
    step()  # the miss fills the cache
    assert len(cache) == 3
    assert step() == 0


def test_cache_arguments_are_checked():
    with pytest.raises(ValueError, match="DISTILL.CACHE_TEACHER_DEVICE_GB: expected >= 0"):
        build_teacher_cache(-1.0, 4, (32, 32), torch.device("cpu"))
    with pytest.raises(ValueError, match="capacity: expected >= 1"):
        DeviceTeacherCache(0, 1e6, (32, 32), torch.device("cpu"))
    assert isinstance(build_teacher_cache(0.0, 4, (32, 32), torch.device("cpu")), HostTeacherCache)
    dev = build_teacher_cache(1.0, 4, (32, 32), torch.device("cpu"))
    assert isinstance(dev, DeviceTeacherCache) and dev.rows == 4 and dev.masks.shape == (4, 32, 32)


def test_no_recompile_when_the_best_query_changes():
    """Compiled frozen path (a counting eager backend): a cached step, then steps with other best-query
    indices, other values and an uncached step compile nothing new after the first of each kind."""
    torch._dynamo.reset()
    compiled: list[int] = []

    def backend(gm, inputs):
        compiled.append(1)
        return gm.forward

    frozen = compile_frozen(_frozen(), backend=backend)
    ev = torch.ones(3, S, S, dtype=torch.bool)
    mv = torch.ones(3, 4 * S, 4 * S, dtype=torch.bool)

    def step(seed: int, idx: list[int] | None) -> None:
        target, prompts = _batch(seed=seed)
        pred = target.clone().requires_grad_(True)
        first = None
        if idx is not None:
            t_mask = torch.randn(3, 4 * S, 4 * S, generator=torch.Generator().manual_seed(seed)).half()
            first = lambda a: (torch.tensor(idx), t_mask)  # noqa: E731  (the cache's answer)
        loss, _ = ft_loss(frozen, pred, target, prompts, ev, mv, DecodeSettings(), first_teacher=first)
        loss.backward()

    step(0, [0, 1, 2])
    after_cached = len(compiled)
    assert after_cached >= 1
    step(1, [7, 3, 0])
    step(2, [5, 5, 1])
    assert len(compiled) == after_cached  # new index values: no recompile
    step(3, None)  # uncached: the teacher's no-grad "best" graphs are new
    after_uncached = len(compiled)
    step(4, None)
    step(5, [2, 6, 4])
    assert len(compiled) == after_uncached
    torch._dynamo.reset()


def test_reduce_overhead_config_and_mode():
    assert load_ft_config(None, ["MODEL.COMPILE_FROZEN", "reduce-overhead"]).MODEL.COMPILE_FROZEN == "reduce-overhead"
    with pytest.raises(ConfigError, match=r"^MODEL.COMPILE_FROZEN: expected one of auto, on, off, reduce-overhead"):
        load_ft_config(None, ["MODEL.COMPILE_FROZEN", "graphs"])
    with pytest.raises(ConfigError, match="DISTILL.CACHE_TEACHER_DEVICE_GB: expected >= 0, got -0.5"):
        load_ft_config(None, ["DISTILL.CACHE_TEACHER_DEVICE_GB", "-0.5"])
    assert load_ft_config(None).DISTILL.CACHE_TEACHER_DEVICE_GB == 0.0  # default: the host cache
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert frozen_compile_mode("reduce-overhead", cuda) == "reduce-overhead"
    assert frozen_compile_mode("on", cpu) == "default" and frozen_compile_mode("auto", cuda) == "reduce-overhead"
    assert frozen_compile_mode("auto", cpu) is None and frozen_compile_mode("off", cuda) is None
    with pytest.raises(ValueError, match="mode: expected one of default, reduce-overhead, got 'max'"):
        compile_frozen(_frozen(), mode="max")


def test_compile_frozen_passes_the_mode_to_inductor(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    m = compile_frozen(_frozen(), mode="reduce-overhead")
    assert m.compile_mode == "reduce-overhead" and len(seen) == 2
    assert all(kw["mode"] == "reduce-overhead" and kw["fullgraph"] and kw["dynamic"] is False for kw in seen)
    seen.clear()
    compile_frozen(_frozen(), backend="aot_eager", mode="reduce-overhead")
    assert all("mode" not in kw for kw in seen)  # only inductor takes a mode


def test_busy_union_and_profile_on_cpu():
    busy, gaps = busy_union_us([(5.0, 7.0), (0.0, 2.0), (1.0, 3.0), (10.0, 11.0)])
    assert busy == 2.0 + 3.0 + 1.0 and gaps == [(3.0, 2.0), (7.0, 3.0)]
    x = torch.randn(64, 64)
    prof = profile_step(lambda: (x @ x).relu().sum(), torch.device("cpu"), top=3)
    assert prof["wall_ms"] > 0 and prof["gpu_busy_ms"] == 0 and prof["kernels"] == 0
    assert len(prof["top_cpu_ops"]) == 3 and any("mm" in e["name"] for e in prof["top_cpu_ops"])
    assert prof["sync_calls"] == {} and prof["launch_calls"] == {} and prof["scalar_reads"] == 0
    read = profile_step(lambda: (x @ x).sum().item(), torch.device("cpu"))
    assert read["scalar_reads"] == 1 and read["sync_calls"] == {}  # the .item(), of a CPU tensor: no sync
    with pytest.raises(ValueError, match="top: expected >= 1"):
        profile_step(lambda: None, torch.device("cpu"), top=0)
