"""SAM3's interactive (SAM2-style) prompt encoder, `tracker.sam_prompt_encoder.*` in `sam3.pt`, own code in
that key layout. It embeds clicks and box corners (random-Fourier position code + a learned type
embedding) and an optional low-res mask; the mask decoder gets its dense position code from here too.

Label convention (SAM2's): -1 padding ("not a point"), 0 negative click, 1 positive click, 2 box top-left,
3 box bottom-right. SAM3's image predictor always passes boxes as two labelled points and no `boxes`
argument, so one padding point is appended after them; `embed_points(..., pad=True)` does the same."""

from __future__ import annotations

import math

import torch
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of (B, C, H, W), eps 1e-6 (SAM's `LayerNorm2d`, keys weight/bias)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(1, keepdim=True)
        var = (x - mu).square().mean(1, keepdim=True)
        return (x - mu) * torch.rsqrt(var + self.eps) * self.weight[:, None, None] + self.bias[:, None, None]


class RandomFourierPE(nn.Module):
    """Position code of xy in [0, 1]: map to [-1, 1], project with a fixed Gaussian (2, F) matrix, and take
    [sin, cos] of 2 pi times that (2F channels). The matrix is a checkpoint buffer, so it must be loaded."""

    def __init__(self, num_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_feats))

    def encode(self, xy01: torch.Tensor) -> torch.Tensor:
        proj = (2 * xy01 - 1) @ self.positional_encoding_gaussian_matrix
        proj = 2 * math.pi * proj
        return torch.cat([proj.sin(), proj.cos()], dim=-1)

    def grid(self, h: int, w: int) -> torch.Tensor:
        """(2F, h, w) code of the cell centres ((i + 0.5) / n per axis, x first)."""
        dev = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / w
        xy = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)
        return self.encode(xy).permute(2, 0, 1)

    def pixels(self, xy: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
        """(..., 2) xy in input-image pixels -> (..., 2F)."""
        scale = torch.tensor([1.0 / size_hw[1], 1.0 / size_hw[0]], device=xy.device)
        return self.encode(xy.float() * scale)


class PromptEncoder(nn.Module):
    """6,220 parameters at SAM3's size (d 256, mask_in_chans 16) + the 2x128 Gaussian buffer (17 keys)."""

    def __init__(self, embed_dim: int = 256, embedding_size: int = 72, image_size: int = 1008, mask_in_chans: int = 16):
        super().__init__()
        self.embed_dim = embed_dim
        self.embedding_size = (embedding_size, embedding_size)
        self.image_size = (image_size, image_size)
        self.pe_layer = RandomFourierPE(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        c = mask_in_chans
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, c // 4, 2, stride=2),
            LayerNorm2d(c // 4),
            nn.GELU(),
            nn.Conv2d(c // 4, c, 2, stride=2),
            LayerNorm2d(c),
            nn.GELU(),
            nn.Conv2d(c, embed_dim, 1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def dense_pe(self) -> torch.Tensor:
        """(1, d, S, S) position code of the image-embedding grid (the mask decoder's `image_pe`)."""
        return self.pe_layer.grid(*self.embedding_size)[None]

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool = True) -> torch.Tensor:
        """coords (N, P, 2) in input pixels (e.g. 0..1008), labels (N, P) in {-1, 0, 1, 2, 3} -> (N, P[+1], d).
        Coordinates refer to pixel centres (+0.5). `pad` appends one label -1 point."""
        coords = coords.float() + 0.5
        if pad:
            coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        emb = self.pe_layer.pixels(coords, self.image_size)
        labels = labels[..., None]
        emb = torch.where(labels == -1, torch.zeros_like(emb) + self.not_a_point_embed.weight, emb)
        for k, table in enumerate(self.point_embeddings):
            emb = torch.where(labels == k, emb + table.weight, emb)
        return emb

    def embed_dense(self, n: int, masks: torch.Tensor | None = None) -> torch.Tensor:
        """(N, d, S, S): the downscaled mask input (N, 1, 4S, 4S) or the learned no-mask vector."""
        if masks is not None:
            return self.mask_downscaling(masks)
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, *self.embedding_size)
