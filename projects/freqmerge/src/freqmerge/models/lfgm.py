"""LFGM, the Lightweight Frequency Guidance Module: a parameter-free high-frequency score per spatial token.

The guide's seven steps, for spatial tokens T (B, Ns, D) laid out on an H x W grid:

1. reshape T -> (B, D, H, W);  2. channel mean -> (B, H, W);  3. ``rfft2(norm="ortho")``;
4. zero the low-frequency disc of radius ``radius`` centred on DC (frequencies wrap around, so the
   disc covers the four corners of the full spectrum; on the half spectrum of ``rfft2`` it is
   ``ky**2 + kx**2 <= radius**2`` with signed integer ``ky``);  5. ``irfft2`` back to H x W;
6. square;  7. min-max normalise per image: (phi - min) / (max - min + eps).

The channel mean is linear, so it commutes with any gather of tokens: ``lfgm_from_channel_mean``
takes the already-averaged (B, H*W) map, which is how the merge step computes it cheaply on the
grid at later layers (see ``freq_merge.py``). FFTs run in float32 (cuFFT half precision only takes
power-of-two sizes, and 14 is not one).

Borders. The FFT treats the grid as periodic, so with ``border="wrap"`` (the guide's formula, the default)
a difference between opposite image borders is a jump like any edge, and smooth border patches score high.
``border="reflect"`` first extends the map by mirror images (half-sample symmetric, to 2H x 2W), which has no
jump at the borders, filters that with the same cut-off frequency (the disc is measured in cycles per H and
W patches, so its radius doubles on the doubled grid) and crops back to H x W: the DCT-II view of the image.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

EPS = 1e-6
BORDERS = ("wrap", "reflect")


@functools.lru_cache(maxsize=64)
def _highpass_mask(h: int, w: int, radius: float, device: str, scale: int) -> torch.Tensor:
    ky = torch.fft.fftfreq(h, d=1.0 / h) / scale  # signed frequencies in cycles per h/scale patches
    kx = torch.fft.rfftfreq(w, d=1.0 / w) / scale
    dist2 = ky[:, None] ** 2 + kx[None, :] ** 2
    return (dist2 > float(radius) ** 2).to(torch.float32).to(device)


def highpass_mask(h: int, w: int, radius: float, device: torch.device | str = "cpu", scale: int = 1) -> torch.Tensor:
    """(h, w // 2 + 1) mask for an ``rfft2`` spectrum: 0 inside the disc of ``radius`` around DC, else 1.

    ``scale`` > 1: the spectrum is of a grid extended ``scale`` times, and ``radius`` is in the units of the
    original grid. Cached per (size, radius, device, scale), so the merge step does no host-to-device copy.
    """
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    return _highpass_mask(int(h), int(w), float(radius), str(torch.device(device)), int(scale))


def _check_border(border: str) -> None:
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")


def _mirror(f: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B, 2H, 2W) half-sample symmetric extension: periodic with no jump at any border."""
    f = torch.cat([f, f.flip(-2)], dim=-2)
    return torch.cat([f, f.flip(-1)], dim=-1)


def lfgm_from_channel_mean(
    mean_map: torch.Tensor, grid: tuple[int, int], radius: float = 2.0, border: str = "wrap"
) -> torch.Tensor:
    """Steps 3-7 on a channel-mean map (B, H*W) or (B, H, W); returns phi in [0, 1] shaped (B, H*W)."""
    h, w = grid
    _check_border(border)
    if mean_map.shape[-1] != h * w and tuple(mean_map.shape[-2:]) != (h, w):
        raise ValueError(f"mean_map must have H*W={h * w} values per image, got shape {tuple(mean_map.shape)}")
    f = mean_map.reshape(-1, h, w).float()
    scale = 2 if border == "reflect" else 1
    if scale > 1:
        f = _mirror(f)
    spec = torch.fft.rfft2(f, norm="ortho")
    spec = spec * highpass_mask(h * scale, w * scale, radius, f.device, scale)
    hp = torch.fft.irfft2(spec, s=(h * scale, w * scale), norm="ortho")[:, :h, :w]
    energy = hp.square().flatten(1)
    lo, hi = torch.aminmax(energy, dim=1, keepdim=True)
    return (energy - lo) / (hi - lo + EPS)


def lfgm_scores(tokens: torch.Tensor, grid: tuple[int, int], radius: float = 2.0, border: str = "wrap") -> torch.Tensor:
    """Steps 1-7 on spatial tokens (B, H*W, D) in row-major grid order; returns (B, H*W) in [0, 1]."""
    if tokens.dim() != 3 or tokens.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"tokens must be (B, H*W, D) with H*W={grid[0] * grid[1]}, got shape {tuple(tokens.shape)}")
    return lfgm_from_channel_mean(tokens.float().mean(dim=-1), grid, radius, border)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Raw pixel tokens (B, H/p * W/p, C*p*p) from images (B, C, H, W), row-major like a ViT patch embed."""
    b, c, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of patch_size={patch_size}")
    x = images.reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch_size) * (w // patch_size), c * patch_size**2)


def lfgm_from_pixels(
    images: torch.Tensor, grid: tuple[int, int] = (14, 14), radius: float = 2.0, border: str = "wrap"
) -> torch.Tensor:
    """LFGM of raw pixel patches: images (B, C, H, W) cut into a ``grid`` of patches; returns (B, gh, gw)."""
    patch = images.shape[-1] // grid[1]
    if images.shape[-2] != patch * grid[0] or images.shape[-1] != patch * grid[1]:
        raise ValueError(f"images {tuple(images.shape[-2:])} do not split into a {grid} grid of square patches")
    return lfgm_scores(patchify(images, patch), grid, radius, border).reshape(-1, *grid)


class LFGM(nn.Module):
    """Module form of ``lfgm_scores`` (no parameters, no buffers): forward(tokens (B, H*W, D)) -> (B, H*W)."""

    def __init__(self, grid: tuple[int, int] = (14, 14), radius: float = 2.0, border: str = "wrap") -> None:
        super().__init__()
        if radius < 0:
            raise ValueError(f"radius must be >= 0, got {radius}")
        _check_border(border)
        self.grid = (int(grid[0]), int(grid[1]))
        self.radius = float(radius)
        self.border = border

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return lfgm_scores(tokens, self.grid, self.radius, self.border)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, radius={self.radius}, border={self.border!r}"
