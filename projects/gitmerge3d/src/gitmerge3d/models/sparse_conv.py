"""Sparse 3D convolution behind one interface: pure torch (CPU, reference), spconv-triton or spconv.

Every backend uses spconv's weight layout (Cout, kx, ky, kz, Cin) under the names ``weight``/``bias``,
so Pointcept/Sonata checkpoints load unchanged and a model can switch backend without conversion.
Output at voxel p = bias + sum_{a,b,c} W[:, a, b, c, :] @ x[p + (a, b, c) - k//2] (submanifold: only
existing voxels are outputs and inputs).

Backend choice (``set_backend`` / ``GITMERGE3D_SPCONV``, default ``torch``): ``torch``; ``auto`` =
spconv-triton for CUDA tensors when importable, else pure torch; ``spconv`` (whichever spconv API is
importable, the CPU build included: it needs the bias added outside and a stream patch for backward, done
here). The default is ``torch`` because on an H200 (2026-12-02, Sonata 0c, real scene, fp16 autocast)
spconv-triton 1.0.0 was slower: its GEMM gets the fp32 features and runs IEEE fp32 (no tensor cores),
74.8 ms of GPU time per forward against 17.6 ms for the torch conv, after a 64 s cold autotune.
spconv-triton's autotune space is narrowed by ``spconv_tune`` (``GITMERGE3D_SPCONV_TUNE``=narrow|fixed|full)
before its first kernel runs, so a bare GPU does not spend minutes autotuning.
"""

from __future__ import annotations

import importlib
import itertools
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from . import spconv_tune

BACKENDS = ("auto", "torch", "spconv")
DEFAULT_BACKEND = "torch"
_backend = os.environ.get("GITMERGE3D_SPCONV", DEFAULT_BACKEND)
# elements of the gathered (N, k, Cin) neighbour block materialised at once by the torch backend
_GATHER_BUDGET = 1 << 25


def set_backend(name: str) -> None:
    """Select the sparse-conv backend for all modules (see module docstring)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"sparse-conv backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


def spconv_api(cuda: bool = True):
    """The importable spconv-style module, or None: spconv-triton first for CUDA tensors (it runs on
    GPUs only), plain spconv only for CPU tensors."""
    names = ("spconv_triton.pytorch", "spconv.pytorch") if cuda else ("spconv.pytorch",)
    for name in names:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a broken optional install must not break the torch path
            continue
        if hasattr(mod, "SubMConv3d") and hasattr(mod, "SparseConvTensor"):
            return mod
    return None


@dataclass
class SparseTensor:
    """Features on voxels ``indices`` (N, 4) int = (batch, x, y, z); neighbour maps cached per key."""

    features: torch.Tensor
    indices: torch.Tensor
    spatial_shape: list
    batch_size: int
    cache: dict = field(default_factory=dict)

    def replace_feature(self, features: torch.Tensor) -> SparseTensor:
        if features.shape[0] != self.indices.shape[0]:
            raise ValueError(f"features must have {self.indices.shape[0]} rows, got {features.shape[0]}")
        return SparseTensor(features, self.indices, self.spatial_shape, self.batch_size, self.cache)


def _keys(coords: torch.Tensor, extent: torch.Tensor) -> torch.Tensor:
    """Unique int64 key of (batch, x, y, z) with non-negative, bounded coordinates."""
    c = coords.long()
    return ((c[:, 0] * extent[0] + c[:, 1]) * extent[1] + c[:, 2]) * extent[2] + c[:, 3]


def submanifold_neighbors(indices: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(N, k^3) row of the voxel at each kernel offset (x-major order), N where there is none.

    All k^3 offsets in one batched lookup: the key is linear in the coordinates, so the key of
    ``voxel + offset`` is ``key(voxel) + key_delta(offset)`` and one ``searchsorted`` over an (N, k^3)
    query answers every offset (~15 kernels instead of ~8 per offset; see ``opcount``).
    """
    n = indices.shape[0]
    radius = kernel_size // 2
    device = indices.device
    coords = indices.long()
    shift = torch.tensor([0, radius, radius, radius], device=device)
    coords = coords + shift
    extent = coords[:, 1:].max(0).values + radius + 1
    keys = _keys(coords, extent)
    sorted_keys, perm = torch.sort(keys)
    offsets = _kernel_offsets(kernel_size, device)  # (k^3, 3), x-major
    delta = (offsets[:, 0] * extent[1] + offsets[:, 1]) * extent[2] + offsets[:, 2]
    query = keys[:, None] + delta
    pos = torch.searchsorted(sorted_keys, query).clamp_(max=n - 1)
    hit = sorted_keys[pos] == query
    return torch.where(hit, perm[pos], n)


