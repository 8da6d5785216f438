"""SAM3's geometry (box / point prompt) encoder (`detector.geometry_encoder.*`), own code in SAM3's key
layout and as SAM3's builder configures it, for the frozen path of the geometry fine-tune.

Each point = label embedding + Linear(xy) + Linear(feature bilinearly sampled at xy, `grid_sample`)
+ Linear(sine encoding of x, y). Each box = label embedding + Linear(cxcywh) + Conv7x7(7x7 `roi_align`
of the features) + Linear(sine encoding of cx, cy, then h, w). Image features are LayerNorm-ed before
pooling. Valid points, then valid boxes, then a CLS token are packed to the left (right padding),
projected (Linear + LayerNorm), run through 3 pre-norm layers (self-attention over the prompt,
cross-attention to the image tokens with the position encoding on the keys) and a final LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from .sam3_encoder import EncoderLayer
from .sam3_neck import SinePositionEncoding

GEOMETRY_PREFIX = "detector.geometry_encoder."


def pack(seq1: torch.Tensor, pad1: torch.Tensor, seq2: torch.Tensor, pad2: torch.Tensor):
    """Two right-padded batch-first sequences -> one: valid tokens of seq1, then of seq2, then padding.
    seq (B, N, d), pad (B, N) True = padding. Values at padded positions are unspecified."""
    b, n1, d = seq1.shape
    n2 = seq2.shape[1]
    len1, len2 = (~pad1).sum(1), (~pad2).sum(1)
    out = torch.cat([seq1, seq1.new_zeros(b, n2, d)], dim=1)
    index = (torch.arange(n2, device=seq2.device)[None] + len1[:, None])[..., None].expand(-1, -1, d)
    out = out.scatter(1, index, seq2)
    pad = torch.arange(n1 + n2, device=seq1.device)[None] >= (len1 + len2)[:, None]
    return out, pad


class GeometryEncoder(nn.Module):
    """8,215,808 parameters at d = 256, ffn 2048, 3 layers (the notes' 8.22M)."""

    def __init__(self, d_model: int = 256, ffn: int = 2048, heads: int = 8, num_layers: int = 3, roi: int = 7):
        super().__init__()
        self.roi = roi
        self.pos_enc = SinePositionEncoding(d_model)
        self.label_embed = nn.Embedding(2, d_model)
        self.cls_embed = nn.Embedding(1, d_model)
        self.points_direct_project = nn.Linear(2, d_model)
        self.points_pool_project = nn.Linear(d_model, d_model)
        self.points_pos_enc_project = nn.Linear(d_model, d_model)
        self.boxes_direct_project = nn.Linear(4, d_model)
        self.boxes_pool_project = nn.Conv2d(d_model, d_model, roi)
        self.boxes_pos_enc_project = nn.Linear(d_model + 2, d_model)
        self.final_proj = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.img_pre_norm = nn.LayerNorm(d_model)
        self.encode = nn.ModuleList(
            EncoderLayer(d_model, ffn, heads, batch_first=True, pos_at_attn=False, pos_at_cross_keys=True)
            for _ in range(num_layers)
        )
        self.encode_norm = nn.LayerNorm(d_model)

    def _points(self, pts: torch.Tensor, labels: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        b, n, _ = pts.shape
        sampled = F.grid_sample(feat, (pts * 2 - 1)[:, :, None], align_corners=False)  # (B, d, N, 1)
        flat = pts.reshape(-1, 2)
        enc = torch.cat([self.pos_enc.encode(flat[:, 0]), self.pos_enc.encode(flat[:, 1])], -1).view(b, n, -1)
        return (
            self.label_embed(labels)
            + self.points_direct_project(pts)
            + self.points_pool_project(sampled[..., 0].transpose(1, 2))
            + self.points_pos_enc_project(enc.to(pts.dtype))
        )

    def _boxes(self, boxes: torch.Tensor, labels: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        b, n, _ = boxes.shape
        h, w = feat.shape[-2:]
        cx, cy, bw, bh = boxes.unbind(-1)
        xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
        xyxy = xyxy * torch.tensor([w, h, w, h], dtype=xyxy.dtype, device=xyxy.device)
        pooled = roi_align(feat, list(xyxy.float().unbind(0)), self.roi)  # (B*N, d, roi, roi)
        pool = self.boxes_pool_project(pooled.to(feat.dtype)).view(b, n, -1)
        enc = torch.cat(
            [self.pos_enc.encode(cy.reshape(-1)), self.pos_enc.encode(cx.reshape(-1)),
             bh.reshape(-1, 1).float(), bw.reshape(-1, 1).float()], -1
        ).view(b, n, -1)  # fmt: skip
        return (
            self.label_embed(labels)
            + self.boxes_direct_project(boxes)
            + pool
            + self.boxes_pos_enc_project(enc.to(boxes.dtype))
        )

    def forward(
        self,
        points: torch.Tensor,
        point_pad: torch.Tensor,
        boxes: torch.Tensor,
        box_pad: torch.Tensor,
        img: torch.Tensor,
        img_pos: torch.Tensor,
        point_labels: torch.Tensor | None = None,
        box_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """points (B, Np, 2) normalised xy; boxes (B, Nb, 4) normalised cxcywh; pads True = padding (right-
        padded); img / img_pos (B, d, H, W) one FPN level. -> prompt (S, B, d) sequence-first, pad (B, S)."""
        b, d = img.shape[:2]
        tokens = img.flatten(2).transpose(1, 2)  # (B, HW, d)
        pos = img_pos.flatten(2).transpose(1, 2)
        feat = self.img_pre_norm(tokens).transpose(1, 2).reshape(img.shape)
        if point_labels is None:
            point_labels = torch.ones(points.shape[:2], dtype=torch.long, device=points.device)
        if box_labels is None:
            box_labels = torch.ones(boxes.shape[:2], dtype=torch.long, device=boxes.device)
        x, pad = pack(
            self._points(points, point_labels, feat), point_pad, self._boxes(boxes, box_labels, feat), box_pad
        )
        cls = self.cls_embed.weight.view(1, 1, d).expand(b, 1, d)
        x, pad = pack(x, pad, cls, torch.zeros(b, 1, dtype=torch.bool, device=pad.device))
        x = self.norm(self.final_proj(x))
        for layer in self.encode:
            x = layer(x, tokens, x_pad=pad, memory_pos=pos)
        return self.encode_norm(x).transpose(0, 1), pad
