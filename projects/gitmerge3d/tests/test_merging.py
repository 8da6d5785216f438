"""The PT-v3m2 merging adapter beyond merge-core's conformance suite (test_conformance.py): fraction r on
the real Sonata structure, remove, weighted_patch groups, equality with the official algorithm, config errors."""

import copy

import pytest
import torch
import torch.nn.functional as F

from gitmerge3d import merging
from gitmerge3d.models import PointTransformerV3
from gitmerge3d.models.point_transformer_v3m2 import SerializedAttention
from gitmerge3d.models.presets import reduced_config
from gitmerge3d.opcount import count_ops
from merge_core.binned import kept_tokens
from merge_core.patch_energy import weighted_patch_groups


def build(seed=0, **kw):
    torch.manual_seed(seed)
    return PointTransformerV3(**reduced_config("0c", shuffle_orders=False, **kw)).eval()


def run(model, pts):
    torch.manual_seed(1)
    return model(copy.deepcopy(pts))["feat"]


def test_r0_is_exactly_the_plain_model(make_points):
    model, pts = build(), make_points(1500)
    ref = run(model, pts)
    merging.patch(model, {"tome": "patch", "r": 0.0})
    assert torch.equal(run(model, pts), ref)


def test_merged_attention_r0_equals_plain_attention():
    q, k, v = (torch.randn(3, 2, 40, 8) for _ in range(3))
    attn = SerializedAttention(16, 2, 40)
    merging.patch(torch.nn.Sequential(attn), {"tome": "patch", "r": 0.0})
    torch.testing.assert_close(attn.attend(q, k, v, None, None), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("r,stride", [(0.9, None), (0.7, 3), (0.8, 6)])
def test_token_counts_follow_the_schedule(make_points, r, stride):
    model, pts = build(), make_points(1500)
    info = {"tome": "patch", "r": r} | ({"stride": stride} if stride else {})
    state = merging.patch(model, info)
    run(model, pts)
    cfg = merging.config_of(model)
    assert cfg.stride == (stride or {0.9: 10}[r])
    n_blocks = sum(isinstance(m, SerializedAttention) for m in model.modules())
    records = merging.layer_records(model)
    assert len(records) == n_blocks  # every encoder and decoder block merges
    for rec in records:
        assert rec.kept == [kept_tokens(rec.tokens, r, cfg.stride)]
    assert state.tokens == [rec.kept[0] for rec in records]
    run(model, pts)
    assert len(merging.layer_records(model)) == n_blocks  # reset per forward


def test_remove_restores_model(make_points):
    model, pts = build(), make_points(1500)
    ref = run(model, pts)
    merging.patch(model, {"tome": "weighted_patch", "r": 0.9, "stride": 10})
    assert not torch.allclose(run(model, pts), ref)
    merging.remove_patch(model)
    assert all(type(m) is SerializedAttention for m in model.modules() if isinstance(m, SerializedAttention))
    assert merging.merge_state(model) is None and type(model) is PointTransformerV3
    assert not any("_merge_info" in m.__dict__ for m in model.modules())
    assert torch.equal(run(model, pts), ref)


def test_backward_reaches_every_parameter(make_points):
    model = build().train()
    merging.patch(model, {"tome": "patch", "r": 0.9, "no_rand": False})
    model(make_points(1500))["feat"].square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_weighted_patch_groups_in_a_layer():
    # 12 patches of 64 tokens, 8 of them homogeneous: the low group keeps low_r=32... of 64 -> stride 2
    attn = SerializedAttention(16, 2, 64)
    model = torch.nn.Sequential(attn)
    merging.patch(model, {"tome": "weighted_patch", "r": 0.9, "stride": 10})
    g = torch.Generator().manual_seed(0)
    v = torch.randn(12, 2, 64, 8, generator=g)
    v[:8] = torch.randn(8, 1, 1, 8, generator=g).expand(8, 2, 64, 8)
    q, k = torch.randn_like(v), torch.randn_like(v)
    out = attn.attend(q, k, v, None, None)
    rec = merging.layer_records(model)[-1]
    assert rec.group_patches == [5, 7] and rec.kept == [kept_tokens(64, 0.9, 10), 32]
    assert out.shape == v.shape


@pytest.mark.parametrize("pattern", ["random", "all_low", "none_low", "first", "last"])
def test_split_groups_equals_nonzero(pattern):
    g = torch.Generator().manual_seed(1)
    low = {
        "random": torch.rand(37, generator=g) < 0.4,
        "all_low": torch.ones(9, dtype=torch.bool),
        "none_low": torch.zeros(9, dtype=torch.bool),
        "first": torch.arange(9) == 0,
        "last": torch.arange(9) == 8,
    }[pattern]
    hi, lo = merging.split_groups(low)
    assert hi.tolist() == [i for i, x in enumerate(low.tolist()) if not x]
    assert lo.tolist() == [i for i, x in enumerate(low.tolist()) if x]


def test_weighted_patch_layer_equals_per_group_reference_with_one_sync():
    """The weighted_patch split: each group merged on its own (boolean-mask selection, written out here) gives
    the layer's output bit for bit; the adapter adds one host sync (merge-core's grouping has its own)."""
    attn = SerializedAttention(16, 2, 64)
    model = torch.nn.Sequential(attn)
    merging.patch(model, {"tome": "weighted_patch", "r": 0.9, "stride": 10})
    g = torch.Generator().manual_seed(0)
    v = torch.randn(12, 2, 64, 8, generator=g)
    v[3:11] = torch.randn(8, 1, 1, 8, generator=g).expand(8, 2, 64, 8)
    q, k = torch.randn_like(v), torch.randn_like(v)
    counts, out = count_ops(attn.attend, q, k, v, None, None)
    low = weighted_patch_groups(v)
    assert low is not None and 0 < int(low.sum()) < 12
    ref = torch.empty_like(v)
    for mask, r, stride in ((~low, int(64 * 0.9), 10), (low, 64 - 32, 2)):
        ref[mask] = attn._merged(q[mask], k[mask], v[mask], None, r, stride)[0]
    assert torch.equal(out, ref)
    adapter_syncs = sum(n for src, n in counts.syncs.items() if src.startswith("merging.py"))
    assert adapter_syncs == 1


@pytest.mark.parametrize(
    "info,match",
    [
        ({"tome": "pitome"}, "'tome' must be one of"),
        ({"tome": "patch", "r": 1.5}, "'r' must be a float in"),
        ({"tome": "patch", "r": 0.9, "stride": 0}, "'stride' must be a positive int"),
        ({"tome": "patch", "r": 0.9, "no_rand": "yes"}, "'no_rand' must be a bool"),
        ({"tome": "patch", "r": 0.9, "prop_attn": "row"}, "'prop_attn' must be one of"),
        ({"tome": "patch", "r": 0.9, "tome_mlp": True}, "'tome_mlp' must be False"),
        ({"tome": "patch", "rr": 0.9}, "unknown key 'rr'"),
        ({"tome": "patch", "r": 0.9, "low_r": 0}, "'low_r' must be a positive int"),
    ],
)
def test_bad_config_values(info, match):
    with pytest.raises(ValueError, match=match):
        merging.parse_merge_config(info)


def test_stride_rule():
    assert [merging.default_stride(r) for r in (0.5, 0.7, 0.8, 0.9, 0.95)] == [2, 3, 5, 10, 20]
    cfg = merging.parse_merge_config({"tome": "patch", "r": 0.9, "threshold": 0.9, "low_r": 32})
    assert cfg.stride == 10 and cfg.no_rand is True and cfg.prop_attn == "off"
    assert merging.parse_merge_config({"tome": None}) is None


def official_attention_reference(q, k, v, r, stride, scale):
    """One patch and head at a time, following the official description step by step (python loops)."""
    n = q.shape[-2]
    out = torch.empty_like(v)
    heads = q.shape[1]
    for b in range(q.shape[0]):
        for h in range(heads):
            off = (max(stride // heads, 1) * h) % stride
            dst = [j * stride + off for j in range(n // stride)]
            src = [i for i in range(n) if i not in dst]
            m = F.normalize(v[b, h], dim=-1)
            best = [max(float(m[s] @ m[d]) for d in dst) for s in src]
            match = [max(range(len(dst)), key=lambda j, s=s: (float(m[s] @ m[dst[j]]), -j)) for s in src]
            rank = sorted(range(len(src)), key=lambda i: -best[i])
            r_eff = min(len(src), r)
            groups = [[i] for i in (src[j] for j in rank[r_eff:])] + [[d] for d in dst]
            for j in rank[:r_eff]:
                groups[len(src) - r_eff + match[j]].append(src[j])
            mq, mk, mv = (torch.stack([t[b, h, g].mean(0) for g in groups]) for t in (q, k, v))
            size = torch.tensor([float(len(g)) for g in groups])
            attn = (mq * scale @ mk.T + size.log()[:, None]).softmax(-1)  # official per-row size bias
            y = attn @ mv
            for slot, g in enumerate(groups):
                out[b, h, g] = y[slot]
    return out


@pytest.mark.parametrize("prop_attn", ["faithful", "off"])
def test_merged_attention_equals_official_reference(prop_attn):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 30, 4, generator=g) for _ in range(3))
    attn = SerializedAttention(12, 3, 30)
    merging.patch(torch.nn.Sequential(attn), {"tome": "patch", "r": 0.8, "stride": 4, "prop_attn": prop_attn})
    got = attn.attend(q, k, v, None, None)
    want = official_attention_reference(q, k, v, int(30 * 0.8), 4, attn.scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_model_r_as_fraction_or_counts(make_points):
    model, pts = build(), make_points(1500)
    state = merging.patch(model, {"tome": "patch", "r": 0.9, "stride": 10})
    model.r = 40  # merge-core's count: 40 tokens removed per patch in every block
    run(model, pts)
    assert all(t == kept_tokens(64, 40, 10) for t in state.tokens[:2])
    assert merging.resolve_r(0.5, 3) == (0.5, [0, 0, 0])
    assert merging.resolve_r([4, 2], 3) == (None, [4, 2, 0])
    model.r = 2.5  # neither a fraction in (0, 1) nor a whole count
    with pytest.raises((TypeError, ValueError)):
        run(model, pts)


@pytest.mark.parametrize(
    "dtype,n,info",
    [
        (torch.float32, 300, {"r": 0.9}),
        (torch.float32, 300, {"r": 0.9, "prop_attn": "faithful"}),
        (torch.float32, 300, {"r": 0.9, "prop_attn": "key"}),
        (torch.float32, 120, {"r": 0.7, "stride": 3, "mean_head": True}),
        (torch.float16, 300, {"r": 0.8, "stride": 5}),  # ones-channel sizes
        (torch.bfloat16, 300, {"r": 0.9}),  # > 256 tokens: fp32 sizes instead of the ones channel
        (torch.bfloat16, 200, {"r": 0.95, "stride": 20}),
    ],
)
def test_launch_light_merge_equals_former_path(dtype, n, info):
    """The packed q|k|v|ones merge + slot-map unmerge against the former PatchMatch path (legacy)."""
    from gitmerge3d import legacy

    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(3, 4, n, 8, generator=g).to(dtype) for _ in range(3))
    v[0, :, 5:40] = v[0, :, 4:5]  # duplicate tokens: tied scores
    attn = SerializedAttention(32, 4, n)
    merging.patch(torch.nn.Sequential(attn), {"tome": "patch"} | info)
    r = int(n * info["r"])
    stride = attn._merge_info.extra["gitmerge3d"].stride
    got, kept = attn._merged(q, k, v, None, r, stride)
    want, kept_ref = legacy.merged_via_patch_match(attn, q, k, v, None, r, stride)
    assert kept == kept_ref and got.shape == want.shape and got.dtype == want.dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    # the unmerged output is laid out (P, N, H, D): the caller's transpose + reshape is a view
    assert got.transpose(1, 2).is_contiguous()


def test_launch_light_merge_with_rpe_bias_equals_former_path():
    from gitmerge3d import legacy

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 60, 4, generator=g) for _ in range(3))
    bias = torch.randn(2, 2, 60, 60, generator=g)
    attn = SerializedAttention(8, 2, 60)
    merging.patch(torch.nn.Sequential(attn), {"tome": "patch", "r": 0.8, "stride": 5, "prop_attn": "key"})
    got, _ = attn._merged(q, k, v, bias, 48, 5)
    want, _ = legacy.merged_via_patch_match(attn, q, k, v, bias, 48, 5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_shared_base_loads_qkv_with_one_view():
    """The unbind of SerializedAttention.forward's qkv is one strided view; anything else is refused."""
    p, k_, h, d = 3, 20, 2, 4
    qkv = torch.randn(p * k_, 3 * h * d)[torch.randperm(p * k_)]
    q, k, v = qkv.reshape(-1, k_, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    base = merging._shared_base(q, k, v)
    assert base is not None and torch.equal(base, torch.stack([q, k, v]))
    assert merging._shared_base(q, v, k) is None  # not in storage order
    assert merging._shared_base(q, k.clone(), v) is None  # another storage
    assert merging._shared_base(q, k, v[:, :1]) is None  # another shape


def test_attend_graphs_switch_is_eager_on_cpu():
    """Graphs are CUDA-only: on a CPU the switch changes nothing (bit-equal, nothing cached)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 100, 4, generator=g) for _ in range(3))
    attn = SerializedAttention(12, 3, 100).eval()
    merging.patch(torch.nn.Sequential(attn), {"tome": "patch", "r": 0.9})
    with torch.no_grad():
        ref = attn.attend(q, k, v, None, None)
        with merging.attend_graphs(True):
            got = attn.attend(q, k, v, None, None)
    assert torch.equal(got, ref) and "attend_graphs" not in attn._merge_info.extra
    assert not merging._GRAPHS_ON  # restored
    with pytest.raises(TypeError, match="enabled must be a bool"):
        merging.set_attend_graphs("yes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attend_graph_cache_matches_eager_on_cuda():
    """Replays give the eager groups (kept count) and outputs within fp16 rounding (CUDA scatter_add_ sums in
    no fixed order, so not bit-equal); one graph per shape; the output buffer is the graph's static tensor."""
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    attn = SerializedAttention(48, 3, 1024).to(dev, torch.float16).eval()
    merging.patch(torch.nn.Sequential(attn), {"tome": "patch", "r": 0.9})
    with torch.no_grad():
        for p in (4, 4, 6):
            qkv = torch.randn(p * 1024, 144, generator=g).to(dev, torch.float16)
            q, k, v = qkv.reshape(-1, 1024, 3, 3, 16).permute(2, 0, 3, 1, 4).unbind(0)
            ref, kept = attn._merged(q, k, v, None, 921, 10)
            with merging.attend_graphs(True):
                got = attn.attend(q, k, v, None, None)
                got2 = attn.attend(q, k, v, None, None)
            assert got.data_ptr() == got2.data_ptr() and attn._merge_info.tokens[-1] == kept
            torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)
    assert len(attn._merge_info.extra["attend_graphs"]) == 2  # one per shape


@pytest.mark.parametrize("dtype,n", [(torch.float32, 30), (torch.float16, 300), (torch.bfloat16, 1024)])
def test_scatter_reduce_merge_equals_reference_and_default(dtype, n):
    """``merge_op('scatter_reduce')`` (one dispatch for the group means) against the step-by-step reference and
    bit-equal to the default scatter_add path on a CPU (same sums in the same order, same division)."""
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, 3, n, 4, generator=g).to(dtype) for _ in range(3))
    v[0, :, 3:12] = v[0, :, 2:3]  # tied scores
    attn = SerializedAttention(12, 3, n).eval()
    merging.patch(torch.nn.Sequential(attn), {"tome": "patch", "r": 0.8, "stride": 4})
    with torch.no_grad():
        ref = attn.attend(q, k, v, None, None)
        with merging.merge_op("scatter_reduce"):
            got = attn.attend(q, k, v, None, None)
    assert torch.equal(got, ref)
    if dtype == torch.float32:
        want = official_attention_reference(q, k, v, int(n * 0.8), 4, attn.scale)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert merging._MERGE_OP == "scatter_add"
    with pytest.raises(ValueError, match="op must be one of"):
        merging.set_merge_op("sum")


