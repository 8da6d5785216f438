"""SAM3's interactive single-image predictor (`predict_inst`: SAM2-style heads on the `sam2_convs` neck),
own code in SAM3's key layout, for box/point prompts on SAM3 itself or on a student trunk.

Path (as `Sam3Processor.set_image` + `SAM3InteractiveImagePredictor.predict` in sam3 0.1.4):
image -> square resize to 1008, (x/255 - 0.5)/0.5 -> trunk (SAM3 ViT, or a student) (B, 1024, 72, 72) ->
`sam2_convs` (a second SimpleFPN; scalp=1 keeps 288/144/72) -> `conv_s0`/`conv_s1` on 288/144, 72x72 level +
`no_mem_embed` -> prompt encoder (box = two corner points labelled 2/3, + a padding point) -> mask decoder
(single mask with the stability fallback when multimask_output=False) -> low-res 288x288 logits -> holes
of <= 256 low-res pixels filled (the predictor's max_hole_area) -> bilinear to the original size -> > 0.

Checkpoint keys used: `detector.backbone.vision_backbone.{trunk,sam2_convs}.*`, `tracker.sam_prompt_encoder.*`,
`tracker.sam_mask_decoder.*`, `tracker.no_mem_embed`; a converted stage-1 / geometry-FT checkpoint holds the
student under `detector.backbone.vision_backbone.trunk.model.*`."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from run_kit import CheckpointError, load_state_dict_checked

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .sam3_interactive_decoder import MaskDecoder
from .sam3_interactive_prompt import PromptEncoder
from .sam3_neck import SimpleFPN, load_part, read_sam3_state
from .sam3_vit import SAM3_VIT, TINY_VIT, SAM3ViT, ViTConfig
from .students import STUDENTS, build_student

TRUNK_PREFIX = "detector.backbone.vision_backbone.trunk."
STUDENT_PREFIX = TRUNK_PREFIX + "model."
HEAD_PREFIXES = {
    "sam2_convs": "detector.backbone.vision_backbone.sam2_convs.",
    "sam_prompt_encoder": "tracker.sam_prompt_encoder.",
    "sam_mask_decoder": "tracker.sam_mask_decoder.",
}
NO_MEM_KEY = "tracker.no_mem_embed"
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class InteractiveDims:
    """SAM3's tracker heads (`_build_sam_heads`): d 256, 8 heads, MLP 2048, IoU head 256, mask_in_chans 16."""

    embed_dim: int = 1024  # trunk channels
    d_model: int = 256
    heads: int = 8
    mlp_dim: int = 2048
    iou_hidden: int = 256
    mask_in_chans: int = 16
    image_size: int = 1008
    stride: int = 14

    @property
    def grid(self) -> int:
        return self.image_size // self.stride


SAM3_INTERACTIVE = InteractiveDims()
TINY_INTERACTIVE = InteractiveDims(32, 16, 2, 32, 16, 4, 112, 14)  # the stand-in: same code, matches TINY_VIT


