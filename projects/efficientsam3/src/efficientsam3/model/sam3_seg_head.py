"""SAM3's segmentation head (`detector.segmentation_head.*`), own code in SAM3's key layout, for the frozen
path of the geometry fine-tune: it turns the decoder's queries into 288x288 mask logits.

1. The encoder memory cross-attends to the prompt tokens (pre-LayerNorm, residual).
2. The memory replaces the coarsest FPN level; a pixel decoder walks up the levels
   (nearest upsample + add, conv3x3, GroupNorm(8), ReLU per stage).
3. Masks = <MLP(query), instance_seg_head(pixels)> per pixel; semantic_seg_head gives one semantic map."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SEG_HEAD_PREFIX = "detector.segmentation_head."


class PixelDecoder(nn.Module):
    """`conv_layers.{i}` + `norms.{i}`, one per upsampling stage."""

    def __init__(self, dim: int = 256, stages: int = 3) -> None:
        super().__init__()
        self.conv_layers = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1) for _ in range(stages))
        self.norms = nn.ModuleList(nn.GroupNorm(8, dim) for _ in range(stages))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """feats: finest first, the coarsest last (the encoder memory); -> finest-level pixel embedding."""
        x = feats[-1]
        for i, skip in enumerate(reversed(feats[:-1])):
            x = skip + F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = F.relu(self.norms[i](self.conv_layers[i](x)))
        return x


class MaskEmbed(nn.Module):
    """`layers.{0,1,2}`: Linear-ReLU-Linear-ReLU-Linear."""

    def __init__(self, dim: int = 256) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class MaskPredictor(nn.Module):
    def __init__(self, dim: int = 256) -> None:
        super().__init__()
        self.mask_embed = MaskEmbed(dim)


class SegmentationHead(nn.Module):
    """2,298,881 parameters at d = 256 with 3 stages (the notes' 2.30M)."""

    def __init__(self, dim: int = 256, stages: int = 3, heads: int = 8) -> None:
        super().__init__()
        self.pixel_decoder = PixelDecoder(dim, stages)
        self.mask_predictor = MaskPredictor(dim)
        self.cross_attend_prompt = nn.MultiheadAttention(dim, heads)
        self.cross_attn_norm = nn.LayerNorm(dim)
        self.semantic_seg_head = nn.Conv2d(dim, 1, 1)
        self.instance_seg_head = nn.Conv2d(dim, dim, 1)

    def forward(
        self,
        feats: list[torch.Tensor],
        queries: torch.Tensor,
        memory: torch.Tensor,
        prompt: torch.Tensor,
        prompt_pad: torch.Tensor,
        query_index: torch.Tensor | None = None,
        semantic: bool = True,
    ) -> dict[str, torch.Tensor]:
        """feats: FPN levels finest first (B, d, H_i, W_i), the last one's size is the memory's grid;
        queries (B, Q, d) from the last decoder layer; memory (H*W, B, d) sequence-first; prompt (S, B, d);
        prompt_pad (B, S) True = padding. -> pred_masks (B, Q, H_0, W_0), semantic_seg (B, 1, H_0, W_0).
        query_index (B,): only that query's mask per image, pred_masks (B, 1, H_0, W_0) (a mask depends on
        its own query only, so this equals picking from all Q masks; the FT needs one, not 200).
        semantic=False skips semantic_seg (the FT never reads it).

        The 1x1 instance_seg_head is folded into the query side: <e, W p + b> = <W^T e, p> + <e, b>, so the
        (B, d, H_0, W_0) instance map (a d x d conv at 288x288 and its backward) is never built."""
        q = self.cross_attn_norm(memory)
        memory = (
            memory + self.cross_attend_prompt(q, prompt, prompt, key_padding_mask=prompt_pad, need_weights=False)[0]
        )
        b, d, h, w = feats[-1].shape
        grid = memory[: h * w].permute(1, 2, 0).reshape(b, d, h, w)
        pixels = self.pixel_decoder([*feats[:-1], grid])
        if query_index is not None:
            queries = queries[torch.arange(queries.shape[0], device=queries.device), query_index][:, None]
        emb = self.mask_predictor.mask_embed(queries)  # (B, Q, d)
        conv = self.instance_seg_head
        folded = emb @ conv.weight.view(d, d)  # (B, Q, d): W^T e per query
        offset = emb @ conv.bias.to(emb.dtype)  # (B, Q): <e, b>
        masks = torch.einsum("bqc,bchw->bqhw", folded.to(pixels.dtype), pixels)
        out = {"pred_masks": masks + offset[..., None, None].to(masks.dtype)}
        if semantic:
            out["semantic_seg"] = self.semantic_seg_head(pixels)
        return out
