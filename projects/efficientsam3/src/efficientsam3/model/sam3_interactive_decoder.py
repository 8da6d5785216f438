"""SAM3's interactive (SAM2-style) mask decoder, `tracker.sam_mask_decoder.*` in `sam3.pt`, own code in that
key layout, configured as SAM3's tracker builds it: two-way transformer (depth 2, 8 heads, MLP 2048,
cross-attention at half width), object-score token with a 3-layer MLP head, sigmoid IoU head, high-res
skip projections `conv_s0` / `conv_s1` (applied once per image, see `InteractiveHeads.features`), and
the dynamic single-mask rule: with multimask_output=False the single-mask token's output is kept only
when its stability (IoU of the logits thresholded at +-0.05) is >= 0.98, else the multimask output with
the highest predicted IoU is used."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .sam3_interactive_prompt import LayerNorm2d


class MLP(nn.Module):
    """`layers.{i}` linear layers with ReLU between them (SAM's MLP)."""

    def __init__(self, d_in: int, hidden: int, d_out: int, depth: int, sigmoid: bool = False) -> None:
        super().__init__()
        dims = [d_in] + [hidden] * (depth - 1) + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.sigmoid = sigmoid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x.sigmoid() if self.sigmoid else x


class Attention(nn.Module):
    """Multi-head attention whose q/k/v live in width d / downsample (keys q_proj, k_proj, v_proj, out_proj)."""

    def __init__(self, dim: int, heads: int, downsample: int = 1) -> None:
        super().__init__()
        inner = dim // downsample
        if inner % heads:
            raise ValueError(f"heads: {heads} does not divide the attention width {inner}")
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        def split(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj(q)), split(self.k_proj(k)), split(self.v_proj(v)))
        return self.out_proj(out.transpose(1, 2).flatten(2))


