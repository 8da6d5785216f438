"""SAM3's transformer decoder (`detector.transformer.decoder.*`), own code in SAM3's key layout and as SAM3's
builder configures it (eval path: no divide-and-conquer duplication), for the frozen path of the FT.

200 learned queries with learned reference boxes and a presence token go through 6 post-norm layers:
self-attention (queries + presence; query position = MLP(sine(reference box))), cross-attention to the
prompt tokens, cross-attention to the image memory with a box-relative position bias (log-scaled x/y
distances of every pixel to the query box edges through two small MLPs, one bias per head), FFN. After
every layer the boxes are refined (sigmoid(delta + logit(box))) and the presence logit is read out."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DECODER_PREFIX = "detector.transformer.decoder."


class MLP(nn.Module):
    """`layers.{i}`: Linear layers with ReLU between (SAM3's MLP without residual / norm)."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


def sine_embed_boxes(boxes: torch.Tensor, d_model: int) -> torch.Tensor:
    """(..., 4) cx, cy, w, h in [0, 1] -> (..., 2 d_model): sine encodings of y, x, w, h (d_model/2 each)."""
    half = d_model // 2
    i = torch.arange(half, dtype=torch.float32, device=boxes.device)
    freq = 10000 ** (2 * torch.div(i, 2, rounding_mode="floor") / half)

    def enc(t: torch.Tensor) -> torch.Tensor:
        a = (t.float() * 2 * math.pi)[..., None] / freq
        out = torch.empty_like(a)
        out[..., 0::2], out[..., 1::2] = a[..., 0::2].sin(), a[..., 1::2].cos()
        return out

    cx, cy, w, h = boxes.unbind(-1)
    return torch.cat([enc(cy), enc(cx), enc(w), enc(h)], -1)


def logit(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int = 256, ffn: int = 2048, heads: int = 8) -> None:
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(d_model, heads)
        self.ca_text = nn.MultiheadAttention(d_model, heads)
        self.self_attn = nn.MultiheadAttention(d_model, heads)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.catext_norm = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn)
        self.linear2 = nn.Linear(ffn, d_model)

    def forward(self, x, qpos, prompt, prompt_pad, memory, memory_pos, bias):
        """x (1 + Q, B, d) with the presence token first; qpos (1 + Q, B, d); bias (B*heads, 1 + Q, HW)."""
        q = x + qpos
        x = self.norm2(x + self.self_attn(q, q, x, need_weights=False)[0])
        ca = self.ca_text(x + qpos, prompt, prompt, key_padding_mask=prompt_pad, need_weights=False)[0]
        x = self.catext_norm(x + ca)
        ca = self.cross_attn(x + qpos, memory + memory_pos, memory, attn_mask=bias, need_weights=False)[0]
        x = self.norm1(x + ca)
        return self.norm3(x + self.linear2(F.relu(self.linear1(x))))


class TransformerDecoder(nn.Module):
    """11,575,093 parameters at d = 256, ffn 2048, 8 heads, 6 layers, 200 queries (the notes' 11.58M)."""

    def __init__(
        self, d_model: int = 256, ffn: int = 2048, heads: int = 8, num_layers: int = 6, num_queries: int = 200
    ) -> None:
        super().__init__()
        self.d_model, self.heads = d_model, heads
        self.layers = nn.ModuleList(DecoderLayer(d_model, ffn, heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.bbox_embed = MLP([d_model, d_model, d_model, 4])
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.reference_points = nn.Embedding(num_queries, 4)
        self.boxRPB_embed_x = MLP([2, d_model, heads])
        self.boxRPB_embed_y = MLP([2, d_model, heads])
        self.presence_token = nn.Embedding(1, d_model)
        self.presence_token_head = MLP([d_model, d_model, d_model, 1])
        self.presence_token_out_norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP([2 * d_model, d_model, d_model])

    def box_bias(self, boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """boxes (Q, B, 4) cxcywh -> (B*heads, 1 + Q, h*w): log-scaled distances of pixel coordinates (i/h, j/w)
        to the box's two y and two x edges, each axis through its MLP, summed; row 0 (the presence token) is
        zero. Written once into its final layout in the MLPs' dtype (the attention's mask dtype under autocast),
        instead of a permuted copy, an upcast and a concatenation per layer."""
        cx, cy, bw, bh = boxes.transpose(0, 1).unbind(-1)  # (B, Q)
        ys = torch.arange(h, dtype=torch.float32, device=boxes.device) / h
        xs = torch.arange(w, dtype=torch.float32, device=boxes.device) / w
        dy = ys[None, None, :, None] - torch.stack([cy - bh / 2, cy + bh / 2], -1)[:, :, None]  # (B, Q, h, 2)
        dx = xs[None, None, :, None] - torch.stack([cx - bw / 2, cx + bw / 2], -1)[:, :, None]

        def log_scale(t: torch.Tensor) -> torch.Tensor:
            t = t * 8
            return torch.sign(t) * torch.log2(t.abs() + 1.0) / 3.0

        by, bx = self.boxRPB_embed_y(log_scale(dy)), self.boxRPB_embed_x(log_scale(dx))  # (B, Q, h|w, heads)
        by, bx = by.permute(0, 3, 1, 2), bx.permute(0, 3, 1, 2).to(by.dtype)  # (B, heads, Q, h|w)
        b, heads, q = by.shape[:3]
        bias = by.new_zeros(b, heads, 1 + q, h, w)
        bias[:, :, 1:] = by[..., None] + bx[:, :, :, None]
        return bias.view(b * heads, 1 + q, h * w)

    def forward(
        self,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        feat_size: tuple[int, int],
        prompt: torch.Tensor,
        prompt_pad: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """memory / memory_pos (HW, B, d) from the encoder; prompt (S, B, d); prompt_pad (B, S) True = pad.
        -> hs (L, B, Q, d) normed per layer, ref_boxes (L, B, Q, 4) cxcywh (each layer's input boxes, as SAM3
        returns them), boxes (B, Q, 4) after the last refinement, presence_logits (L, B) (SAM3's clamp of
        these is a no-op, so they are not clamped here either)."""
        b = memory.shape[1]
        h, w = feat_size
        x = self.query_embed.weight[:, None].expand(-1, b, -1)
        boxes = self.reference_points.weight.sigmoid()[:, None].expand(-1, b, -1)
        presence = self.presence_token.weight[None].expand(1, b, -1)
        hs, ref_boxes, presence_logits = [], [], []
        for layer in self.layers:
            ref_boxes.append(boxes)
            qpos = self.ref_point_head(sine_embed_boxes(boxes, self.d_model).to(x.dtype))
            bias = self.box_bias(boxes, h, w)
            dev = bias.device.type
            if not (dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev)):
                bias = bias.to(x.dtype)  # under autocast the attention casts the mask to its own dtype anyway
            out = layer(
                torch.cat([presence, x]), torch.cat([torch.zeros_like(presence), qpos]),
                prompt, prompt_pad, memory, memory_pos, bias,
            )  # fmt: skip
            presence, x = out[:1], out[1:]
            normed = self.norm(x)
            boxes = (self.bbox_embed(normed) + logit(boxes)).sigmoid().detach()
            hs.append(normed)
            presence_logits.append(self.presence_token_head(self.presence_token_out_norm(presence))[0, :, 0])
        return {
            "hs": torch.stack(hs).transpose(1, 2),
            "ref_boxes": torch.stack(ref_boxes).transpose(1, 2),
            "boxes": boxes.transpose(0, 1),
            "presence_logits": torch.stack(presence_logits),
        }
