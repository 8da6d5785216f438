"""CLIP in the OpenAI state-dict layout, with STOP's changes as options.

Parameter names equal OpenAI's ``ViT-B-32.pt`` (``visual.conv1.weight``, ``transformer.resblocks.0.attn...``), so
the released weights load without renaming. Computation is batch-first (N, L, D); the state dict is unaffected.
STOP's additions (LoRA bottleneck per block, global visual prompts, deep local prompts, the pixel / inter-frame
prompter) are constructor options; with them off this is plain CLIP as CLIP4Clip uses it.

Visual sequence (one per video): ``[G global prompts, frame 0 tokens, frame 1 tokens, ...]`` where each frame holds
``[CLS, P local prompts, patches]``. STOP stores the same tokens token-major (frame index fastest); the attention
pattern is identical (frame tokens see their own frame plus the global prompts; global prompts see everything), and
``to_stop_order`` converts. Keeping frames contiguous makes a frame a plain view, which per-frame merging needs.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (OpenAI's fp16 handling), cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


@dataclass(frozen=True)
class ClipSpec:
    """Shapes of a CLIP ViT (inferred from a state dict by ``spec_from_state_dict``)."""

    embed_dim: int
    image_resolution: int
    vision_layers: int
    vision_width: int
    vision_patch_size: int
    context_length: int
    vocab_size: int
    transformer_width: int
    transformer_heads: int
    transformer_layers: int

    @property
    def vision_heads(self) -> int:
        return max(1, self.vision_width // 64)

    @property
    def grid(self) -> int:
        return self.image_resolution // self.vision_patch_size


def spec_from_state_dict(sd: dict[str, torch.Tensor]) -> ClipSpec:
    """Read the architecture from an OpenAI CLIP state dict (ViT only), as CLIP's ``build_model`` does."""
    if "visual.proj" not in sd:
        raise ValueError("clip state dict: only ViT CLIP models are supported (no 'visual.proj' key: ResNet CLIP?)")
    width = sd["visual.conv1.weight"].shape[0]
    layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    t_width = sd["ln_final.weight"].shape[0]
    return ClipSpec(
        embed_dim=sd["text_projection"].shape[1],
        image_resolution=patch * grid,
        vision_layers=layers,
        vision_width=width,
        vision_patch_size=patch,
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        transformer_width=t_width,
        transformer_heads=max(1, t_width // 64),
        transformer_layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
    )


class ResidualAttentionBlock(nn.Module):
    """CLIP block; ``lora`` adds STOP's bottleneck adapter: ``x + mlp(ln_2(x)) + 0.1 * LoRA(x)``."""

    def __init__(self, width: int, heads: int, lora: bool = False) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)  # parameters only (OpenAI names); attention is ours
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(width * 4, width))]
            )
        )
        self.ln_2 = LayerNorm(width)
        self.heads = heads
        self.LoRA = nn.Sequential(nn.Linear(width, 32), nn.PReLU(), nn.Linear(32, width)) if lora else None

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, L, D) -> q, k, v as (N, L, heads, head_dim)."""
        n, length, d = x.shape
        qkv = F.linear(x, self.attn.in_proj_weight, self.attn.in_proj_bias)
        q, k, v = qkv.view(n, length, 3, self.heads, d // self.heads).unbind(2)
        return q, k, v

    def out(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.attn.out_proj.weight, self.attn.out_proj.bias)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.mlp(self.ln_2(x))
        if self.LoRA is not None:
            y = y + 0.1 * self.LoRA(x)
        return y

    def forward_text(self, x: torch.Tensor) -> torch.Tensor:
        """Causal self-attention over (N, L, D), as CLIP's text tower."""
        n, length, d = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.qkv(self.ln_1(x)))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(n, length, d))
        return self.feed_forward(x)

    def visual_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        num_global: int,
        groups: int,
        key_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """STOP's attention pattern on ``[globals, group tokens...]``; returns (N, L, D) before out_proj.

        Group (frame) tokens attend to the globals plus their own group; globals attend to all tokens.
        ``key_bias`` (N, L) is added to every key's logit (log size for proportional attention).
        """
        n, length, h, hd = q.shape
        g = num_global
        per = (length - g) // groups
        qf = q[:, g:].reshape(n * groups, per, h, hd).transpose(1, 2)
        kf = k[:, g:].reshape(n, groups, per, h, hd)
        vf = v[:, g:].reshape(n, groups, per, h, hd)
        mask_f = None
        if g:
            kg = k[:, None, :g].expand(n, groups, g, h, hd)
            vg = v[:, None, :g].expand(n, groups, g, h, hd)
            kf, vf = torch.cat([kg, kf], 2), torch.cat([vg, vf], 2)
        kf = kf.reshape(n * groups, g + per, h, hd).transpose(1, 2)
        vf = vf.reshape(n * groups, g + per, h, hd).transpose(1, 2)
        if key_bias is not None:
            bias_f = key_bias[:, g:].reshape(n, groups, per)
            if g:
                bias_f = torch.cat([key_bias[:, None, :g].expand(n, groups, g), bias_f], 2)
            mask_f = bias_f.reshape(n * groups, 1, 1, g + per).to(q.dtype)
        out_f = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask_f)
        out_f = out_f.transpose(1, 2).reshape(n, groups * per, h * hd)
        if not g:
            return out_f
        mask_g = None if key_bias is None else key_bias[:, None, None, :].to(q.dtype)
        out_g = F.scaled_dot_product_attention(
            q[:, :g].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask_g
        )
        return torch.cat([out_g.transpose(1, 2).reshape(n, g, h * hd), out_f], 1)

    def forward_visual(self, x: torch.Tensor, num_global: int, groups: int) -> torch.Tensor:
        q, k, v = self.qkv(self.ln_1(x))
        x = x + self.out(self.visual_attention(q, k, v, num_global, groups))
        return self.feed_forward(x)