class TwoWayBlock(nn.Module):
    """Token self-attention, token->image attention, token MLP, image->token attention; post-norm each."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, downsample: int, first: bool) -> None:
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, heads, downsample)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Module()
        self.mlp.lin1, self.mlp.lin2 = nn.Linear(dim, mlp_dim), nn.Linear(mlp_dim, dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, heads, downsample)
        self.first = first  # the first block's self-attention sees no position code and has no residual

    def forward(self, tok: torch.Tensor, img: torch.Tensor, tok_pe: torch.Tensor, img_pe: torch.Tensor):
        if self.first:
            tok = self.self_attn(tok, tok, tok)
        else:
            q = tok + tok_pe
            tok = tok + self.self_attn(q, q, tok)
        tok = self.norm1(tok)
        tok = self.norm2(tok + self.cross_attn_token_to_image(tok + tok_pe, img + img_pe, img))
        tok = self.norm3(tok + self.mlp.lin2(F.relu(self.mlp.lin1(tok))))
        img = self.norm4(img + self.cross_attn_image_to_token(img + img_pe, tok + tok_pe, tok))
        return tok, img


class TwoWayTransformer(nn.Module):
    def __init__(self, dim: int = 256, heads: int = 8, mlp_dim: int = 2048, depth: int = 2, downsample: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(TwoWayBlock(dim, heads, mlp_dim, downsample, i == 0) for i in range(depth))
        self.final_attn_token_to_image = Attention(dim, heads, downsample)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, img: torch.Tensor, img_pe: torch.Tensor, tokens: torch.Tensor):
        """img, img_pe (B, C, H, W); tokens (B, T, C) (also their own position code) -> tokens, img (B, HW, C)."""
        img, img_pe = img.flatten(2).transpose(1, 2), img_pe.flatten(2).transpose(1, 2)
        tok = tokens
        for layer in self.layers:
            tok, img = layer(tok, img, tokens, img_pe)
        tok = self.norm_final_attn(tok + self.final_attn_token_to_image(tok + tokens, img + img_pe, img))
        return tok, img


class MaskDecoder(nn.Module):
    """4,215,109 parameters (131 keys) at SAM3's size (d 256); mask token 0 = single mask, 1-3 = multimask."""

    def __init__(
        self,
        dim: int = 256,
        heads: int = 8,
        mlp_dim: int = 2048,
        iou_hidden: int = 256,
        stability_delta: float = 0.05,
        stability_thresh: float = 0.98,
        dynamic_multimask: bool = True,
    ) -> None:
        super().__init__()
        self.transformer = TwoWayTransformer(dim, heads, mlp_dim)
        self.num_mask_tokens = 4
        self.obj_score_token = nn.Embedding(1, dim)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, 2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, 2, stride=2),
            nn.GELU(),
        )
        self.conv_s0 = nn.Conv2d(dim, dim // 8, 1)
        self.conv_s1 = nn.Conv2d(dim, dim // 4, 1)
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(dim, iou_hidden, self.num_mask_tokens, 3, sigmoid=True)
        self.pred_obj_score_head = MLP(dim, dim, 1, 3)
        self.stability_delta, self.stability_thresh = stability_delta, stability_thresh
        self.dynamic_multimask = dynamic_multimask

    def predict_all(
        self,
        image_embed: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        high_res: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All 4 masks (N, 4, 4S, 4S), their IoU scores (N, 4) and the object-score logit (N, 1).
        image_embed / high_res may have batch 1 (one image, N prompts) or N."""
        n = sparse.shape[0]
        out_tokens = torch.cat([self.obj_score_token.weight, self.iou_token.weight, self.mask_tokens.weight])
        tokens = torch.cat([out_tokens[None].expand(n, -1, -1).to(sparse.dtype), sparse], dim=1)
        src = image_embed.expand(n, -1, -1, -1) + dense
        pos = image_pe.expand(n, -1, -1, -1)
        b, c, h, w = src.shape
        hs, img = self.transformer(src, pos, tokens)
        img = img.transpose(1, 2).reshape(b, c, h, w)
        dc1, ln1, act1, dc2, act2 = self.output_upscaling
        feat_s0, feat_s1 = high_res
        up = act1(ln1(dc1(img) + feat_s1))
        up = act2(dc2(up) + feat_s0)
        mask_tok = hs[:, 2 : 2 + self.num_mask_tokens]
        hyper = torch.stack([mlp(mask_tok[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        masks = (hyper @ up.flatten(2)).unflatten(-1, up.shape[-2:])
        return masks, self.iou_prediction_head(hs[:, 1]), self.pred_obj_score_head(hs[:, 0])

    def stability(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, H, W) -> (N,): |logits > delta| / |logits > -delta| (1 where the latter is empty)."""
        inner = (logits > self.stability_delta).flatten(1).sum(-1).float()
        outer = (logits > -self.stability_delta).flatten(1).sum(-1).float()
        return torch.where(outer > 0, inner / outer.clamp(min=1), torch.ones_like(outer))

    def select(self, masks: torch.Tensor, iou: torch.Tensor, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Multimask: tokens 1-3. Single: token 0, or (dynamic rule) the best of 1-3 when token 0 is unstable."""
        if multimask:
            return masks[:, 1:], iou[:, 1:]
        if not self.dynamic_multimask:
            return masks[:, :1], iou[:, :1]
        best = iou[:, 1:].argmax(-1) + 1
        rows = torch.arange(masks.shape[0], device=masks.device)
        stable = self.stability(masks[:, 0]) >= self.stability_thresh
        pick = torch.where(stable, torch.zeros_like(best), best)
        return masks[rows, pick][:, None], iou[rows, pick][:, None]

    def forward(self, image_embed, image_pe, sparse, dense, high_res, multimask: bool = False):
        """-> low-res mask logits (N, 1 or 3, 4S, 4S), predicted IoU (N, 1 or 3)."""
        masks, iou, _ = self.predict_all(image_embed, image_pe, sparse, dense, high_res)
        return self.select(masks, iou, multimask)
