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

POINT_KEYS = ("coord", "color", "normal", "segment", "instance", "grid_coord", "index", "vote")
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


def gaussian_smooth(arr: np.ndarray, axes: Sequence[int], sigma: float = 1.0, truncate: float = 4.0) -> np.ndarray:
    """Separable Gaussian filter with edge ('nearest') padding over ``axes``: scipy.ndimage.gaussian_filter's
    result (radius ``int(truncate * sigma + 0.5)``), in numpy so the pipeline needs no scipy."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (x / sigma) ** 2)
    weights /= weights.sum()
    out = arr.astype(np.float64)
    for axis in axes:
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        size = out.shape[axis]
        acc = np.zeros_like(out)
        for j, w in enumerate(weights):
            acc += w * np.take(padded, np.arange(j, j + size), axis=axis)
        out = acc
    return out.astype(arr.dtype)


def trilinear(field: np.ndarray, lo: np.ndarray, step: float, coord: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``field`` (X, Y, Z, C) sampled at ``lo + step * ijk``; 0 outside the grid
    (scipy's RegularGridInterpolator(bounds_error=False, fill_value=0) on the same grid)."""
    shape = np.array(field.shape[:3])
    pos = (coord - lo) / step
    inside = np.all((pos >= 0) & (pos <= shape - 1), axis=1)
    i0 = np.clip(np.floor(pos).astype(np.int64), 0, shape - 2)
    t = pos - i0
    out = np.zeros((len(coord), field.shape[3]), dtype=np.float64)
    for corner in range(8):
        bits = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        w = np.prod(np.where(bits, t, 1 - t), axis=1)
        idx = i0 + bits
        out += w[:, None] * field[idx[:, 0], idx[:, 1], idx[:, 2]]
    out[~inside] = 0.0
    return out


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
        noise = gaussian_smooth(noise, axes=(0, 1, 2))
        return coord + trilinear(noise, lo, granularity, coord) * magnitude

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
    """Keep the ``point_max`` (or ``sample_rate * N``) points nearest a centre: a random point ('random'), the
    middle point ('center'), or, with ``mode='all'``, a list of such crops that together cover every point
    (Pointcept's test-time crop of large fragments).

    'all' (Pointcept's rule): every point gets a tiny random score; the next centre is the lowest-scored point,
    and each crop raises its points' scores by ``(1 - d2 / max d2)^2``, so centres spread out; crops stop when
    every point is in one. Each crop keeps ``index`` (into the scene, when the input has it). A ``vote`` mask
    (GridSample test mode) is split so each point votes in one crop only: the crop whose centre is nearest."""

    MODES = ("random", "center", "all")

    def __init__(self, point_max: int = 80000, sample_rate: float | None = None, mode: str = "random"):
        if mode not in self.MODES:
            raise ValueError(f"SphereCrop mode must be one of {self.MODES}, got {mode!r}")
        if sample_rate is None and (not isinstance(point_max, int) or point_max < 1):
            raise ValueError(f"SphereCrop point_max must be a positive int, got {point_max!r}")
        if sample_rate is not None and not 0 < sample_rate <= 1:
            raise ValueError(f"SphereCrop sample_rate must be in (0, 1], got {sample_rate!r}")
        self.point_max, self.sample_rate, self.mode = point_max, sample_rate, mode

    def __call__(self, data: dict) -> dict | list[dict]:
        n = len(data["coord"])
        limit = max(1, int(self.sample_rate * n)) if self.sample_rate else self.point_max
        if self.mode == "all":
            return self._crop_all(data, limit)
        if n <= limit:
            return data
        c = data["coord"][np.random.randint(n) if self.mode == "random" else n // 2]
        keep = np.sort(np.argsort(((data["coord"] - c) ** 2).sum(1))[:limit])
        return index_points(data, keep)

    @staticmethod
    def _crop_all(data: dict, limit: int) -> list[dict]:
        coord = data["coord"]
        n = len(coord)
        if "index" not in data:
            data = {**data, "index": np.arange(n)}
        if n <= limit:
            return [dict(data)]
        score = np.random.rand(n) * 1e-3
        covered = np.zeros(n, dtype=bool)
        best = np.full(n, np.inf)
        owner = np.full(n, -1)
        picks: list[np.ndarray] = []
        while not covered.all():
            d2 = ((coord - coord[np.argmin(score)]) ** 2).sum(1)
            pick = np.sort(np.argsort(d2, kind="stable")[:limit])
            w = d2[pick]
            score[pick] += np.square(1 - w / w.max()) if w.max() > 0 else 1.0
            covered[pick] = True
            nearer = w < best[pick]
            best[pick[nearer]], owner[pick[nearer]] = w[nearer], len(picks)
            picks.append(pick)
        parts = []
        for k, pick in enumerate(picks):
            part = index_points(dict(data), pick)
            if "vote" in data:
                part["vote"] = data["vote"][pick] & (owner[pick] == k)
            parts.append(part)
        return parts


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
    """Keep ``keys``; add the point counts named by ``offset_keys_dict`` (default ``offset`` = len(coord)) and,
    for each ``<name>_keys=(...)`` argument, ``<name>`` = those entries concatenated (``feat_keys`` -> ``feat``)."""

    def __init__(
        self,
        keys: str | Sequence[str],
        offset_keys_dict: Mapping[str, str] | None = None,
        feat_keys: Sequence[str] = ("coord", "color", "normal"),
        **concat_keys: Sequence[str],
    ):
        bad = [k for k in concat_keys if not k.endswith("_keys")]
        if bad:
            raise ValueError(f"Collect argument {bad[0]!r} is not supported (expected keys, offset_keys_dict, *_keys)")
        self.keys = (keys,) if isinstance(keys, str) else tuple(keys)
        self.offset_keys = dict(offset_keys_dict) if offset_keys_dict is not None else {"offset": "coord"}
        self.concat = {"feat": tuple(feat_keys), **{k[: -len("_keys")]: tuple(v) for k, v in concat_keys.items()}}

    def __call__(self, data: dict) -> dict:
        needed = [*self.keys, *self.offset_keys.values(), *(k for ks in self.concat.values() for k in ks)]
        missing = [k for k in needed if k not in data]
        if missing:
            raise KeyError(f"Collect: the scene has no '{missing[0]}' (has {sorted(data)})")
        out = {k: data[k] for k in self.keys}
        for name, key in self.offset_keys.items():
            out[name] = torch.tensor([len(data[key])])
        for name, keys in self.concat.items():
            out[name] = torch.cat([torch.as_tensor(data[k]).float() for k in keys], dim=1)
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
    if not isinstance(cfg, Mapping):
        raise ValueError(f"a transform must be a dict with a 'type', got {cfg!r}")
    kwargs = dict(cfg)
    name = kwargs.pop("type", None)
    if name not in TRANSFORMS:
        raise ValueError(f"transform type {name!r} is not one of {', '.join(sorted(TRANSFORMS))}")
    return TRANSFORMS[name](**kwargs)
