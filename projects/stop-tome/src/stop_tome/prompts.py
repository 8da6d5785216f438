"""STOP's prompt modules: the DGL-style prompt generator and STOP's pixel / inter-frame prompter (group2-2).

Module and parameter names follow STOP so its checkpoints map one to one; the code is ours.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from .clip_model import LayerNorm, QuickGELU
from .fastconv import PrompterConv3d


class PromptBlock(nn.Module):
    """Plain pre-LN transformer block (STOP's ``PromptResidualAttentionBlock``), batch-first."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(width * 4, width))]
            )
        )
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class PromptTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[PromptBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class UnifiedPrompt(nn.Module):
    """DGL's shared latent space: text prompts (L, S, Dt) and per-frame local visual prompts (L, T, P, Dv).

    ``transformer``: one learned embedding per (prompt, layer) through a 1-layer transformer, text part through an
    MLP. ``linear``: P learned visual prompts per layer, projected to prefix/postfix text prompts; the same P prompts
    serve every frame (STOP's reshape to T frames fails there, its issue #2; we broadcast).
    Prompts do not depend on the input, so they are computed once per forward with batch 1.
    """

    def __init__(
        self,
        kind: str,
        vision_width: int,
        text_width: int,
        layers: int,
        frames: int,
        text_prompts: int = 8,
        local_prompts: int = 4,
        patch_size: int = 32,
    ) -> None:
        super().__init__()
        if kind not in ("transformer", "linear"):
            raise ValueError(f"--shared_latent_space must be 'transformer' or 'linear', got {kind!r}")
        if text_prompts % 2:
            raise ValueError(f"--text_prompt_length must be even (prefix + postfix), got {text_prompts}")
        self.kind, self.width, self.layers, self.frames = kind, vision_width, layers, frames
        self.text_prompts, self.local_prompts = text_prompts, local_prompts
        if kind == "transformer":
            total = text_prompts + local_prompts * frames
            self.unified_prompt_embedding = nn.Embedding(total, vision_width * layers)
            self.PromptTransformer = PromptTransformer(vision_width, 1, max(1, vision_width // 64))
            self.unified_prompt_mlp = nn.Sequential(
                OrderedDict(
                    [
                        ("c_fc", nn.Linear(vision_width, vision_width * 2)),
                        ("gelu", QuickGELU()),
                        ("c_proj", nn.Linear(vision_width * 2, text_width)),
                    ]
                )
            )
        else:
            bound = math.sqrt(6.0 / float(3 * patch_size * patch_size + vision_width))
            self.visual_prompt_embedding = nn.Parameter(
                torch.empty(1, local_prompts, layers * vision_width).uniform_(-bound, bound)
            )
            self.prefix_text_prompt_proj_layer = nn.Linear(vision_width, text_width)
            self.postfix_text_prompt_proj_layer = nn.Linear(vision_width, text_width)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (text prompts (L, S, Dt), local visual prompts (L, T, P, Dv))."""
        L, w = self.layers, self.width
        if self.kind == "transformer":
            emb = self.unified_prompt_embedding.weight.view(-1, L, w).transpose(0, 1)  # (L, S + T*P, w)
            out = self.PromptTransformer(emb)
            text = self.unified_prompt_mlp(out[:, : self.text_prompts])
            visual = out[:, self.text_prompts :].reshape(L, self.frames, self.local_prompts, w)
            return text, visual
        vis = self.visual_prompt_embedding.view(self.local_prompts, L, w).transpose(0, 1)  # (L, P, w)
        text = torch.cat([self.prefix_text_prompt_proj_layer(vis), self.postfix_text_prompt_proj_layer(vis)], 1)
        return text, vis[:, None].expand(L, self.frames, self.local_prompts, w)


def _pad(kernel: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple((k - 1) // 2 for k in kernel)


class TemporalPrompt(nn.Module):
    """STOP's prompter (``--temporal_prompt group2-2``, their ``TemporalPrompt_3``).

    Intra-frame: a Conv3d stack on raw pixels gives a pixel prompt, boosted on the top-``eta`` patches of a temporal
    dynamics map (discriminative regions). Inter-frame: attention over all frames' patch tokens, a Conv3d and an MLP
    over the patch axis give P prompts per frame, weighted by frame variation; they are added to the local prompts.
    STOP hard-codes 224 px, 32-px patches and width 768; here grid, patch size and width come from the model, so
    ViT-B/16 works too. The min-max normalisation of the frame weights gets an epsilon (STOP divides by zero when all
    weights are equal, e.g. a batch of one static frame). Its Conv3d layers are ``PrompterConv3d``: plain
    ``nn.Conv3d`` parameters and keys, with the faster exact GPU paths of ``--prompter_conv`` (``fastconv``).
    """

    def __init__(
        self,
        width: int,
        heads: int,
        grid: int,
        patch_size: int,
        local_prompts: int = 4,
        eta: int = 6,
        region_pooling: str = "patch",
    ):
        super().__init__()
        if region_pooling not in ("patch", "stop"):
            raise ValueError(f"--region_pooling must be 'patch' or 'stop', got {region_pooling!r}")
        k, kc = (3, 11, 11), (5, 11, 11)
        self.grid, self.patch_size, self.eta, self.region_pooling = grid, patch_size, eta, region_pooling
        self.Conv = nn.Sequential(
            PrompterConv3d(3, 9, k, padding=_pad(k)),
            PrompterConv3d(9, 9, k, padding=_pad(k)),
            nn.PReLU(),
            PrompterConv3d(9, 9, k, padding=_pad(k)),
            nn.PReLU(),
            PrompterConv3d(9, 16, k, padding=_pad(k)),
        )
        self.MLP = nn.Sequential(nn.Linear(16, 16), nn.PReLU(), nn.Linear(16, 3))
        self.dropout1 = nn.Dropout()
        self.dropout2 = nn.Dropout()
        self.Cal_Net = PrompterConv3d(3, 1, kc, padding=_pad(kc))
        self.Attention = nn.MultiheadAttention(width, heads, batch_first=True)
        ki = (3, 15, 25)
        self.InterConv = nn.Sequential(
            PrompterConv3d(1, 9, ki, padding=_pad(ki)), nn.PReLU(), PrompterConv3d(9, 1, ki, padding=_pad(ki))
        )
        self.InterMLP = nn.Sequential(nn.Linear(grid * grid, 16), nn.PReLU(), nn.Linear(16, local_prompts))
        self.Cal_Net_Inter = PrompterConv3d(1, 1, kc, padding=_pad(kc))

    def region_mask(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) -> bool (B, T, grid, grid): the top-eta patches of the temporal dynamics map."""
        b, t = video.shape[:2]
        dyn = self.Cal_Net(video.transpose(1, 2))[:, 0]  # (B, T, H, W)
        g, p = self.grid, self.patch_size
        if self.region_pooling == "stop":  # STOP's reshape: averages pixels g apart (a strided pattern, not patches)
            dyn = dyn[..., : g * p, : g * p].reshape(b, t, p, g, p, g).mean(dim=(2, 4))
        else:
            dyn = dyn[..., : g * p, : g * p].reshape(b, t, g, p, g, p).mean(dim=(3, 5))
        kth = dyn.flatten(2).sort(dim=2, descending=True).values[:, :, min(self.eta, g * g - 1)]
        return dyn > kth[:, :, None, None]

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel prompt ``x + 0.05 * prompt + 0.05 * prompt * mask``; returns (prompted video, region mask)."""
        prompt = self.dropout1(self.Conv(video.transpose(1, 2)))  # (B, 16, T, H, W)
        prompt = self.dropout2(self.MLP(prompt.permute(0, 2, 3, 4, 1)))  # (B, T, H, W, 3)
        prompt = self.dropout2(prompt.permute(0, 1, 4, 2, 3))
        mask = self.region_mask(video)
        p = self.patch_size
        if self.region_pooling == "stop":  # STOP tiles the g x g mask over the image (same stride pattern)
            pixel_mask = mask.repeat(1, 1, p, p)[:, :, None].to(video.dtype)
        else:
            pixel_mask = mask.repeat_interleave(p, 2).repeat_interleave(p, 3)[:, :, None].to(video.dtype)
        pixel_mask = nn.functional.pad(
            pixel_mask, (0, video.shape[-1] - pixel_mask.shape[-1], 0, video.shape[-2] - pixel_mask.shape[-2])
        )
        return video + prompt * 0.05 + prompt * pixel_mask * 0.05, mask

    def inter_frame_prompt(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """frames (B, T, 1 + N, D) after ln_pre and the region mask of ``forward`` -> (B, T, P, D) prompts."""
        b, t, _, d = frames.shape
        x = frames[:, :, 1:].reshape(b, -1, d)
        x = self.Attention(x, x, x, need_weights=False)[0].view(b, 1, t, -1, d)  # (B, 1, T, N, D)
        weight = self.Cal_Net_Inter(x)[:, 0]  # (B, T, N, D)
        region = mask.reshape(b, t, -1, 1).to(weight.dtype)
        weight = (weight + weight * region).mean(dim=(2, 3))  # (B, T)
        weight = (weight - weight.min()) / (weight.max() - weight.min()).clamp_min(1e-6)
        x = self.InterConv(x)[:, 0]  # (B, T, N, D)
        x = self.InterMLP(x.transpose(2, 3)).transpose(2, 3)  # (B, T, P, D)
        x = x + x * weight[:, :, None, None]
        return x * 0.05