class InteractiveHeads(nn.Module):
    """Everything after the trunk: `sam2_convs` (22 keys), `no_mem_embed`, prompt encoder, mask decoder."""

    def __init__(self, dims: InteractiveDims = SAM3_INTERACTIVE) -> None:
        super().__init__()
        self.dims = dims
        self.sam2_convs = SimpleFPN(dims.embed_dim, dims.d_model).convs
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, dims.d_model))
        nn.init.trunc_normal_(self.no_mem_embed, std=0.02)
        self.sam_prompt_encoder = PromptEncoder(dims.d_model, dims.grid, dims.image_size, dims.mask_in_chans)
        self.sam_mask_decoder = MaskDecoder(dims.d_model, dims.heads, dims.mlp_dim, dims.iou_hidden)

    def features(self, embed: torch.Tensor) -> dict[str, torch.Tensor]:
        """Trunk embedding (B, C, S, S) -> image_embed (B, d, S, S) and the projected skips at 4S / 2S.
        The 0.5x level is not computed (SAM3's scalp=1 drops it)."""
        s0, s1, s2 = (conv(embed) for conv in self.sam2_convs[:3])
        dec = self.sam_mask_decoder
        return {
            "image_embed": s2 + self.no_mem_embed.reshape(1, -1, 1, 1),
            "high_res": (dec.conv_s0(s0), dec.conv_s1(s1)),
        }

    def decode(
        self,
        feats: dict[str, torch.Tensor],
        coords: torch.Tensor,
        labels: torch.Tensor,
        multimask: bool = False,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's features, N prompts: coords (N, P, 2) in input pixels, labels (N, P) ->
        low-res logits (N, k, 4S, 4S) and predicted IoU (N, k), k = 3 if multimask else 1."""
        pe = self.sam_prompt_encoder
        sparse = pe.embed_points(coords, labels, pad=True)
        dense = pe.embed_dense(coords.shape[0], mask_input)
        return self.sam_mask_decoder(feats["image_embed"], pe.dense_pe(), sparse, dense, feats["high_res"], multimask)


def preprocess_image(image: torch.Tensor, size: int, mode: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 (H, W, 3) on any device -> (1, 3, size, size) float and the valid (h, w) inside it.
    sam3: square resize, (x/255 - 0.5)/0.5 (SAM3's processor); letterbox: long side to size, ImageNet
    mean/std, zero pad bottom/right (stage 1's DATA.PREPROCESS letterbox)."""
    h, w = image.shape[:2]
    x = image.permute(2, 0, 1)[None].float()
    if mode == "sam3":
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return (x / 255.0 - 0.5) / 0.5, (size, size)
    if mode != "letterbox":
        raise ValueError(f"--preprocess: expected sam3 or letterbox, got {mode!r}")
    scale = size / max(h, w)
    nh, nw = min(size, int(h * scale + 0.5)), min(size, int(w * scale + 0.5))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return F.pad((x - mean) / std, (0, size - nw, 0, size - nh)), (nh, nw)


def fill_holes(logits: torch.Tensor, max_area: float, threshold: float = 0.0) -> torch.Tensor:
    """Background components (logit <= threshold, 8-connected) of at most `max_area` pixels are set to
    threshold + 10, as SAM3's predictor does on the low-res masks (max_hole_area 256)."""
    if max_area <= 0:
        return logits
    bg = (logits <= threshold).flatten(0, -3).cpu().numpy()
    holes = np.zeros_like(bg)
    for i, m in enumerate(bg):
        lab, n = ndimage.label(m, structure=EIGHT_CONNECTED)
        if n:
            small = np.bincount(lab.ravel()) <= max_area
            small[0] = False
            holes[i] = small[lab]
    holes_t = torch.from_numpy(holes).reshape(logits.shape).to(logits.device)
    return torch.where(holes_t, torch.full_like(logits, threshold + 10.0), logits)


class InteractivePredictor(nn.Module):
    """`set_image` once, then `predict` / `predict_boxes` any number of prompts (the evaluator's interface)."""

    def __init__(
        self,
        trunk: nn.Module,
        heads: InteractiveHeads,
        preprocess: str = "sam3",
        mask_threshold: float = 0.0,
        max_hole_area: float = 256.0,
        amp_dtype: torch.dtype | None = None,
        chunk: int = 64,
    ) -> None:
        super().__init__()
        if preprocess not in ("sam3", "letterbox"):
            raise ValueError(f"--preprocess: expected sam3 or letterbox, got {preprocess!r}")
        self.trunk, self.heads = trunk, heads
        self.size = heads.dims.image_size
        self.preprocess, self.mask_threshold, self.max_hole_area = preprocess, mask_threshold, max_hole_area
        self.amp_dtype, self.chunk = amp_dtype, chunk
        self._feats: dict | None = None

    @property
    def device(self) -> torch.device:
        return next(self.heads.parameters()).device

    def _autocast(self):
        amp = self.amp_dtype
        return torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None)

    @torch.no_grad()
    def set_image(self, image: np.ndarray) -> None:
        """RGB uint8 (H, W, 3): run the trunk and the neck once."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image: expected (H, W, 3) RGB, got {tuple(image.shape)}")
        self.orig_hw = image.shape[:2]
        x = torch.tensor(image, dtype=torch.uint8, device=self.device)  # a copy: PIL arrays are read-only
        x, self.valid_hw = preprocess_image(x, self.size, self.preprocess)
        with self._autocast():
            self._feats = self.heads.features(self.trunk(x))

    def to_input(self, xy: torch.Tensor) -> torch.Tensor:
        """(..., 2) original-image pixels -> input pixels of the resized (and padded) image."""
        (h, w), (vh, vw) = self.orig_hw, self.valid_hw
        return xy * torch.tensor([vw / w, vh / h], device=xy.device, dtype=torch.float32)

    def postprocess(self, low_res: torch.Tensor) -> torch.Tensor:
        """Low-res logits (N, k, 4S, 4S) -> logits at the original size (holes filled first)."""
        low_res = fill_holes(low_res.float(), self.max_hole_area, self.mask_threshold)
        if self.preprocess == "letterbox":
            low_res = F.interpolate(low_res, (self.size, self.size), mode="bilinear", align_corners=False)
            low_res = low_res[..., : self.valid_hw[0], : self.valid_hw[1]]
        return F.interpolate(low_res, self.orig_hw, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def predict(
        self,
        boxes: np.ndarray | None = None,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """N prompts in original pixels: boxes (N, 4) xyxy and/or points (N, P, 2) with labels (N, P) (1 fg,
        0 bg); a box goes first as two corner points. -> masks (N, k, H, W) bool, IoU (N, k), low-res logits."""
        if self._feats is None:
            raise RuntimeError("predict: call set_image first")
        parts_xy, parts_lab = [], []
        if boxes is not None:
            b = torch.as_tensor(np.asarray(boxes, dtype=np.float32), device=self.device).reshape(-1, 2, 2)
            parts_xy.append(b)
            parts_lab.append(torch.tensor([2, 3], device=self.device).expand(b.shape[0], 2))
        if points is not None:
            if labels is None:
                raise ValueError("labels: required with points")
            p = torch.as_tensor(np.asarray(points, dtype=np.float32), device=self.device)
            parts_xy.append(p.reshape(p.shape[0], -1, 2))
            parts_lab.append(torch.as_tensor(np.asarray(labels), device=self.device).reshape(p.shape[0], -1))
        if not parts_xy:
            raise ValueError("predict: expected boxes and/or points")
        coords, labs = self.to_input(torch.cat(parts_xy, 1)), torch.cat(parts_lab, 1).long()
        masks, ious, lows = [], [], []
        for i in range(0, coords.shape[0], self.chunk):
            sl = slice(i, i + self.chunk)
            with self._autocast():
                low, iou = self.heads.decode(self._feats, coords[sl], labs[sl], multimask)
            logits = self.postprocess(low)
            masks.append(logits > self.mask_threshold)
            ious.append(iou.float())
            lows.append(low.float().clamp(-32.0, 32.0))
        return torch.cat(masks), torch.cat(ious), torch.cat(lows)

    def predict_boxes(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """(N, 4) boxes -> (N, H, W) bool, one single-mask prediction per box (multimask_output=False)."""
        if len(boxes_xyxy) == 0:
            return np.zeros((0, *self.orig_hw), dtype=bool)
        return self.predict(boxes=boxes_xyxy)[0][:, 0].cpu().numpy()


# ---- building and loading -------------------------------------------------------------------------


def load_heads(heads: InteractiveHeads, sd: dict, source: str) -> None:
    """The heads' tensors of a SAM3 (or converted) state dict, strict per part, one-line errors."""
    for name, prefix in HEAD_PREFIXES.items():
        load_part(heads.get_submodule(name), sd, prefix, source)
    if NO_MEM_KEY not in sd:
        raise CheckpointError(f"{source} has no {NO_MEM_KEY} (not a SAM3 checkpoint with the tracker?)")
    if tuple(sd[NO_MEM_KEY].shape) != tuple(heads.no_mem_embed.shape):
        raise CheckpointError(f"{source}: shape mismatch for {NO_MEM_KEY}: {tuple(sd[NO_MEM_KEY].shape)}")
    with torch.no_grad():
        heads.no_mem_embed.copy_(sd[NO_MEM_KEY])


