"""Grid pooling / unpooling with torch.segment_reduce (no torch-scatter).

Pooling halves the grid (grid_coord // stride per sample), reduces features of each cell (max by
default, as Sonata) and means coordinates; unpooling adds the projected coarse features back to the
fine points. Both keep Pointcept's module names (``proj``, ``norm``, ``act``, ``proj_skip``).
"""

from __future__ import annotations

import torch
from torch import nn

from .modules import PointModule, PointSequential
from .structure import Point

REDUCES = ("sum", "mean", "min", "max")


def segment_reduce(values: torch.Tensor, indptr: torch.Tensor, reduce: str) -> torch.Tensor:
    """Reduce consecutive row segments [indptr[i], indptr[i+1]) (torch_scatter.segment_csr's contract)."""
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
    lengths = torch.diff(indptr)
    if values.dtype in (torch.float16, torch.bfloat16):  # half kernels are not available on every device
        return torch.segment_reduce(values.float(), reduce, lengths=lengths, axis=0).to(values.dtype)
    return torch.segment_reduce(values, reduce, lengths=lengths, axis=0)


def grid_cluster(grid_coord: torch.Tensor, batch: torch.Tensor, stride: int):
    """Cells of (batch, grid_coord // stride): (cell grid coords, cluster per point, sorted order, indptr).

    Cells are numbered in (batch, x, y, z) lexicographic order, as Pointcept's ``unique(dim=0)`` over
    rows with the batch in bits 48+ numbers them; here one packed int64 key per point (16 bits per axis,
    the serialization limit) makes it a 1-D unique.
    """
    coarse = torch.div(grid_coord, stride, rounding_mode="trunc").long()
    if coarse.numel() and (int(coarse.min()) < 0 or int(coarse.max()) >= 1 << 16):
        raise ValueError("grid_coord // stride must lie in [0, 65536) (16 bits per axis)")
    key = (batch.long() << 48) | (coarse[:, 0] << 32) | (coarse[:, 1] << 16) | coarse[:, 2]
    cells, cluster, counts = torch.unique(key, sorted=True, return_inverse=True, return_counts=True)
    mask = (1 << 16) - 1
    cells = torch.stack([(cells >> 32) & mask, (cells >> 16) & mask, cells & mask], dim=1)
    _, indices = torch.sort(cluster, stable=True)
    indptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, dim=0)])
    return cells, cluster, indices, indptr


class GridPooling(PointModule):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 2,
        norm_layer=None,
        act_layer=None,
        reduce: str = "max",
        shuffle_orders: bool = True,
        traceable: bool = True,
    ):
        super().__init__()
        if reduce not in REDUCES:
            raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
        self.stride, self.reduce, self.shuffle_orders, self.traceable = stride, reduce, shuffle_orders, traceable
        self.proj = nn.Linear(in_channels, out_channels)
        self.norm = PointSequential(norm_layer(out_channels)) if norm_layer is not None else None
        self.act = PointSequential(act_layer()) if act_layer is not None else None

    def forward(self, point: Point) -> Point:
        grid_coord = point.ensure_grid_coord()
        cells, cluster, indices, indptr = grid_cluster(grid_coord, point["batch"], self.stride)
        head = indices[indptr[:-1]]
        pooled = Point(
            feat=segment_reduce(self.proj(point["feat"])[indices], indptr, self.reduce),
            coord=segment_reduce(point["coord"][indices], indptr, "mean"),
            grid_coord=cells.to(grid_coord.dtype),
            batch=point["batch"][head],
        )
        for key in ("origin_coord", "color"):
            if key in point.keys():
                pooled[key] = segment_reduce(point[key][indices].float(), indptr, "mean")
        for key in ("condition", "context", "name", "split"):
            if key in point.keys():
                pooled[key] = point[key]
        if "grid_size" in point.keys():
            pooled["grid_size"] = point["grid_size"] * self.stride
        if self.traceable:
            pooled["pooling_inverse"] = cluster
            pooled["pooling_parent"] = point
        if self.norm is not None:
            pooled = self.norm(pooled)
        if self.act is not None:
            pooled = self.act(pooled)
        pooled.serialization(order=point["order"], shuffle_orders=self.shuffle_orders)
        pooled.sparsify()
        return pooled


class GridUnpooling(PointModule):
    def __init__(self, in_channels, skip_channels, out_channels, norm_layer=None, act_layer=None, traceable=False):
        super().__init__()
        self.proj = PointSequential(nn.Linear(in_channels, out_channels))
        self.proj_skip = PointSequential(nn.Linear(skip_channels, out_channels))
        if norm_layer is not None:
            self.proj.add(norm_layer(out_channels))
            self.proj_skip.add(norm_layer(out_channels))
        if act_layer is not None:
            self.proj.add(act_layer())
            self.proj_skip.add(act_layer())
        self.traceable = traceable

    def forward(self, point: Point) -> Point:
        if "pooling_parent" not in point.keys() or "pooling_inverse" not in point.keys():
            raise KeyError("GridUnpooling needs 'pooling_parent' and 'pooling_inverse' (pool with traceable=True)")
        parent = point.pop("pooling_parent")
        inverse = point["pooling_inverse"]
        feat = point["feat"]
        parent = self.proj_skip(parent)
        parent["feat"] = parent["feat"] + self.proj(point)["feat"][inverse]
        parent["sparse_conv_feat"] = parent["sparse_conv_feat"].replace_feature(parent["feat"])
        if self.traceable:
            point["feat"] = feat
            parent["unpooling_parent"] = point
        return parent