class _ReplayByRecompute:
    """CPU stand-in for a CUDA graph: replay recomputes the captured function into the same static output."""

    def __init__(self, fn, args, out):
        self.fn, self.args, self.out = fn, args, out

    def replay(self):
        self.out.copy_(self.fn(*self.args)[0])

    @classmethod
    def capture(cls, fn, q, k, v):
        out, kept = fn(q, k, v)
        return cls(fn, (q, k, v), out), out, kept


def test_attend_graph_cache_bookkeeping_in_a_forward(make_points, monkeypatch):
    """The cache's wiring on a CPU (graph = recompute into the static output): one entry per attend shape, inputs
    loaded through the shared qkv view, static outputs reused by blocks of the same shape without corrupting the
    forward (bit-equal to eager), and nothing cached with autograd on."""
    monkeypatch.setattr(merging, "_graph_device", lambda q: True)
    monkeypatch.setattr(merging.AttendGraph, "capture", staticmethod(_ReplayByRecompute.capture))
    loads, shared_base = [], merging._shared_base

    def recorded(q, k, v):
        loads.append(shared_base(q, k, v))
        return loads[-1]

    monkeypatch.setattr(merging, "_shared_base", recorded)
    model, pts = build(), make_points(1500)
    state = merging.patch(model, {"tome": "patch", "r": 0.9})
    with torch.no_grad():
        ref = run(model, pts)
        with merging.attend_graphs(True):
            got1, got2 = run(model, pts), run(model, pts)
    graphs = state.extra["attend_graphs"]
    shapes = {key[0] for key in graphs}
    assert len(graphs) == len(shapes) >= 2 and len(shapes) < len(merging.layer_records(model))
    assert torch.equal(got1, ref) and torch.equal(got2, ref)
    assert loads and all(b is not None for b in loads)  # one copy per call: q, k, v share the qkv tensor
    state.extra.pop("attend_graphs")
    with merging.attend_graphs(True):
        run(model, pts).sum()  # autograd on: eager
    assert "attend_graphs" not in state.extra