def load_vit_trunk(trunk: SAM3ViT, sd: dict, source: str) -> None:
    """`detector.backbone.vision_backbone.trunk.*` (the 420 keys; `freqs_cis` may be absent: recomputed)."""
    part = {k[len(TRUNK_PREFIX) :]: v for k, v in sd.items() if k.startswith(TRUNK_PREFIX)}
    if not part:
        raise CheckpointError(f"{source} has no {TRUNK_PREFIX}* keys (not a SAM3 checkpoint?)")
    if any(k.startswith("model.") for k in part):
        raise CheckpointError(f"{source} holds a student trunk ({STUDENT_PREFIX}*); use --predictor student")
    res = load_state_dict_checked(trunk, part, f"{source} [{TRUNK_PREFIX}]", strict=False)
    missing = [k for k in res.missing_keys if not k.endswith("freqs_cis")]
    if missing or res.unexpected_keys:
        bad = (missing or res.unexpected_keys)[0]
        raise CheckpointError(f"{source}: {'missing' if missing else 'unexpected'} trunk key {bad}")


def infer_backbone(student_sd: dict, source: str) -> str:
    """The one student whose keys and shapes the state dict has (head.0 gives the channel count)."""
    w = student_sd.get("head.0.weight")
    if w is None:
        raise CheckpointError(f"{source}: no head.0.weight in the student (not a stage-1 student?)")
    embed_dim = int(w.shape[0])
    for name, spec in STUDENTS.items():
        if spec.channels != int(w.shape[1]):
            continue
        with torch.device("meta"):
            ref = build_student(name, embed_dim).state_dict()
        if ref.keys() == student_sd.keys() and all(ref[k].shape == student_sd[k].shape for k in ref):
            return name
    raise CheckpointError(f"{source}: the student matches none of the 9 backbones; pass --backbone")


