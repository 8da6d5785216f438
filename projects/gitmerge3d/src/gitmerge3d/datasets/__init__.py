"""Data: raw-scene conversion to Pointcept's folder format and model-input preparation."""

from .convert import convert_scene, estimate_normals, read_mmdet3d_bin, read_ply
from .scene import load_scene, prepare_input, tile_scene

__all__ = [
    "convert_scene",
    "estimate_normals",
    "load_scene",
    "prepare_input",
    "read_mmdet3d_bin",
    "read_ply",
    "tile_scene",
]
