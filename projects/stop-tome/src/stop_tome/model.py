"""CLIP4Clip with STOP's prompts: ``CLIP4Clip(cross_config, clip_state_dict, task_config)`` as the guide writes.

Modes (``--temporal_prompt``): ``group2-2`` = STOP (DGL prompts + STOP's prompter), ``DGL`` = the DGL baseline inside
STOP's code, ``none`` = plain CLIP4Clip (every frame an independent image, meanP over frame CLS features).
``clip_state_dict`` fixes the shapes only (as in STOP); ``from_pretrained`` also copies the weights.
Merging is applied when ``task_config.tome_r > 0`` (then also the cross-frame joins, if given).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .clip_model import CLIP, spec_from_state_dict
from .prompts import TemporalPrompt, UnifiedPrompt

MODES = ("group2-2", "DGL", "none")
OUTPUT_TYPES = ("global_prompt0", "average_global_prompt", "average_frame_cls_token")
NEW_MODULE_KEYS = ("prompts.", "prompt_embeddings", "TemporalPrompt", "LoRA")
DEFAULTS: dict[str, Any] = {
    "temporal_prompt": "group2-2",
    "max_frames": 12,
    "shared_latent_space": "transformer",
    "text_prompt_length": 8,
    "local_each_frame_prompt_length": 4,
    "global_visual_prompt_length": 4,
    "visual_output_type": "global_prompt0",
    "sim_header": "meanP",
    "lora": True,
    "freeze_clip": 0,
    "tome_r": 0,
    "tome_trace_source": False,
    "tome_prop_attn": True,
    "tome_cross_layers": "",
    "tome_cross_frames": "",
    "tome_cross_ratio": 0.3,
    "region_pooling": "patch",
}


def _cfg(task_config: Any, name: str) -> Any:
    return getattr(task_config, name, DEFAULTS[name])


def parse_int_list(text: str | list[int] | tuple[int, ...], name: str) -> list[int]:
    """'8-9-10' or '8,9,10' (TempMe / STOP style) -> [8, 9, 10]."""
    if isinstance(text, (list, tuple)):
        return [int(v) for v in text]
    text = str(text).strip()
    if not text:
        return []
    try:
        return [int(v) for v in text.replace(",", "-").split("-") if v]
    except ValueError:
        raise ValueError(f"--{name} must be integers separated by '-' or ',', got {text!r}") from None


class CLIP4Clip(nn.Module):
    def __init__(self, cross_config: Any, clip_state_dict: dict[str, torch.Tensor], task_config: Any) -> None:
        super().__init__()
        self.cross_config = cross_config  # only sim_header=tightTransf needs it; kept for the guide's signature
        self.task_config = task_config
        mode = _cfg(task_config, "temporal_prompt")
        if mode not in MODES:
            raise ValueError(f"--temporal_prompt must be one of {MODES}, got {mode!r}")
        if _cfg(task_config, "sim_header") != "meanP":
            raise ValueError(f"--sim_header: only 'meanP' is implemented, got {_cfg(task_config, 'sim_header')!r}")
        out_type = _cfg(task_config, "visual_output_type")
        if out_type not in OUTPUT_TYPES:
            raise ValueError(f"--visual_output_type must be one of {OUTPUT_TYPES}, got {out_type!r}")
        spec = spec_from_state_dict(clip_state_dict)
        self.mode, self.frames, self.output_type = mode, int(_cfg(task_config, "max_frames")), out_type
        prompted = mode != "none"
        temporal = None
        local = int(_cfg(task_config, "local_each_frame_prompt_length")) if prompted else 0
        if mode == "group2-2":
            temporal = TemporalPrompt(
                spec.vision_width,
                spec.vision_heads,
                spec.grid,
                spec.vision_patch_size,
                local,
                region_pooling=_cfg(task_config, "region_pooling"),
            )
        num_global = int(_cfg(task_config, "global_visual_prompt_length")) if prompted else 0
        if prompted and num_global < 1:
            raise ValueError("--global_visual_prompt_length must be >= 1 with STOP/DGL prompts")
        self.clip = CLIP(
            spec,
            lora=prompted and bool(_cfg(task_config, "lora")),
            num_global=num_global,
            temporal_prompt=temporal,
            num_local=local,
        )
        self.prompts = None
        if prompted:
            self.prompts = UnifiedPrompt(
                _cfg(task_config, "shared_latent_space"),
                spec.vision_width,
                spec.transformer_width,
                spec.vision_layers,
                self.frames,
                int(_cfg(task_config, "text_prompt_length")),
                local,
                spec.vision_patch_size,
            )
        if int(_cfg(task_config, "freeze_clip")):
            self.freeze_clip()
        if temporal is not None:
            # STOP's Cal_Net only feeds a hard top-k mask: it can never receive a gradient (in STOP it is never
            # updated either). Frozen explicitly so DDP does not wait for its gradients.
            temporal.Cal_Net.requires_grad_(False)
        cross_layers = parse_int_list(_cfg(task_config, "tome_cross_layers"), "tome_cross_layers")
        if int(_cfg(task_config, "tome_r")) > 0:
            from .merging import apply_tome_patch

            apply_tome_patch(
                self,
                r=int(_cfg(task_config, "tome_r")),
                trace_source="index" if _cfg(task_config, "tome_trace_source") else False,
                prop_attn=bool(_cfg(task_config, "tome_prop_attn")),
                cross_layers=cross_layers,
                cross_frames=parse_int_list(_cfg(task_config, "tome_cross_frames"), "tome_cross_frames"),
                cross_ratio=float(_cfg(task_config, "tome_cross_ratio")),
            )
            # training and retrieval metrics must see the requested tome_r: merge-core's default "auto" policy
            # would run small GPU eval batches unmerged (stop-tome-benchmark chooses the policy itself)
            self.merge_policy = "force"

    @classmethod
    def from_pretrained(cls, clip_state_dict: dict[str, torch.Tensor], task_config: Any, cross_config: Any = None):
        """Build and copy the CLIP weights (new prompt/adapter modules keep their initialisation)."""
        model = cls(cross_config, clip_state_dict, task_config)
        model.load_clip_weights(clip_state_dict)
        return model

    def load_clip_weights(self, clip_state_dict: dict[str, torch.Tensor], source: str = "clip state dict") -> None:
        own = self.clip.state_dict()
        for key, value in clip_state_dict.items():
            if key not in own:
                raise ValueError(f"{source}: unexpected key {key!r} for this CLIP")
            if own[key].shape != value.shape:
                raise ValueError(
                    f"{source}: {key} has shape {tuple(value.shape)}, model expects {tuple(own[key].shape)}"
                )
        missing = [k for k in own if k not in clip_state_dict and not any(n in k for n in NEW_MODULE_KEYS)]
        if missing:
            raise ValueError(f"{source}: missing CLIP key {missing[0]!r} ({len(missing)} missing)")
        self.clip.load_state_dict(clip_state_dict, strict=False)

    def freeze_clip(self) -> None:
        """STOP's ``--freeze_clip 1``: train only prompts, the prompter and the LoRA adapters."""
        for name, param in self.named_parameters():
            param.requires_grad_(any(n in name for n in NEW_MODULE_KEYS))

    # ---- encoders -------------------------------------------------------------------------------------------
    def encode_prompts(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.prompts is None:
            return None, None
        return self.prompts()

    def get_text_features(self, input_ids: torch.Tensor, text_prompts: torch.Tensor | None = None) -> torch.Tensor:
        """(N, W) ids -> L2-normalised (N, E)."""
        if text_prompts is None and self.prompts is not None:
            text_prompts = self.encode_prompts()[0]
        feats = self.clip.encode_text(input_ids.view(-1, input_ids.shape[-1]), text_prompts).float()
        return F.normalize(feats, dim=-1)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """ln_post then the visual projection (CLIP's image embedding of a token)."""
        return self.clip.visual.ln_post(tokens) @ self.clip.visual.proj

    def visual_tokens(self, video: torch.Tensor, local_prompts: torch.Tensor | None = None, project: bool = True):
        """Run the ViT: returns (tokens (B, L', E) after ln_post @ proj, or (B, L', D) before it, groups)."""
        video = video.reshape(-1, *video.shape[-4:])
        if video.shape[1] != self.frames and self.prompts is not None:
            raise ValueError(
                f"video has {video.shape[1]} frames but the prompts were built for --max_frames {self.frames}"
            )
        if self.prompts is not None and local_prompts is None:
            local_prompts = self.encode_prompts()[1]
        if local_prompts is not None and local_prompts.dim() == 4:
            local_prompts = local_prompts[:, None].expand(-1, video.shape[0], -1, -1, -1)
        x, groups = self.clip.visual(video, local_prompts)
        return (self.project(x) if project else x), groups

    def frame_cls(self, tokens: torch.Tensor, groups: int) -> torch.Tensor:
        """(B, T, E) CLS features in frame order (after a cross-frame join a group starts with its frames' CLS)."""
        g = self.clip.visual.num_global
        b, length, e = tokens.shape
        per_group = self.frames // groups
        return tokens[:, g:].view(b, groups, -1, e)[:, :, :per_group].reshape(b, self.frames, e)

    def get_video_features(
        self, video: torch.Tensor, video_mask: torch.Tensor | None = None, local_prompts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T, 3, H, W) -> L2-normalised (B, E). meanP over frames where there is one vector per frame; STOP's
        ``global_prompt0`` is already one vector per video, so meanP leaves it as it is."""
        tokens, groups = self.visual_tokens(video, local_prompts, project=False)  # project only what is pooled
        if self.mode != "none" and self.output_type == "global_prompt0":
            return F.normalize(self.project(tokens[:, 0]).float(), dim=-1)
        if self.mode != "none" and self.output_type == "average_global_prompt":
            return F.normalize(self.project(tokens[:, : self.clip.visual.num_global]).float().mean(1), dim=-1)
        frames = F.normalize(self.project(self.frame_cls(tokens, groups)).float(), dim=-1)
        if video_mask is None:
            pooled = frames.mean(1)
        else:
            m = video_mask.reshape(frames.shape[0], -1).to(frames.dtype)[..., None]
            pooled = (frames * m).sum(1) / m.sum(1).clamp_min(1.0)
        return F.normalize(pooled, dim=-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        video: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        video_mask: torch.Tensor | None = None,
        gather=None,
    ) -> dict[str, torch.Tensor]:
        """Symmetric InfoNCE over the (all-gathered) batch; ``gather`` all-gathers features with gradients (DDP)."""
        text_prompts, local_prompts = self.encode_prompts()
        t = self.get_text_features(input_ids, text_prompts)
        v = self.get_video_features(video, video_mask, local_prompts)
        if gather is not None:
            t, v = gather(t), gather(v)
        sim = self.clip.logit_scale.exp() * t @ v.t()
        target = torch.arange(sim.shape[0], device=sim.device)
        loss = (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target)) / 2
        return {"loss": loss, "sim": sim.detach(), "text": t.detach(), "video": v.detach()}


def task_config(**overrides: Any) -> SimpleNamespace:
    """A task config with STOP's defaults (for programmatic use and tests)."""
    return SimpleNamespace(**{**DEFAULTS, **overrides})