def _strip(key: str) -> str:
    """Training-checkpoint prefixes (DDP `module.`, the FT's `student_trunk.`) -> the student's own keys."""
    for prefix in ("module.", "student_trunk."):
        key = key.removeprefix(prefix)
    return key


def _read(path: str, flag: str) -> dict:
    """A whole checkpoint dict, memory-mapped (a converted checkpoint is ~1.7 GB); one-line errors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: file not found: {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001  (pickle/zip errors have many types)
        raise CheckpointError(f"{flag}: {path} is not a torch checkpoint ({type(e).__name__})") from None
    if not isinstance(ck, dict):
        raise CheckpointError(f"{flag}: {path} holds a {type(ck).__name__}, expected a dict")
    return ck


def _amp(dtype: str) -> torch.dtype | None:
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"--dtype: expected fp32, bf16 or fp16, got {dtype!r}")
    return table[dtype]


def build_predictor(
    kind: str,
    checkpoint: str = "",
    sam3_checkpoint: str = "",
    backbone: str | None = None,
    tiny: bool = False,
    random_weights: bool = False,
    device: str = "cpu",
    dtype: str = "fp32",
    preprocess: str = "sam3",
    max_hole_area: float = 256.0,
) -> InteractivePredictor:
    """sam3: SAM3 ViT + heads from --sam3-checkpoint. student / finetuned: a converted checkpoint
    (student under trunk.model.*, heads inside) or a stage-1 / geometry-FT training checkpoint +
    --sam3-checkpoint for the heads. `random_weights`: no files (throughput runs). `tiny`: the stand-in sizes."""
    dims = TINY_INTERACTIVE if tiny else SAM3_INTERACTIVE
    amp = _amp(dtype)
    heads_sd, trunk = None, None
    if kind == "sam3":
        vit: ViTConfig = TINY_VIT if tiny else SAM3_VIT
        with torch.device(device):
            trunk = SAM3ViT(vit)
        if not random_weights:
            if not sam3_checkpoint:
                raise ValueError("--sam3-checkpoint: required for --predictor sam3")
            heads_sd = read_sam3_state(sam3_checkpoint, "--sam3-checkpoint")
            load_vit_trunk(trunk, heads_sd, f"--sam3-checkpoint: {sam3_checkpoint}")
    elif kind in ("student", "finetuned"):
        trunk, heads_sd = _student_trunk(checkpoint, sam3_checkpoint, backbone, dims, random_weights, device)
    else:
        raise ValueError(f"--predictor: expected sam3, student or finetuned, got {kind!r}")
    with torch.device(device):
        heads = InteractiveHeads(dims)
    if heads_sd is not None:
        load_heads(heads, heads_sd, "--sam3-checkpoint" if kind == "sam3" else "--checkpoint/--sam3-checkpoint")
    pred = InteractivePredictor(trunk, heads, preprocess, max_hole_area=max_hole_area, amp_dtype=amp)
    return pred.to(device).eval().requires_grad_(False)


def _student_trunk(
    checkpoint: str, sam3_checkpoint: str, backbone: str | None, dims: InteractiveDims, random_weights: bool, device
) -> tuple[nn.Module, dict | None]:
    if random_weights:
        with torch.device(device):
            default = "efficientvit_b0" if dims == TINY_INTERACTIVE else "repvit_m1_1"  # ES-EV-S / ES-RV-M
            return build_student(backbone or default, dims.embed_dim, dims.grid), None
    if not checkpoint:
        raise ValueError("--checkpoint: required for --predictor student / finetuned")
    ck = _read(checkpoint, "--checkpoint")
    sd = ck["model"] if isinstance(ck.get("model"), dict) else ck
    if any(k.startswith(STUDENT_PREFIX) for k in sd):  # converted: the heads are in the same file
        student_sd = {k[len(STUDENT_PREFIX) :]: v for k, v in sd.items() if k.startswith(STUDENT_PREFIX)}
        heads_sd = sd
    else:  # stage-1 ckpt_epoch_N.pth / geometry-FT checkpoint / bare student: heads from sam3.pt
        if not sam3_checkpoint:
            raise ValueError(f"--sam3-checkpoint: required for the heads ({checkpoint} holds only a student)")
        student_sd = {_strip(k): v for k, v in sd.items()}
        heads_sd = read_sam3_state(sam3_checkpoint, "--sam3-checkpoint")
    cfg = ck.get("config")
    cfg_backbone = cfg.get("MODEL", {}).get("BACKBONE") if isinstance(cfg, dict) else None
    name = backbone or cfg_backbone or infer_backbone(student_sd, checkpoint)
    embed_dim = int(student_sd["head.0.weight"].shape[0]) if "head.0.weight" in student_sd else dims.embed_dim
    if embed_dim != dims.embed_dim:
        raise CheckpointError(f"--checkpoint: student embeds {embed_dim} channels, the heads expect {dims.embed_dim}")
    with torch.device(device):
        student = build_student(name, embed_dim, dims.grid)
    load_state_dict_checked(student, student_sd, f"--checkpoint: {checkpoint}")
    return student, heads_sd
