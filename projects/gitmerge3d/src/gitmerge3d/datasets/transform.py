"""Pointcept's point-cloud transforms (same names and arguments as the configs use), written for numpy dicts.

A scene is a dict of arrays (``coord`` (N,3) float, ``color`` (N,3) 0..255, ``normal``, ``segment``,
``instance``); point-aligned entries are indexed together when points are dropped, sampled or cropped.
Randomness comes from numpy's global RNG, which ``run_kit.seed_everything`` seeds (and worker init reseeds).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy.interpolate import RegularGridInterpolator
from scipy.ndimage import gaussian_filter

POINT_KEYS = ("coord", "color", "normal", "segment", "instance", "grid_coord", "index")
TRANSFORMS: dict[str, type] = {}
FNV_OFFSET = np.uint64(14695981039346656037)
FNV_PRIME = np.uint64(1099511628211)


def register(cls: type) -> type:
    TRANSFORMS[cls.__name__] = cls
    return cls


def index_points(data: dict, idx: np.ndarray) -> dict:
    """Keep the points ``idx`` in every point-aligned entry."""
    for key in POINT_KEYS:
        if key in data:
            data[key] = data[key][idx]
    return data


def fnv_hash(grid: np.ndarray) -> np.ndarray:
    """64-bit FNV-1 hash of each row of a non-negative int array (multiply, then xor, per column)."""
    arr = grid.astype(np.uint64, copy=False)
    h = np.full(arr.shape[0], FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(arr.shape[1]):
            h = h * FNV_PRIME
            h = np.bitwise_xor(h, arr[:, j])
    return h


def ravel_hash(grid: np.ndarray) -> np.ndarray:
    """Exact row key (mixed radix); Pointcept's ``ravel`` option."""
    arr = grid.astype(np.uint64)
    dims = arr.max(0) + 1
    key = np.zeros(len(arr), dtype=np.uint64)
    for j in range(arr.shape[1] - 1):
        key = (key + arr[:, j]) * dims[j + 1]
    return key + arr[:, -1]


def _rotation(axis: str, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    if axis == "z":
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    raise ValueError(f"RandomRotate axis must be 'x', 'y' or 'z', got {axis!r}")


def _rotate(data: dict, axis: str, angle: float, center) -> dict:
    rot = _rotation(axis, angle).astype(np.float32)
    coord = data["coord"]
    if center is None:
        center = (coord.min(0) + coord.max(0)) / 2
    center = np.asarray(center, dtype=np.float32)
    data["coord"] = ((coord - center) @ rot.T + center).astype(np.float32)
    if "normal" in data:
        data["normal"] = (data["normal"] @ rot.T).astype(np.float32)
    return data


@register
class CenterShift:
    """Move the bbox centre (x, y) to 0, and the floor (min z) to 0 when ``apply_z``."""

    def __init__(self, apply_z: bool = True):
        self.apply_z = apply_z

    def __call__(self, data: dict) -> dict:
        lo, hi = data["coord"].min(0), data["coord"].max(0)
        shift = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2] if self.apply_z else 0.0], np.float32)
        data["coord"] = (data["coord"] - shift).astype(np.float32)
        return data


@register
class RandomDropout:
    def __init__(self, dropout_ratio: float = 0.2, dropout_application_ratio: float = 0.5):
        self.ratio, self.p = dropout_ratio, dropout_application_ratio

    def __call__(self, data: dict) -> dict:
        if np.random.rand() < self.p:
            n = len(data["coord"])
            keep = np.sort(np.random.choice(n, int(n * (1 - self.ratio)), replace=False))
            index_points(data, keep)
        return data


@register
class RandomRotate:
    """Rotate about ``axis`` by uniform(angle) * pi with probability ``p`` (around ``center`` or the bbox centre)."""

    def __init__(self, angle=(-1, 1), axis="z", center=None, always_apply=False, p=0.5):
        self.angle, self.axis, self.center, self.p = angle, axis, center, 1.0 if always_apply else p
        _rotation(axis, 0.0)

    def __call__(self, data: dict) -> dict:
        if np.random.rand() > self.p:
            return data
        return _rotate(data, self.axis, np.random.uniform(*self.angle) * np.pi, self.center)


@register
class RandomRotateTargetAngle:
    """Rotate by one of the listed angles (times pi); the test-time augmentation."""

    def __init__(self, angle=(1 / 2, 1, 3 / 2), axis="z", center=None, always_apply=False, p=0.75):
        self.angle, self.axis, self.center, self.p = list(angle), axis, center, 1.0 if always_apply else p
        _rotation(axis, 0.0)

    def __call__(self, data: dict) -> dict:
        if np.random.rand() > self.p:
            return data
        return _rotate(data, self.axis, float(np.random.choice(self.angle)) * np.pi, self.center)


