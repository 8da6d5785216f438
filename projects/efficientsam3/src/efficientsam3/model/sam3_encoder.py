"""SAM3's transformer encoder (`detector.transformer.encoder.*`), own code in SAM3's key layout, for the
frozen path of the geometry fine-tune: 6 pre-norm layers over the image tokens of one FPN level, each
self-attention (position encoding added to queries and keys), cross-attention to the prompt tokens,
ReLU feed-forward. The layer class is the one SAM3 also uses inside its geometry encoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ENCODER_PREFIX = "detector.transformer.encoder."


class EncoderLayer(nn.Module):
    """`self_attn`, `cross_attn_image`, `linear1/2`, `norm1/2/3` (pre-norm, dropout off in eval).
    Where the position encoding goes is configurable, as in SAM3 (the image encoder: self-attention
    queries/keys; the geometry encoder: cross-attention keys)."""

    def __init__(
        self,
        d_model: int = 256,
        ffn: int = 2048,
        heads: int = 8,
        batch_first: bool = True,
        pos_at_attn: bool = True,
        pos_at_cross_keys: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, heads, batch_first=batch_first)
        self.cross_attn_image = nn.MultiheadAttention(d_model, heads, batch_first=batch_first)
        self.linear1 = nn.Linear(d_model, ffn)
        self.linear2 = nn.Linear(ffn, d_model)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.pos_at_attn, self.pos_at_cross_keys = pos_at_attn, pos_at_cross_keys

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        x_pos: torch.Tensor | None = None,
        x_pad: torch.Tensor | None = None,
        memory_pad: torch.Tensor | None = None,
        memory_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.norm1(x)
        qk = h + x_pos if self.pos_at_attn else h
        x = x + self.self_attn(qk, qk, h, key_padding_mask=x_pad, need_weights=False)[0]
        h = self.norm2(x)
        keys = memory + memory_pos if self.pos_at_cross_keys else memory
        x = x + self.cross_attn_image(h, keys, memory, key_padding_mask=memory_pad, need_weights=False)[0]
        return x + self.linear2(F.relu(self.linear1(self.norm3(x))))


class TransformerEncoder(nn.Module):
    """`layers.{0..5}`; 9,472,512 parameters at d = 256, ffn 2048 (the notes' 9.47M)."""

    def __init__(self, d_model: int = 256, ffn: int = 2048, heads: int = 8, num_layers: int = 6) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d_model, ffn, heads) for _ in range(num_layers))

    def forward(
        self, src: torch.Tensor, pos: torch.Tensor, prompt: torch.Tensor, prompt_pad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """src / pos (B, d, H, W) one FPN level; prompt (S, B, d) sequence-first; prompt_pad (B, S) True = pad.
        -> (memory, pos) sequence-first (H*W, B, d), as SAM3's decoder and segmentation head take them."""
        x = src.flatten(2).transpose(1, 2)
        p = pos.flatten(2).transpose(1, 2)
        mem = prompt.transpose(0, 1)
        for layer in self.layers:
            x = layer(x, mem, x_pos=p, memory_pad=prompt_pad)
        return x.transpose(0, 1), p.transpose(0, 1)
