"""Serialization codes against references written from the published algorithms (python ints, per point)."""

import pytest
import torch

from gitmerge3d.models.pooling import grid_cluster, segment_reduce
from gitmerge3d.models.serialization import encode, hilbert_encode, serialization_depth, serialize, z_order_encode


def ref_morton(x: int, y: int, z: int, depth: int) -> int:
    """OCNN/Pointcept key: per level, bits (x, y, z) from high to low."""
    key = 0
    for i in range(depth):
        key |= ((x >> i) & 1) << (3 * i + 2) | ((y >> i) & 1) << (3 * i + 1) | ((z >> i) & 1) << (3 * i)
    return key


def ref_hilbert(coords: list[int], bits: int) -> int:
    """Skilling (2004) AxestoTranspose, then the transposed index read out bit-interleaved (axis 0 first)."""
    x = list(coords)
    n = len(x)
    m = 1 << (bits - 1)
    q = m
    while q > 1:  # inverse undo
        p = q - 1
        for i in range(n):
            if x[i] & q:
                x[0] ^= p
            else:
                t = (x[0] ^ x[i]) & p
                x[0] ^= t
                x[i] ^= t
        q >>= 1
    for i in range(1, n):  # Gray encode
        x[i] ^= x[i - 1]
    t = 0
    q = m
    while q > 1:
        if x[n - 1] & q:
            t ^= q - 1
        q >>= 1
    for i in range(n):
        x[i] ^= t
    h = 0
    for b in range(bits - 1, -1, -1):
        for i in range(n):
            h = (h << 1) | ((x[i] >> b) & 1)
    return h


@pytest.mark.parametrize("depth", [1, 3, 7, 11, 16])
def test_codes_match_reference(depth):
    g = torch.Generator().manual_seed(depth)
    pts = torch.randint(0, 1 << depth, (300, 3), generator=g)
    z = z_order_encode(pts, depth)
    h = hilbert_encode(pts, depth)
    for i, (a, b, c) in enumerate(pts.tolist()):
        assert z[i].item() == ref_morton(a, b, c, depth)
        assert h[i].item() == ref_hilbert([a, b, c], depth)


def test_hilbert_is_a_curve():
    # every cell of a 4^3 cube gets a distinct index and consecutive indices are face neighbours
    pts = torch.stack(torch.meshgrid(*[torch.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3)
    h = hilbert_encode(pts, 2)
    assert sorted(h.tolist()) == list(range(64))
    walk = pts[torch.argsort(h)]
    assert torch.all((walk[1:] - walk[:-1]).abs().sum(-1) == 1)


def test_trans_orders_swap_xy_and_batch_on_top():
    pts = torch.tensor([[1, 2, 3], [5, 0, 7]])
    batch = torch.tensor([0, 2])
    for o, fn in (("z", z_order_encode), ("hilbert", hilbert_encode)):
        assert torch.equal(encode(pts, None, 3, o + "-trans"), fn(pts[:, [1, 0, 2]], 3))
        assert torch.equal(encode(pts, batch, 3, o), fn(pts, 3) | (batch << 9))
    with pytest.raises(ValueError, match="order must be one of"):
        encode(pts, None, 3, "morton")


def test_serialize_orders_and_inverse():
    pts = torch.randint(0, 50, (200, 3), generator=torch.Generator().manual_seed(1))
    batch = torch.zeros(200, dtype=torch.long)
    batch[120:] = 1
    assert serialization_depth(pts) == int(pts.max() + 1).bit_length()
    code, order, inverse, depth = serialize(pts, batch, ["z", "hilbert"])
    assert code.shape == (2, 200) and depth == 6
    for j in range(2):
        assert torch.all(code[j][order[j]][1:] >= code[j][order[j]][:-1])
        assert torch.equal(order[j][inverse[j]], torch.arange(200))
    assert torch.all(order[:, :120] < 120)  # sample 0 comes first in every order


def test_segment_reduce_and_grid_cluster_by_hand():
    vals = torch.tensor([[1.0], [5.0], [2.0], [4.0], [9.0]])
    indptr = torch.tensor([0, 2, 5])
    assert segment_reduce(vals, indptr, "max").flatten().tolist() == [5.0, 9.0]
    assert segment_reduce(vals, indptr, "mean").flatten().tolist() == [3.0, 5.0]
    with pytest.raises(ValueError, match="reduce must be one of"):
        segment_reduce(vals, indptr, "median")
    grid = torch.tensor([[0, 0, 0], [1, 1, 1], [2, 0, 0], [3, 1, 1], [0, 0, 0]])
    batch = torch.tensor([0, 0, 0, 0, 1])
    cells, cluster, indices, ptr = grid_cluster(grid, batch, 2)
    assert cells.tolist() == [[0, 0, 0], [1, 0, 0], [0, 0, 0]]
    assert cluster.tolist() == [0, 0, 1, 1, 2]
    assert ptr.tolist() == [0, 2, 4, 5]


def test_encode_many_equals_encode():
    from gitmerge3d.models.serialization import ORDERS, encode_many

    pts = torch.randint(0, 300, (500, 3), generator=torch.Generator().manual_seed(2))
    batch = (torch.arange(500) >= 250).long()
    many = encode_many(pts, batch, 9, list(ORDERS) + ["z"])
    for o, code in zip(list(ORDERS) + ["z"], many, strict=True):
        assert torch.equal(code, encode(pts, batch, 9, o))


def test_grid_cluster_matches_row_unique():
    # Pointcept's numbering: unique over rows (coord // 2 with the batch in bits 48+), lexicographic
    g = torch.randint(0, 4000, (3000, 3), generator=torch.Generator().manual_seed(3))
    batch = (torch.arange(3000) >= 1700).long()
    rows = (torch.div(g, 2, rounding_mode="trunc") | (batch[:, None] << 48)).long()
    want_cells, want_cluster = torch.unique(rows, sorted=True, return_inverse=True, dim=0)
    cells, cluster, _, _ = grid_cluster(g, batch, 2)
    assert torch.equal(cluster, want_cluster)
    assert torch.equal(cells, want_cells & ((1 << 48) - 1))