@register
class RandomScale:
    def __init__(self, scale=(0.95, 1.05), anisotropic: bool = False):
        self.scale, self.anisotropic = scale, anisotropic

    def __call__(self, data: dict) -> dict:
        s = np.random.uniform(self.scale[0], self.scale[1], 3 if self.anisotropic else 1)
        data["coord"] = (data["coord"] * s).astype(np.float32)
        return data


@register
class RandomFlip:
    """Mirror x and (independently) y, each with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, data: dict) -> dict:
        for axis in (0, 1):
            if np.random.rand() < self.p:
                data["coord"][:, axis] = -data["coord"][:, axis]
                if "normal" in data:
                    data["normal"][:, axis] = -data["normal"][:, axis]
        return data


@register
class RandomJitter:
    def __init__(self, sigma: float = 0.01, clip: float = 0.05):
        if clip <= 0:
            raise ValueError(f"RandomJitter clip must be > 0, got {clip}")
        self.sigma, self.clip = sigma, clip

    def __call__(self, data: dict) -> dict:
        noise = np.clip(self.sigma * np.random.randn(*data["coord"].shape), -self.clip, self.clip)
        data["coord"] = (data["coord"] + noise).astype(np.float32)
        return data


@register
class ElasticDistortion:
    """Smooth random displacement fields, one per (granularity m, magnitude) pair, each applied with p 0.95."""

    def __init__(self, distortion_params=((0.2, 0.4), (0.8, 1.6))):
        self.params = [tuple(p) for p in distortion_params]

    @staticmethod
    def _distort(coord: np.ndarray, granularity: float, magnitude: float) -> np.ndarray:
        lo = coord.min(0) - granularity * 3
        shape = ((coord.max(0) - lo) // granularity).astype(int) + 3
        noise = np.random.randn(*shape, 3).astype(np.float32)
        noise = gaussian_filter(noise, sigma=(1, 1, 1, 0), mode="nearest")
        axes = [np.linspace(lo[d], lo[d] + granularity * (shape[d] - 1), shape[d]) for d in range(3)]
        field = RegularGridInterpolator(axes, noise, bounds_error=False, fill_value=0.0)
        return coord + field(coord) * magnitude

    def __call__(self, data: dict) -> dict:
        for granularity, magnitude in self.params:
            if np.random.rand() < 0.95:
                data["coord"] = self._distort(data["coord"], granularity, magnitude).astype(np.float32)
        return data


@register
class ChromaticAutoContrast:
    def __init__(self, p: float = 0.2, blend_factor: float | None = None):
        self.p, self.blend = p, blend_factor

    def __call__(self, data: dict) -> dict:
        if "color" in data and np.random.rand() < self.p:
            color = data["color"].astype(np.float32)
            lo, hi = color.min(0, keepdims=True), color.max(0, keepdims=True)
            contrast = (color - lo) * (255.0 / np.maximum(hi - lo, 1e-6))
            blend = np.random.rand() if self.blend is None else self.blend
            data["color"] = (1 - blend) * color + blend * contrast
        return data


@register
class ChromaticTranslation:
    def __init__(self, p: float = 0.95, ratio: float = 0.05):
        self.p, self.ratio = p, ratio

    def __call__(self, data: dict) -> dict:
        if "color" in data and np.random.rand() < self.p:
            shift = (np.random.rand(1, 3) - 0.5) * 255 * 2 * self.ratio
            data["color"] = np.clip(data["color"].astype(np.float32) + shift, 0, 255)
        return data


@register
class ChromaticJitter:
    def __init__(self, p: float = 0.95, std: float = 0.005):
        self.p, self.std = p, std

    def __call__(self, data: dict) -> dict:
        if "color" in data and np.random.rand() < self.p:
            noise = np.random.randn(*data["color"].shape) * self.std * 255
            data["color"] = np.clip(data["color"].astype(np.float32) + noise, 0, 255)
        return data


@register
class GridSample:
    """Voxelise at ``grid_size``. train: one random point per voxel; test: a list of fragments, the i-th taking
    point ``i % count`` of every voxel, so the fragments together hold every point (``index`` maps back).

    Test fragments also carry ``vote`` (True where ``i < count``): the points seen for the first time, so
    voting only on them counts every point exactly once per augmentation (Pointcept votes on all of them,
    giving points of sparse voxels several votes; ``test_cfg.vote='all'`` keeps that)."""

    def __init__(self, grid_size=0.05, hash_type="fnv", mode="train", return_grid_coord=False, return_inverse=False):
        if mode not in ("train", "test"):
            raise ValueError(f"GridSample mode must be 'train' or 'test', got {mode!r}")
        if hash_type not in ("fnv", "ravel"):
            raise ValueError(f"GridSample hash_type must be 'fnv' or 'ravel', got {hash_type!r}")
        self.grid_size, self.mode = grid_size, mode
        self.hash = fnv_hash if hash_type == "fnv" else ravel_hash
        self.return_grid_coord, self.return_inverse = return_grid_coord, return_inverse

    def __call__(self, data: dict) -> dict | list[dict]:
        grid = np.floor(data["coord"] / self.grid_size).astype(np.int64)
        grid -= grid.min(0)
        key = self.hash(grid)
        order = np.argsort(key, kind="stable")
        _, inverse, count = np.unique(key[order], return_inverse=True, return_counts=True)
        start = np.concatenate([[0], np.cumsum(count)[:-1]])
        if self.mode == "train":
            pick = order[start + np.random.randint(0, count.max(), count.size) % count]
            if self.return_inverse:
                inv = np.zeros_like(inverse)
                inv[order] = inverse
                data["inverse"] = inv
            if self.return_grid_coord:
                data["grid_coord"] = grid
            return index_points(data, pick)
        fragments = []
        for i in range(int(count.max())):
            pick = order[start + i % count]
            part = {k: (v[pick] if k in POINT_KEYS else v) for k, v in data.items()}
            part["index"] = pick
            part["vote"] = i < count
            if self.return_grid_coord:
                part["grid_coord"] = grid[pick]
            fragments.append(part)
        return fragments


@register
class SphereCrop:
    """Keep the ``point_max`` points nearest a centre (random point, or the middle point for 'center')."""

    def __init__(self, point_max: int = 80000, sample_rate: float | None = None, mode: str = "random"):
        if mode not in ("random", "center"):
            raise ValueError(f"SphereCrop mode must be 'random' or 'center' here, got {mode!r}")
        self.point_max, self.sample_rate, self.mode = point_max, sample_rate, mode

    def __call__(self, data: dict) -> dict:
        n = len(data["coord"])
        limit = int(self.sample_rate * n) if self.sample_rate else self.point_max
        if n <= limit:
            return data
        c = data["coord"][np.random.randint(n) if self.mode == "random" else n // 2]
        keep = np.sort(np.argsort(((data["coord"] - c) ** 2).sum(1))[:limit])
        return index_points(data, keep)


@register
class NormalizeColor:
    def __call__(self, data: dict) -> dict:
        if "color" in data:
            data["color"] = (np.asarray(data["color"], dtype=np.float32) / 255.0).astype(np.float32)
        return data


@register
class ToTensor:
    def __call__(self, data: dict) -> dict:
        out = {}
        for k, v in data.items():
            if isinstance(v, np.ndarray):
                t = torch.from_numpy(np.ascontiguousarray(v))
                out[k] = t.float() if t.is_floating_point() else t.long() if k != "grid_coord" else t.int()
            else:
                out[k] = v
        return out


@register
class Collect:
    """Keep ``keys``, add ``offset`` (point count) and ``feat`` = concatenated ``feat_keys``."""

    def __init__(self, keys: Sequence[str], feat_keys: Sequence[str] = ("coord", "color", "normal"), **kwargs):
        self.keys, self.feat_keys = tuple(keys), tuple(feat_keys)

    def __call__(self, data: dict) -> dict:
        missing = [k for k in (*self.keys, *self.feat_keys) if k not in data]
        if missing:
            raise KeyError(f"Collect: the scene has no '{missing[0]}' (has {sorted(data)})")
        out = {k: data[k] for k in self.keys}
        out["offset"] = torch.tensor([len(data["coord"])])
        out["feat"] = torch.cat([torch.as_tensor(data[k]).float() for k in self.feat_keys], dim=1)
        return out


class Compose:
    """Build and chain the transforms of a config list (``[dict(type=..., **kwargs), ...]``)."""

    def __init__(self, cfg: Sequence[Mapping[str, Any]] | None):
        self.transforms: list[Callable] = [build_transform(c) for c in (cfg or [])]

    def __call__(self, data: dict) -> Any:
        for t in self.transforms:
            data = t(data)
        return data


def build_transform(cfg: Mapping[str, Any]) -> Callable:
    kwargs = dict(cfg)
    name = kwargs.pop("type", None)
    if name not in TRANSFORMS:
        raise ValueError(f"transform type {name!r} is not one of {', '.join(sorted(TRANSFORMS))}")
    return TRANSFORMS[name](**kwargs)
