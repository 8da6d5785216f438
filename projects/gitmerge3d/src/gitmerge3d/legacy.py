"""The pre-2026-12-02 (launch-heavy) implementations, kept to measure the launch reduction in one run.

``legacy_paths()`` swaps them in for the launch-light ones; outputs are identical (tested; merging: equal up to
rounding, the merged tokens' order and scatter order differ), only the
number of kernels per forward differs: the neighbour search loops over the k^3 offsets (~8 kernels
each), Hilbert codes walk one level per step, every attention block recomputes its padded patch order,
and merging is the former
``_merged`` (merge-core's ``patch_match``, layout rebuilt per call; sizes, casts, concat and unmerge copies).
"""

from __future__ import annotations

import contextlib
import itertools

import torch

from merge_core.binned import patch_match
from merge_core.patch_attention import patch_attention

from . import merging
from .models import point_transformer_v3m2, serialization
from .models import sparse_conv as sc


def neighbors_per_offset(indices: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The former ``submanifold_neighbors``: one searchsorted per kernel offset."""
    n = indices.shape[0]
    radius = kernel_size // 2
    coords = indices.long().clone()
    coords[:, 1:] += radius
    extent = coords[:, 1:].max(0).values + radius + 1
    keys = sc._keys(coords, extent)
    sorted_keys, perm = torch.sort(keys)
    offsets = torch.tensor(list(itertools.product(range(kernel_size), repeat=3)), device=indices.device) - radius
    out = torch.empty(n, len(offsets), dtype=torch.long, device=indices.device)
    for j, off in enumerate(offsets):
        shifted = coords.clone()
        shifted[:, 1:] += off
        q = sc._keys(shifted, extent)
        pos = torch.searchsorted(sorted_keys, q).clamp_(max=n - 1)
        hit = sorted_keys[pos] == q
        out[:, j] = torch.where(hit, perm[pos], torch.full_like(pos, n))
    return out


_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def hilbert_level_by_level(grid_coord: torch.Tensor, depth: int = 16) -> torch.Tensor:
    """The former ``hilbert_encode``: one table lookup per level."""
    g = serialization._check_coord(grid_coord, depth)
    if g.device not in _TABLES:  # cached per device, as the former code did
        _TABLES[g.device] = tuple(t.to(g.device) for t in serialization._hilbert_tables())
    digit, nxt = _TABLES[g.device]
    shifts = torch.arange(depth - 1, -1, -1, device=g.device)
    bits = (g[:, :, None] >> shifts) & 1
    octants = (bits[:, 0] << 2) | (bits[:, 1] << 1) | bits[:, 2]
    state = torch.zeros_like(g[:, 0])
    gray = torch.zeros_like(g[:, 0])
    for level in range(depth):
        idx = state * 8 + octants[:, level]
        gray = (gray << 3) | digit[idx]
        state = nxt[idx]
    code, shift = gray, 1
    while shift < 3 * depth:
        code, shift = code ^ (code >> shift), shift << 1
    return code


def patches_per_block(self, point):
    """The former ``SerializedAttention.patches``: padded order and inverse recomputed in every block."""
    if "min_bincount" not in point.keys():
        point["min_bincount"] = int(point_transformer_v3m2.offset2bincount(point["offset"]).min().item())
    k = min(point["min_bincount"], self.patch_size_max)
    self.patch_size = k
    key = f"pad_unpad_{k}"
    if key not in point.keys():
        point[key] = point_transformer_v3m2.patch_padding(point["offset"], k)
    pad, unpad = point[key]
    order = point["serialized_order"][self.order_index][pad]
    inverse = unpad[point["serialized_inverse"][self.order_index]]
    return order, inverse, k


def merged_via_patch_match(self, q, k, v, bias, r: int, stride: int):
    """The former ``MergedSerializedAttention._merged``: merge-core's ``patch_match`` (layout rebuilt per call),
    ``PatchMatch`` sizes by scatter_add, a q|k|v concat merged by scatter_add and divided by the cast sizes,
    unmerge by a gather into (P, H, N, D) (the caller's transpose then copies)."""
    cfg = self._merge_info.extra["gitmerge3d"]
    n = q.shape[-2]
    if q.shape[0] == 0:
        return v, n
    m = patch_match(v, r, stride, "spread" if cfg.no_rand else "random", mean_head=cfg.mean_head)
    if m is None:
        return point_transformer_v3m2.SerializedAttention.attend(self, q, k, v, bias, None), n
    d = q.shape[-1]
    merged = m.merge(torch.cat([q, k, v], dim=-1))
    qm, km, vm = merged[..., :d], merged[..., d : 2 * d], merged[..., 2 * d :]
    size = m.sizes()
    dropout = self.attn_drop if self.training else 0.0
    if bias is None:
        out = patch_attention(qm, km, vm, size, cfg.prop_attn, scale=self.scale, dropout_p=dropout)
    else:
        out = self._biased(qm, km, vm, self._merge_bias(m, bias), size, cfg.prop_attn, dropout)
    return m.unmerge(out), m.num_out


@contextlib.contextmanager
def legacy_paths():
    """Run the model with the former implementations (same outputs, more kernels); restores on exit."""
    saved = [
        (sc, "submanifold_neighbors", neighbors_per_offset),
        (serialization, "hilbert_encode", hilbert_level_by_level),
        (merging.MergedSerializedAttention, "_merged", merged_via_patch_match),
        (point_transformer_v3m2.SerializedAttention, "patches", patches_per_block),
    ]
    old = [(obj, name, getattr(obj, name) if name not in vars(obj) else vars(obj)[name]) for obj, name, _ in saved]
    try:
        for obj, name, fn in saved:
            setattr(obj, name, fn)
        yield
    finally:
        for obj, name, fn in old:
            setattr(obj, name, fn)
