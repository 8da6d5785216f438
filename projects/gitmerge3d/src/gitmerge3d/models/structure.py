"""The ``Point`` dict Pointcept models pass between modules (coord, grid_coord, feat, offset/batch, ...).

Keys follow Pointcept so configs, transforms and checkpoints written for it keep their meaning.
``sparsify`` builds this package's ``SparseTensor`` (see ``sparse_conv``), not spconv's.
"""

from __future__ import annotations

import torch
from addict import Dict

from .serialization import serialize
from .sparse_conv import SparseTensor

# Point keys caching per-serialization data (attention's padded patch orders); dropped on re-serialization
PATCH_ORDER_PREFIX = "patch_order_"


def offset2bincount(offset: torch.Tensor) -> torch.Tensor:
    return torch.diff(offset, prepend=offset.new_zeros(1))


def offset2batch(offset: torch.Tensor) -> torch.Tensor:
    counts = offset2bincount(offset)
    return torch.repeat_interleave(torch.arange(len(counts), device=offset.device), counts)


def batch2offset(batch: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(torch.bincount(batch), dim=0).long()


class Point(Dict):
    """Batched point cloud; derives ``batch`` from ``offset`` (or back) on construction."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "batch" not in self.keys() and "offset" in self.keys():
            self["batch"] = offset2batch(self["offset"])
        elif "offset" not in self.keys() and "batch" in self.keys():
            self["offset"] = batch2offset(self["batch"])

    def ensure_grid_coord(self) -> torch.Tensor:
        if "grid_coord" not in self.keys():
            if not {"grid_size", "coord"}.issubset(self.keys()):
                raise KeyError("Point needs 'grid_coord', or 'coord' and 'grid_size'")
            self["grid_coord"] = torch.div(
                self["coord"] - self["coord"].min(0)[0], self["grid_size"], rounding_mode="trunc"
            ).int()
        return self["grid_coord"]

    def serialization(self, order=("z",), depth: int | None = None, shuffle_orders: bool = False) -> None:
        """Codes/orders/inverses for each order (k, N); shuffled per call as Pointcept does when asked."""
        order = [order] if isinstance(order, str) else list(order)
        self["order"] = order
        grid_coord = self.ensure_grid_coord()
        code, idx, inverse, depth = serialize(grid_coord, self["batch"], order, depth)
        if shuffle_orders:
            perm = torch.randperm(code.shape[0])
            code, idx, inverse = code[perm], idx[perm], inverse[perm]
        self["serialized_depth"] = depth
        self["serialized_code"] = code
        self["serialized_order"] = idx
        self["serialized_inverse"] = inverse
        for key in [k for k in self.keys() if isinstance(k, str) and k.startswith(PATCH_ORDER_PREFIX)]:
            del self[key]

    def sparsify(self, pad: int = 96) -> None:
        grid_coord = self.ensure_grid_coord()
        # spatial shape and batch size in one host sync
        *shape, batch_size = torch.cat([grid_coord.max(0).values.long() + pad, self["batch"][-1:].long() + 1]).tolist()
        indices = torch.cat([self["batch"].unsqueeze(-1).int(), grid_coord.int()], dim=1).contiguous()
        self["sparse_shape"] = shape
        self["sparse_conv_feat"] = SparseTensor(self["feat"], indices, shape, batch_size)
