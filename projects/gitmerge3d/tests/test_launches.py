"""Launch-light code paths equal their naive references, and the op counter counts what it claims.

References are independent re-implementations: a dict-based neighbour table, merge-core's own
``patch_match``, the level-by-level Hilbert state machine, the per-block patch-order computation.
"""

from __future__ import annotations

import json
import types

import pytest
import torch

from gitmerge3d import legacy, merging
from gitmerge3d.models import PointTransformerV3, serialization
from gitmerge3d.models import sparse_conv as sc
from gitmerge3d.models.presets import reduced_config
from gitmerge3d.opcount import OpCounter, category, count_ops
from gitmerge3d.tools import count_ops as count_ops_tool
from merge_core.binned import patch_match


def random_indices(n: int, size: int, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cells = torch.randperm(batch * size**3, generator=g)[:n]
    rest = cells % size**3
    return torch.stack([cells // size**3, rest // size**2, (rest // size) % size, rest % size], 1).int()


@pytest.mark.parametrize(("n", "size", "batch", "k"), [(300, 8, 2, 3), (900, 12, 3, 3), (400, 9, 1, 5), (1, 4, 1, 3)])
def test_neighbors_equal_dict_reference(n, size, batch, k):
    idx = random_indices(n, size, batch)
    got = sc.submanifold_neighbors(idx, k)
    assert torch.equal(got, sc.submanifold_neighbors_reference(idx, k))
    # centre offset is the voxel itself
    assert torch.equal(got[:, k**3 // 2], torch.arange(n))


@pytest.mark.parametrize("depth", [1, 3, 4, 5, 8, 9, 13, 16])
def test_hilbert_steps_equal_level_by_level(depth):
    grid = torch.randint(0, 2**depth, (2000, 3), generator=torch.Generator().manual_seed(depth))
    assert torch.equal(serialization.hilbert_encode(grid, depth), legacy.hilbert_level_by_level(grid, depth))


@pytest.mark.parametrize(
    ("b", "h", "n", "c", "r", "stride", "mean_head", "ties"),
    [
        (3, 4, 64, 8, 57, 10, False, False),
        (2, 3, 50, 5, 30, 3, False, True),
        (1, 6, 256, 16, 230, 10, True, False),
        (2, 32, 100, 16, 90, 10, False, False),
        (2, 4, 64, 8, 5, 2, False, True),
        (2, 2, 7, 4, 6, 20, False, False),  # no bins: nothing merges
    ],
)
def test_spread_slots_group_like_merge_core(b, h, n, c, r, stride, mean_head, ties):
    v = torch.randn(b, h, n, c, generator=torch.Generator().manual_seed(n + r))
    if ties:
        v = v.round()
    ref = patch_match(v, r, stride, "spread", mean_head=mean_head)
    metric = v.mean(1, keepdim=True).expand(v.shape) if mean_head else v
    got = merging.spread_slots(metric, r, stride)
    if ref is None:
        assert got is None
        return
    slot, n_out = got
    assert n_out == ref.num_out
    # same partition of every patch/head into groups (slot numbering differs: destinations first here)
    assert torch.equal(group_labels(slot), group_labels(ref.slot))
    assert torch.equal(merging.group_sizes(slot, n_out).sort(1).values, ref.size.sort(1).values)


def group_labels(slot: torch.Tensor) -> torch.Tensor:
    """Each token's group named by the group's first position (independent of the slot numbering)."""
    g, n = slot.shape
    first = torch.full((g, int(slot.max()) + 1), n).scatter_reduce_(1, slot, torch.arange(n).expand(g, n), "amin")
    return first.gather(1, slot)


@pytest.mark.parametrize("mode", [None, "patch"])
def test_model_output_equals_naive_paths(make_points, monkeypatch, mode):
    torch.manual_seed(0)
    model = PointTransformerV3(**reduced_config("0c", patch=64)).eval()
    if mode:
        merging.patch(model, {"tome": mode, "r": 0.9})
    pts = make_points(1200, samples=2, extent=1.5)

    def run():
        torch.manual_seed(1)  # shuffle_orders draws from the global generator
        with torch.no_grad():
            return model(dict(pts))["feat"]

    fast = run()
    with legacy.legacy_paths():  # per-offset search, level-by-level Hilbert, per-block order, former merging
        old = run()
    if mode is None:
        assert torch.equal(fast, old)
    else:  # merged tokens in another order and another scatter order: equal up to rounding
        torch.testing.assert_close(fast, old, atol=1e-5, rtol=1e-5)
    assert sc.submanifold_neighbors is not legacy.neighbors_per_offset  # restored
    monkeypatch.setattr(sc, "submanifold_neighbors", sc.submanifold_neighbors_reference)
    assert torch.equal(fast, run())


class _FakeSpconv:
    """spconv-like API: pairs of a new key go into a *copy* of the input's indice_dict (as spconv does)."""

    builds = 0

    class SparseConvTensor:
        def __init__(self, features, indices, spatial_shape, batch_size):
            self.features, self.indices, self.indice_dict = features, indices, {}

    class SubMConv3d(torch.nn.Module):
        def __init__(self, cin, cout, k, bias=False, indice_key=None):
            super().__init__()
            self.k, self.indice_key = k, indice_key
            self.weight = torch.nn.Parameter(torch.empty(cout, k, k, k, cin))

        def forward(self, t):
            pairs = dict(t.indice_dict)
            if self.indice_key not in pairs:
                _FakeSpconv.builds += 1
                pairs[self.indice_key] = sc.submanifold_neighbors_reference(t.indices, self.k)
            out = _FakeSpconv.SparseConvTensor(
                sc.gather_conv(t.features, pairs[self.indice_key], self.weight), t.indices, None, 1
            )
            out.indice_dict = pairs
            return out


def test_spconv_path_keeps_indice_pairs_and_matches_torch(monkeypatch):
    fake = types.SimpleNamespace(
        __name__="fakespconv", SparseConvTensor=_FakeSpconv.SparseConvTensor, SubMConv3d=_FakeSpconv.SubMConv3d
    )
    _FakeSpconv.SubMConv3d.__module__ = "fakespconv.conv"
    x = sc.SparseTensor(torch.randn(200, 4), random_indices(200, 8, 2), [8, 8, 8], 2)
    convs = [sc.SubMConv3d(4, 4, 3, indice_key="k") for _ in range(2)]
    for c in convs:
        torch.nn.init.normal_(c.bias)
    ref = convs[1](convs[0](x))
    monkeypatch.setattr(sc, "spconv_api", lambda cuda=True: fake)
    sc.set_backend("spconv")
    try:
        y = sc.SparseTensor(x.features, x.indices, x.spatial_shape, 2)
        got = convs[1](convs[0](y))
    finally:
        sc.set_backend(sc.DEFAULT_BACKEND)
    assert _FakeSpconv.builds == 1  # the second conv of the key reused the first one's pairs
    torch.testing.assert_close(got.features, ref.features)


def test_op_counter_counts_launches_views_and_syncs():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    counts, _ = count_ops(lambda: ((a + b).view(-1).sum(), torch.nonzero(a > 0), (a * 2).sum().item()))
    assert counts.total_launches == 7  # add, sum, gt, nonzero, mul, sum, _local_scalar_dense
    assert counts.total_syncs == 2 and counts.views >= 1
    assert category("models/sparse_conv.py:submanifold_neighbors") == "sparse conv: neighbour search"
    assert category("merge_core/binned.py:patch_match").startswith("merging")
    assert isinstance(OpCounter().count.launches, dict)


@pytest.mark.parametrize(
    "fn, syncs",
    [
        (lambda a, m, r: a[m], 1),  # bool-mask index: a nonzero inside aten::index
        (lambda a, m, r: a[r], 0),  # integer index: no sync
        (lambda a, m, r: a.clone().index_put_((m,), torch.tensor(0.0)), 1),
        (lambda a, m, r: a.clone().masked_fill_(m, 0.0), 0),  # a[m] = 0 dispatches here: no sync
        (lambda a, m, r: torch.repeat_interleave(r), 1),  # output length = sum(r)
        (lambda a, m, r: torch.arange(3).repeat_interleave(r), 1),
        (lambda a, m, r: torch.arange(3).repeat_interleave(r, output_size=3), 0),
        (lambda a, m, r: torch.arange(3).repeat_interleave(2), 0),
        (lambda a, m, r: torch.bincount(r), 1),  # output length = max(r) + 1
    ],
)
def test_op_counter_sees_hidden_syncs(fn, syncs):
    """Data-dependent output sizes that do not show up as a nonzero/item op of their own."""
    a, r = torch.randn(6), torch.tensor([1, 2, 0])
    counts, _ = count_ops(fn, a, a > 0, r)
    assert counts.total_syncs == syncs


def test_merged_forward_adds_no_host_sync(make_points):
    """patch merging (the official no_rand path) is sync-free: same syncs per forward as the unmerged model."""
    model = PointTransformerV3(**reduced_config("0c", patch=64)).eval()
    pts = make_points(800)
    with torch.no_grad():
        base, _ = count_ops(lambda: model(dict(pts)))
        merging.patch(model, {"tome": "patch", "r": 0.9})
        merged, _ = count_ops(lambda: model(dict(pts)))
    assert merged.total_syncs == base.total_syncs > 0
    assert not [s for s in merged.syncs if "merging" in s or "merge_core" in s]


def test_neighbour_search_is_a_few_launches_per_key(make_points):
    model = PointTransformerV3(**reduced_config("0c", patch=64)).eval()
    pts = make_points(800)
    with torch.no_grad():
        counts, _ = count_ops(lambda: model(dict(pts)))
    calls = 5  # one neighbour table per stage (the decoder reuses the encoder's)
    assert counts.by_category()["sparse conv: neighbour search"] <= 30 * calls
    with torch.no_grad(), legacy.legacy_paths():
        before, _ = count_ops(lambda: model(dict(pts)))
    assert before.by_category()["sparse conv: neighbour search"] >= 27 * 8 * calls  # ~8 per offset and table
    assert counts.total_launches < before.total_launches
    assert counts.launches["models/sparse_conv.py:submanifold_neighbors"] > 0


def test_count_ops_cli(tmp_path, capsys):
    out = tmp_path / "ops.json"
    rc = count_ops_tool.main(["--synthetic", "3000", "--reduced", "--rows", "r0,patch@0.9", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "sparse conv: neighbour search" in text and "**total**" in text
    assert out.with_suffix(".md").exists()
    assert count_ops_tool.main(["--synthetic", "3000", "--rows", "patch@2"]) == 2


def test_launch_bench_profile_on_cpu(tmp_path, capsys):
    """The --profile path (top self-time table per case) on the toy model and the 100-point sample."""
    from gitmerge3d.tools import launch_bench

    from .conftest import DATA

    scene = DATA / "mmdet3d-tests" / "scannet" / "points" / "scene0000_00.bin"
    if not scene.exists():
        pytest.skip(f"sample scene not found at {scene}")
    args = ["--scene", str(scene), "--tiles", "1", "--reduced", "--device", "cpu", "--warmup", "0", "--iters", "1"]
    rc = launch_bench.main(args + ["--normals", "zero", "--profile", "5", "--out-dir", str(tmp_path)])
    assert rc == 0
    assert (tmp_path / "profile-real-patch@0.9-torch.txt").exists()
    md = (tmp_path / "launch-bench.md").read_text()
    assert "top self time, real r0-flash torch" in md and "| name | self ms | calls |" in md
    data = json.loads((tmp_path / "launch-bench.json").read_text())
    assert all(len(r["top_kernels"]) == 5 and "profile_table" not in r for r in data["rows"])
    assert all(0 < r["time_shares"]["attention_share"] < 1 for r in data["rows"])
    assert all(0 < r["time_shares"]["attention_span_share"] < 1 for r in data["rows"])
    assert "time shares of one forward" in md
    assert [r["spconv"] for r in data["rows"]] == ["torch", "torch"]  # auto only when --backends names it
    assert all(r["latency_after_profiler_ms"] > 0 for r in data["rows"])


def test_launch_bench_times_every_case_before_any_profiler_session(tmp_path, monkeypatch):
    """A CUDA profiler session may leave CUPTI attached and slow later launches: no timing may follow one,
    except the explicit ``latency_after_profiler_ms`` re-timing."""
    from gitmerge3d.tools import launch_bench

    from .conftest import DATA

    scene = DATA / "mmdet3d-tests" / "scannet" / "points" / "scene0000_00.bin"
    if not scene.exists():
        pytest.skip(f"sample scene not found at {scene}")
    log = []
    timer, shares = launch_bench.time_calls, launch_bench.time_shares
    monkeypatch.setattr(launch_bench, "time_calls", lambda *a, **k: log.append("time") or timer(*a, **k))
    monkeypatch.setattr(launch_bench, "time_shares", lambda *a, **k: log.append("profile") or shares(*a, **k))
    args = ["--scene", str(scene), "--tiles", "1", "--reduced", "--device", "cpu", "--warmup", "0", "--iters", "1"]
    assert launch_bench.main(args + ["--normals", "zero", "--profile", "3", "--out-dir", str(tmp_path)]) == 0
    assert log == ["time", "time", "profile", "time", "profile", "time"]


def test_spconv_warmup_refuses_without_cuda(tmp_path, capsys):
    from gitmerge3d.tools import spconv_warmup

    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    rc = spconv_warmup.main(["--scene", "x.bin", "--cache-dir", str(tmp_path / "c"), "--out-dir", str(tmp_path)])
    assert rc == 2 and "runs on CUDA only" in capsys.readouterr().err
    assert spconv_warmup.main(["--scene", "x.bin", "--rows", "nope", "--out-dir", str(tmp_path)]) == 2


def test_time_shares_attribute_a_conv_only_forward_to_the_conv():
    """A forward that is one sparse conv: ~all its time is sparse conv, none attention; hooks are removed."""
    from gitmerge3d.tools import launch_bench

    g = torch.Generator().manual_seed(0)
    cells = torch.randperm(16**3, generator=g)[:2000]
    idx = torch.stack([torch.zeros_like(cells), cells // 256, (cells // 16) % 16, cells % 16], 1).int()
    x = sc.SparseTensor(torch.randn(2000, 32, generator=g), idx, [16, 16, 16], 1)
    model = torch.nn.Sequential(sc.SubMConv3d(32, 32, 3))
    sc.set_backend("torch")
    try:
        shares = launch_bench.time_shares(lambda: model[0](x), model, torch.device("cpu"))
    finally:
        sc.set_backend(sc.DEFAULT_BACKEND)
    assert shares["clock"] == "cpu" and shares["attention_ms"] == 0 and shares["attention_span_ms"] == 0
    assert 0.9 <= shares["sparse_conv_share"] <= 1.0 and shares["forward_ms"] > 0
    assert 0.9 <= shares["sparse_conv_span_share"] <= 1.0
    assert not model[0]._forward_pre_hooks and not model[0]._forward_hooks