class Transformer(nn.Module):
    """Holder of ``resblocks`` (OpenAI's module name)."""

    def __init__(self, width: int, layers: int, heads: int, lora: bool = False) -> None:
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, lora) for _ in range(layers)])


class VisionTransformer(nn.Module):
    """CLIP's ViT run per video. ``num_global`` > 0 adds STOP's global prompts (``prompt_embeddings``)."""

    def __init__(
        self,
        spec: ClipSpec,
        lora: bool = False,
        num_global: int = 0,
        temporal_prompt: nn.Module | None = None,
        num_local: int = 0,
    ):
        super().__init__()
        w, p = spec.vision_width, spec.vision_patch_size
        self.spec = spec
        self.conv1 = nn.Conv2d(3, w, kernel_size=p, stride=p, bias=False)
        scale = w**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(spec.grid**2 + 1, w))
        self.ln_pre = LayerNorm(w)
        self.transformer = Transformer(w, spec.vision_layers, spec.vision_heads, lora)
        self.ln_post = LayerNorm(w)
        self.proj = nn.Parameter(scale * torch.randn(w, spec.embed_dim))
        self.num_global, self.num_local = num_global, num_local
        if num_global:
            bound = math.sqrt(6.0 / float(3 * p * p + w))  # STOP's xavier-style bound for the global prompts
            self.prompt_embeddings = nn.Parameter(torch.empty(1, num_global, w).uniform_(-bound, bound))
        self.TemporalPrompt = temporal_prompt

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) pixels -> (B, T, 1 + patches, D) after ln_pre."""
        b, t = video.shape[:2]
        x = self.conv1(video.flatten(0, 1).to(self.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], 1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x).view(b, t, x.shape[1], x.shape[2])

    @staticmethod
    def set_local_prompts(x: torch.Tensor, prompts: torch.Tensor, num_global: int, groups: int) -> torch.Tensor:
        """Write (B, T, P, D) prompts into slots 1..P of every frame (STOP's deep prompting)."""
        b, length, d = x.shape
        p = prompts.shape[2]
        frames = x[:, num_global:].view(b, groups, -1, d)
        frames = torch.cat([frames[:, :, :1], prompts.to(x.dtype), frames[:, :, 1 + p :]], 2)
        return torch.cat([x[:, :num_global], frames.flatten(1, 2)], 1)

    def groups_after(self, layer: int, groups: int) -> int:
        """Number of token groups after block ``layer`` (frames; the merging patch may join frames)."""
        return groups

    def begin(self, batch: int, frames: int, tokens_per_frame: int, protected: int) -> None:
        """Per-forward hook (the merging patch resets its state here)."""

    def forward(self, video: torch.Tensor, local_prompts: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """video (B, T, 3, H, W); local_prompts (L, B, T, P, D) or None. Returns (tokens (B, L', D), groups).

        Output tokens are before ln_post; with G globals, group tokens follow them.
        """
        b, t = video.shape[:2]
        p = 0 if local_prompts is None else local_prompts.shape[3]
        if p != self.num_local:
            raise ValueError(f"local_prompts: expected {self.num_local} prompts per frame, got {p}")
        if self.TemporalPrompt is not None:
            video, region = self.TemporalPrompt(video)
        frames = self.embed(video)
        if self.TemporalPrompt is not None:
            inter = self.TemporalPrompt.inter_frame_prompt(frames, region)  # (B, T, P, D), same for every layer
            local_prompts = local_prompts + inter[None].to(local_prompts.dtype)
        if p:
            frames = torch.cat([frames[:, :, :1], local_prompts[0].to(frames.dtype), frames[:, :, 1:]], 2)
        x = frames.flatten(1, 2)
        g = self.num_global
        if g:
            x = torch.cat([self.prompt_embeddings.to(x.dtype).expand(b, -1, -1), x], 1)
        groups = t
        self.begin(b, t, frames.shape[2], 1 + p)
        for i, block in enumerate(self.transformer.resblocks):
            if i and p:
                x = self.set_local_prompts(x, local_prompts[i], g, groups)
            x = block.forward_visual(x, g, groups)
            groups = self.groups_after(i, groups)
        return x, groups


def to_stop_order(x: torch.Tensor, num_global: int, frames: int) -> torch.Tensor:
    """Reorder (B, G + T*n, D) from our frame-contiguous layout to STOP's token-major one (frame fastest)."""
    b, length, d = x.shape
    per = (length - num_global) // frames
    body = x[:, num_global:].view(b, frames, per, d).transpose(1, 2).reshape(b, frames * per, d)
    return torch.cat([x[:, :num_global], body], 1)


class CLIP(nn.Module):
    """OpenAI CLIP (ViT) with optional STOP/DGL prompts; text deep prompts are inserted by ``encode_text``."""

    def __init__(
        self,
        spec: ClipSpec,
        lora: bool = False,
        num_global: int = 0,
        temporal_prompt: nn.Module | None = None,
        num_local: int = 0,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.visual = VisionTransformer(spec, lora, num_global, temporal_prompt, num_local)
        self.transformer = Transformer(spec.transformer_width, spec.transformer_layers, spec.transformer_heads, lora)
        self.token_embedding = nn.Embedding(spec.vocab_size, spec.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(spec.context_length, spec.transformer_width))
        self.ln_final = LayerNorm(spec.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(spec.transformer_width, spec.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """OpenAI's initialisation (random-weight models for tests and benchmarks)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for tower in (self.transformer, self.visual.transformer):
            proj_std = tower.width**-0.5 * (2 * tower.layers) ** -0.5
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=tower.width**-0.5)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=(2 * tower.width) ** -0.5)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.transformer.width**-0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_text(self, ids: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """ids (N, W) -> (N, E) at the EOT token. ``prompts`` (L, S, D): STOP's deep text prompts, S/2 after SOT
        and S/2 after the words, replaced before every layer (as STOP's ``forward_deep_text_prompt``)."""
        n, words = ids.shape
        x = self.token_embedding(ids).to(self.dtype) + self.positional_embedding[:words].to(self.dtype)
        eot = ids.argmax(dim=-1)
        half = 0 if prompts is None else prompts.shape[1] // 2
        for i, block in enumerate(self.transformer.resblocks):
            if prompts is not None and i < prompts.shape[0]:
                pr = prompts[i].to(x.dtype).expand(n, -1, -1)
                if i == 0:
                    x = torch.cat([x[:, :1], pr[:, :half], x[:, 1:], pr[:, half:]], 1)
                else:
                    x = torch.cat([x[:, :1], pr[:, :half], x[:, 1 + half : half + words], pr[:, half:]], 1)
            x = block.forward_text(x)
        x = self.ln_final(x)
        return x[torch.arange(n, device=x.device), eot + half] @ self.text_projection

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain CLIP on images (N, 3, H, W): logits per image and per text (kept for TorchScript export)."""
        x, _ = self.visual(image[:, None])
        img = self.visual.ln_post(x[:, 0]) @ self.visual.proj
        txt = self.encode_text(text)
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        logits = self.logit_scale.exp() * img @ txt.t()
        return logits, logits.t()
