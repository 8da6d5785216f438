"""Raw scene (.ply mesh/cloud, mmdetection3d float32 .bin) -> Pointcept scene folder.

Output ``<out>/<name>/``: ``coord.npy`` float32 (N,3), ``color.npy`` uint8 (N,3), ``normal.npy``
float32 (N,3) and, when labels are given, ``segment20.npy``/``segment200.npy``/``segment.npy`` and
``instance.npy`` int64 (-1 = ignore), the names Pointcept's ScanNet/S3DIS datasets read.

Normals come from the file when present (ply ``nx, ny, nz``); otherwise they are estimated (PCA of
the 16 nearest neighbours, oriented towards the scene centre, i.e. into the room) or zero
(``normals="zero"``). Sonata was trained with mesh vertex normals, so estimated normals are an
approximation: say which one was used when reporting accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# ScanNet's 20 benchmark classes as nyu40 ids (index = segment20 label)
SCANNET20_NYU40 = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
LABEL_MAPS = ("scannet20", "s3dis", "raw")
NORMAL_MODES = ("file", "estimate", "zero")


def read_mmdet3d_bin(path: str | Path, dims: int = 6) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 (N, dims) points: xyz, then rgb 0..255 when dims >= 6."""
    raw = np.fromfile(path, dtype=np.float32)
    if raw.size == 0 or raw.size % dims:
        raise ValueError(f"{path}: {raw.size} float32 values do not form rows of --bin-dims={dims}")
    pts = raw.reshape(-1, dims)
    color = np.clip(pts[:, 3:6], 0, 255).round().astype(np.uint8) if dims >= 6 else None
    return pts[:, :3].astype(np.float32), color


def read_ply(path: str | Path) -> dict[str, np.ndarray]:
    """Vertex coord (and color, normal, label when the ply has red/green/blue, nx/ny/nz, label).

    plyfile is imported here, not at the top, so converting .bin scenes needs no plyfile (GPU hosts without it)."""
    from plyfile import PlyData

    vertex = PlyData.read(str(path))["vertex"]
    names = vertex.data.dtype.names
    if not {"x", "y", "z"}.issubset(names):
        raise ValueError(f"{path}: ply vertices need x, y, z properties, got {names}")
    out = {"coord": np.stack([vertex[a] for a in "xyz"], 1).astype(np.float32)}
    if {"red", "green", "blue"}.issubset(names):
        out["color"] = np.stack([vertex[a] for a in ("red", "green", "blue")], 1).astype(np.uint8)
    if {"nx", "ny", "nz"}.issubset(names):
        out["normal"] = np.stack([vertex[a] for a in ("nx", "ny", "nz")], 1).astype(np.float32)
    if "label" in names:
        out["label"] = np.asarray(vertex["label"]).astype(np.int64)
    return out


def knn(coord: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Indices (N, k) of each point's k nearest points (itself included), by chunked brute force."""
    out = []
    for s in range(0, len(coord), chunk):
        d = torch.cdist(coord[s : s + chunk], coord)
        out.append(d.topk(k, dim=1, largest=False).indices)
    return torch.cat(out)


def estimate_normals(coord: np.ndarray, k: int = 16, device: str | None = None) -> np.ndarray:
    """Unit normals from the smallest-eigenvalue direction of each point's k-neighbour covariance.

    Oriented towards the scene centre (into the room). Runs on CUDA when available (torch, no scipy).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pts = torch.from_numpy(np.ascontiguousarray(coord, dtype=np.float32)).to(device)
    idx = knn(pts, min(k, len(pts)))
    nbr = pts[idx] - pts[idx].mean(1, keepdim=True)
    cov = (nbr.transpose(1, 2) @ nbr).double()
    normal = torch.linalg.eigh(cov).eigenvectors[:, :, 0].float()
    inward = pts.mean(0) - pts
    normal = torch.where(((normal * inward).sum(1) < 0)[:, None], -normal, normal)
    return normal.cpu().numpy()


def map_labels(labels: np.ndarray, label_map: str) -> np.ndarray:
    """Raw labels -> training labels, -1 = ignore (scannet20: nyu40 ids -> 0..19)."""
    if label_map not in LABEL_MAPS:
        raise ValueError(f"--label-map must be one of {LABEL_MAPS}, got {label_map!r}")
    if label_map == "scannet20":
        lut = np.full(max(256, int(labels.max()) + 1), -1, dtype=np.int64)
        lut[list(SCANNET20_NYU40)] = np.arange(len(SCANNET20_NYU40))
        return lut[labels]
    return labels.astype(np.int64)


def convert_scene(
    source: str | Path,
    out_dir: str | Path,
    name: str | None = None,
    semantic_mask: str | Path | None = None,
    instance_mask: str | Path | None = None,
    label_map: str = "scannet20",
    normals: str = "estimate",
    bin_dims: int = 6,
) -> Path:
    """Write one Pointcept scene folder; returns its path."""
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"input scene '{source}' not found")
    if normals not in NORMAL_MODES:
        raise ValueError(f"--normals must be one of {NORMAL_MODES}, got {normals!r}")
    suffix = source.suffix.lower()
    labels = None
    if suffix == ".ply":
        data = read_ply(source)
        coord, color, normal = data["coord"], data.get("color"), data.get("normal")
        labels = data.get("label")
    elif suffix == ".bin":
        coord, color = read_mmdet3d_bin(source, bin_dims)
        normal = None
    else:
        raise ValueError(f"input scene must be a .ply or an mmdetection3d .bin file, got '{source.name}'")
    n = len(coord)
    if color is None:
        color = np.zeros((n, 3), dtype=np.uint8)
    if normals == "zero" or (normals == "file" and normal is None):
        if normals == "file":
            raise ValueError(f"--normals file: '{source.name}' has no nx/ny/nz")
        normal = np.zeros((n, 3), dtype=np.float32)
    elif normals == "estimate" or normal is None:
        normal = estimate_normals(coord)
    scene = Path(out_dir) / (name or source.stem)
    scene.mkdir(parents=True, exist_ok=True)
    np.save(scene / "coord.npy", coord.astype(np.float32))
    np.save(scene / "color.npy", color.astype(np.uint8))
    np.save(scene / "normal.npy", normal.astype(np.float32))
    if semantic_mask is not None:
        labels = np.fromfile(semantic_mask, dtype=np.int64)
    if labels is not None:
        if len(labels) != n:
            raise ValueError(f"semantic mask has {len(labels)} labels for {n} points")
        mapped = map_labels(labels, label_map)
        np.save(scene / ("segment20.npy" if label_map == "scannet20" else "segment.npy"), mapped)
    if instance_mask is not None:
        inst = np.fromfile(instance_mask, dtype=np.int64)
        if len(inst) != n:
            raise ValueError(f"instance mask has {len(inst)} ids for {n} points")
        np.save(scene / "instance.npy", np.where(inst > 0, inst, -1).astype(np.int64))
    return scene