_OFFSETS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _kernel_offsets(kernel_size: int, device: torch.device) -> torch.Tensor:
    """(k^3, 3) offsets in [-k//2, k//2], x-major (spconv's kernel order), cached per device."""
    key = (kernel_size, torch.device(device))
    if key not in _OFFSETS:
        grid = list(itertools.product(range(kernel_size), repeat=3))
        _OFFSETS[key] = (torch.tensor(grid, dtype=torch.long) - kernel_size // 2).to(device)
    return _OFFSETS[key]


def submanifold_neighbors_reference(indices: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Dict-based neighbour table (python loop over voxels): the independent reference of the tests."""
    n = indices.shape[0]
    rows = {tuple(v): i for i, v in enumerate(indices.tolist())}
    radius = kernel_size // 2
    offs = list(itertools.product(range(-radius, radius + 1), repeat=3))
    out = torch.full((n, len(offs)), n, dtype=torch.long)
    for i, (b, x, y, z) in enumerate(indices.tolist()):
        for j, (dx, dy, dz) in enumerate(offs):
            out[i, j] = rows.get((b, x + dx, y + dy, z + dz), n)
    return out


def gather_conv(features: torch.Tensor, neighbors: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_k features[neighbors[:, k]] @ W_k^T with a zero row for missing neighbours, chunked over k."""
    n, k3 = neighbors.shape
    cout, cin = weight.shape[0], weight.shape[-1]
    w = weight.reshape(cout, k3, cin).permute(1, 2, 0)  # (k3, Cin, Cout)
    padded = torch.cat([features, features.new_zeros(1, cin)], dim=0)
    chunk = max(1, min(k3, _GATHER_BUDGET // max(1, n * cin)))
    out = None
    for s in range(0, k3, chunk):
        e = min(k3, s + chunk)
        block = padded[neighbors[:, s:e]].reshape(n, (e - s) * cin)
        part = block @ w[s:e].reshape((e - s) * cin, cout).to(block.dtype)
        out = part if out is None else out + part
    return out


class SubMConv3d(nn.Module):
    """Submanifold sparse conv with spconv's parameter names and layout (Cout, k, k, k, Cin)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True, indice_key=None):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for a submanifold conv, got {kernel_size}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.indice_key = indice_key
        self.weight = nn.Parameter(torch.empty(out_channels, kernel_size, kernel_size, kernel_size, in_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight.view(out_channels, -1), a=math.sqrt(5))
        self.__dict__["_spconv_module"] = None

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, key={self.indice_key}"

    def _use_spconv(self, x: torch.Tensor) -> bool:
        if _backend == "torch":
            return False
        if _backend == "spconv":
            if spconv_api(x.is_cuda) is None:
                what = "neither spconv-triton nor spconv imports" if x.is_cuda else "spconv (CPU build) does not import"
                raise RuntimeError(f"sparse-conv backend 'spconv' selected but {what}")
            return True
        return x.is_cuda and spconv_api(True) is not None

    def forward(self, x: SparseTensor) -> SparseTensor:
        feats = x.features
        if self._use_spconv(feats):
            out = self._spconv_forward(x)
        else:
            key = ("torch", self.indice_key or id(self), self.kernel_size)
            nbr = x.cache.get(key)
            if nbr is None:
                nbr = submanifold_neighbors(x.indices, self.kernel_size)
                if self.indice_key is not None:
                    x.cache[key] = nbr
            out = gather_conv(feats, nbr, self.weight)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return x.replace_feature(out)

    def _spconv_forward(self, x: SparseTensor) -> torch.Tensor:
        """One spconv(-triton) SubMConv3d call sharing our parameters (same (Cout,k,k,k,Cin) layout).

        The bias stays outside (added by ``forward``): spconv's CPU build refuses a bias in eval mode.
        Indice pairs: spconv stores a new key's pairs in a *copy* of the input's ``indice_dict`` that only
        the output tensor carries, so the output's dict is merged back into our per-tensor cache; without
        that, every conv of a stage would rebuild the pairs of its ``indice_key``.
        """
        api = spconv_api(x.features.is_cuda)
        if api.__name__.startswith("spconv_triton"):
            spconv_tune.install()
        mod = self.__dict__["_spconv_module"]
        if mod is None or mod.__class__.__module__.split(".")[0] != api.__name__.split(".")[0]:
            # bias is added outside: spconv's CPU build refuses bias in eval mode
            mod = api.SubMConv3d(
                self.in_channels, self.out_channels, self.kernel_size, bias=False, indice_key=self.indice_key
            )
            if tuple(mod.weight.shape) != tuple(self.weight.shape):
                raise RuntimeError(
                    f"spconv weight layout {tuple(mod.weight.shape)} differs from (Cout,k,k,k,Cin) "
                    f"{tuple(self.weight.shape)}"
                )
            self.__dict__["_spconv_module"] = mod
            if not torch.cuda.is_available():
                _patch_spconv_cpu_stream()
        mod.weight = self.weight
        mod.train(self.training)
        key = ("spconv_indice_dict", api.__name__)
        pairs = x.cache.setdefault(key, {})
        t = api.SparseConvTensor(x.features, x.indices.int(), list(x.spatial_shape), x.batch_size)
        t.indice_dict = pairs
        out = mod(t)
        if self.indice_key is not None:
            pairs.update(out.indice_dict)
        return out.features


def _patch_spconv_cpu_stream() -> None:
    """spconv's backward asks torch.cuda for a stream; on CPU-only torch there is none."""
    try:
        ops = importlib.import_module("spconv.pytorch.ops")
        ops.get_current_stream = lambda: 0
    except Exception:  # noqa: BLE001
        pass


class SparseConv3d(nn.Module):
    """Strided sparse conv for kernel_size == stride (non-overlapping cells, the downsampling case)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2, stride: int = 2, bias: bool = True):
        super().__init__()
        if kernel_size != stride:
            raise ValueError(f"SparseConv3d supports kernel_size == stride only, got {kernel_size} and {stride}")
        self.kernel_size = stride
        self.weight = nn.Parameter(torch.empty(out_channels, stride, stride, stride, in_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight.view(out_channels, -1), a=math.sqrt(5))

    def forward(self, x: SparseTensor) -> SparseTensor:
        s = self.kernel_size
        idx = x.indices.long()
        cell = torch.cat([idx[:, :1], torch.div(idx[:, 1:], s, rounding_mode="floor")], dim=1)
        local = idx[:, 1:] - cell[:, 1:] * s
        out_idx, inverse = torch.unique(cell, dim=0, return_inverse=True)
        w = self.weight.reshape(self.weight.shape[0], -1, self.weight.shape[-1])  # (Cout, s^3, Cin)
        slot = (local[:, 0] * s + local[:, 1]) * s + local[:, 2]
        out = x.features.new_zeros(out_idx.shape[0], w.shape[0])
        for j in range(w.shape[1]):
            rows = (slot == j).nonzero(as_tuple=True)[0]
            if rows.numel():
                out.index_add_(0, inverse[rows], x.features[rows] @ w[:, j].to(x.features.dtype).T)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        shape = [max(1, d // s) for d in x.spatial_shape]
        return SparseTensor(out, out_idx.int(), shape, x.batch_size)
