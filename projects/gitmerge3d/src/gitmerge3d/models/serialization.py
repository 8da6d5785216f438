"""Space-filling-curve codes of integer grid coordinates (z-order and Hilbert), Pointcept-compatible.

Pointcept orders points by the code of their grid coordinate; checkpoints were trained on exactly
those orders, so the codes here must match bit for bit:

- z-order interleaves bits with x highest: bit i of x/y/z goes to bit 3i+2 / 3i+1 / 3i.
- Hilbert follows Skilling (2004, "Programming the Hilbert curve") on ``depth`` bits per axis:
  transposed-axes form walked from the top bit, then the interleaved Gray code is decoded.
- ``-trans`` orders swap the x and y columns first; the batch index sits above the 3*depth bits.
"""

from __future__ import annotations

import torch

ORDERS = ("z", "z-trans", "hilbert", "hilbert-trans")


def _check_coord(grid_coord: torch.Tensor, depth: int) -> torch.Tensor:
    if grid_coord.dim() != 2 or grid_coord.shape[1] != 3:
        raise ValueError(f"grid_coord must have shape (N, 3), got {tuple(grid_coord.shape)}")
    if not 1 <= depth <= 16:
        raise ValueError(f"depth must be in [1, 16], got {depth}")
    return grid_coord.long()


def z_order_encode(grid_coord: torch.Tensor, depth: int = 16) -> torch.Tensor:
    """Morton code with x in the highest bit of every 3-bit group."""
    g = _check_coord(grid_coord, depth)
    x, y, z = g[:, 0], g[:, 1], g[:, 2]
    code = torch.zeros_like(x)
    for i in range(depth):
        bit = 1 << i
        code |= ((x & bit) << (2 * i + 2)) | ((y & bit) << (2 * i + 1)) | ((z & bit) << (2 * i))
    return code


def hilbert_encode(grid_coord: torch.Tensor, depth: int = 16) -> torch.Tensor:
    """Hilbert index on a (2**depth)^3 cube (Skilling's transposed form, top bit first)."""
    g = _check_coord(grid_coord, depth)
    x = g.clone()  # (N, 3): axis values, edited in place into the transposed Hilbert form
    n_dims = 3
    # Walk bits from the most significant; q is the current bit, p the mask of all lower bits.
    for level in range(depth - 1, 0, -1):
        q = 1 << level
        p = q - 1
        for d in range(n_dims):
            on = (x[:, d] & q) != 0
            # bit set: invert the lower bits of axis 0; bit clear: exchange lower bits of axes 0 and d
            flip0 = torch.where(on, p, 0)
            t = torch.where(on, 0, (x[:, 0] ^ x[:, d]) & p)
            x[:, 0] ^= flip0 | t
            x[:, d] ^= t
    # Interleave (axis 0 highest within each level), then Gray-decode the 3*depth-bit word.
    gray = torch.zeros_like(x[:, 0])
    for level in range(depth - 1, -1, -1):
        for d in range(n_dims):
            gray = (gray << 1) | ((x[:, d] >> level) & 1)
    code = gray.clone()
    shift = 1
    while shift < n_dims * depth:
        code ^= code >> shift
        shift <<= 1
    return code


def encode(grid_coord: torch.Tensor, batch: torch.Tensor | None = None, depth: int = 16, order: str = "z"):
    """Code of one order; with ``batch`` the sample index is put above the 3*depth coordinate bits."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    coord = grid_coord[:, [1, 0, 2]] if order.endswith("-trans") else grid_coord
    code = z_order_encode(coord, depth) if order.startswith("z") else hilbert_encode(coord, depth)
    if batch is not None:
        code = (batch.long() << (3 * depth)) | code
    return code


def serialization_depth(grid_coord: torch.Tensor) -> int:
    """Pointcept's adaptive depth: bit length of (max grid coordinate + 1)."""
    return int(grid_coord.max().item() + 1).bit_length()


def serialize(grid_coord: torch.Tensor, batch: torch.Tensor, orders, depth: int | None = None):
    """Codes, orders (argsort) and inverse permutations for each order, stacked as (k, N)."""
    if depth is None:
        depth = serialization_depth(grid_coord)
    n_samples = int(batch.max().item()) + 1 if batch.numel() else 1
    if depth * 3 + n_samples.bit_length() > 63:
        raise ValueError(f"serialization needs depth*3 + batch bits <= 63, got depth={depth}, batch={n_samples}")
    code = torch.stack([encode(grid_coord, batch, depth, o) for o in orders])
    order = torch.argsort(code, dim=1)
    inverse = torch.empty_like(order)
    inverse.scatter_(1, order, torch.arange(code.shape[1], device=code.device).expand_as(order))
    return code, order, inverse, depth
