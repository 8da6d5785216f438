"""Geometry-FT configuration: the stage-1 yacs tree plus the FT keys, with the FT recipe as defaults
(research notes 1.4): 30 epochs, 2 warm-up, AdamW lr 5e-5 not scaled by batch, min 1e-6, cosine, wd 0.01,
clip 1.0, batch 4 per GPU x 8 accumulation, fp16 AMP, a checkpoint every epoch. Unknown keys in a YAML
file or in --opts are one-line errors (stage-1's loader)."""

from __future__ import annotations

from collections.abc import Sequence

from yacs.config import CfgNode as CN

from ..config import ConfigError, default_config, load_config


def ft_defaults() -> CN:
    c = default_config()
    c.MODEL.NAME = "EfficientSAM3-GeometryFinetune"
    # Local sam3.pt for the frozen FPN / geometry encoder / transformer / segmentation head.
    c.MODEL.SAM3_CHECKPOINT = "sam3_checkpoints/sam3.pt"
    # FPN level fed to the encoder and geometry pooling: 72 (what SAM3 inference uses, our default) or
    # 36 (the reference FT's last level, which inference never runs; kept as the faithful option).
    c.MODEL.FEATURE_SIZE = 72
    # "sam3": SAM3's sizes (load MODEL.SAM3_CHECKPOINT); "tiny": the same modules at test size (stand-in).
    c.MODEL.SAM3_TYPE = "sam3"
    # Autocast dtype of the frozen SAM3 path under AMP: "" = AMP_DTYPE; bf16 keeps fp32's range there.
    c.MODEL.SAM3_DTYPE = ""
    # torch.compile the frozen path (static shapes, prompts padded to DISTILL.MAX_PROMPTS): "auto" = on CUDA
    # only (--compile / --no-compile set "on" / "off"); the compile costs ~1-2 min once per process.
    # "reduce-overhead": the same compile with CUDA graphs (the batch is fixed, drop_last), for a launch-bound
    # frozen path at small batch; on the CPU it is "on".
    c.MODEL.COMPILE_FROZEN = "auto"  # CUDA graphs (reduce-overhead) on CUDA, eager on CPU; see engine.geometry
    c.DATA.BATCH_SIZE = 4
    c.DATA.BOX_JITTER = True
    c.DATA.SORT_BY_AREA = True
    c.DISTILL.EMBEDDING_LOSS_WEIGHT = 0.0015
    c.DISTILL.MASK_BCE_WEIGHT = 1.0
    c.DISTILL.MASK_DICE_WEIGHT = 1.0
    c.DISTILL.TEMPERATURE = 1.0
    c.DISTILL.MAX_PROMPTS = 16
    c.DISTILL.USE_BOX_PROMPTS = True
    c.DISTILL.USE_POINT_PROMPTS = True
    c.DISTILL.SELECT_BEST_MASK = True
    # FIXED_PROMPTS: each image keeps the same prompts every epoch (seeded by the image only); then
    # CACHE_TEACHER keeps the teacher's best query and its mask per image in memory (per rank), so the
    # frozen path runs once per step for the student only once an image has been seen.
    c.DISTILL.FIXED_PROMPTS = False
    c.DISTILL.CACHE_TEACHER = False
    # > 0: keep up to this many GB of the cache's masks in one preallocated GPU tensor (a hit is one gather on
    # the GPU, no host copy; 0.17 MB per image at 288x288 fp16), the rest on the CPU. 0: all on the CPU.
    c.DISTILL.CACHE_TEACHER_DEVICE_GB = 0.0
    # EdgeSAM style: one prompt, 50/50 box or point, DECODE_ITERS with refinement points: after each
    # iteration REFINE_POINTS points per image from teacher/student disagreement (masks binarised at logit
    # TEACHER_MASK_THRESHOLD); box-only images only get them with ITER_ON_BOX (as in the reference).
    c.DISTILL.PROMPT_MIX = False
    c.DISTILL.DECODE_ITERS = 1
    c.DISTILL.ITER_ON_BOX = False
    c.DISTILL.REFINE_POINTS = 1
    c.DISTILL.TEACHER_MASK_THRESHOLD = 0.0
    c.TRAIN.EPOCHS = 30
    c.TRAIN.WARMUP_EPOCHS = 2
    c.TRAIN.BASE_LR = 5e-5
    c.TRAIN.WARMUP_LR = 1e-7
    c.TRAIN.MIN_LR = 1e-6
    c.TRAIN.WEIGHT_DECAY = 0.01
    c.TRAIN.CLIP_GRAD = 1.0
    c.TRAIN.ACCUMULATION_STEPS = 8
    c.TRAIN.SCALE_LR = False
    c.AMP_ENABLE = True
    c.AMP_DTYPE = "fp16"
    c.SAVE_FREQ = 1
    c.OUTPUT = "output_geometry_finetune"
    return c


FT_CHOICES = {
    "MODEL.FEATURE_SIZE": (72, 36),
    "MODEL.SAM3_TYPE": ("sam3", "tiny"),
    "MODEL.SAM3_DTYPE": ("", "fp16", "bf16"),
    "MODEL.COMPILE_FROZEN": ("auto", "on", "off", "reduce-overhead"),
}


def load_ft_config(cfg_file: str | None = None, opts: Sequence[str] = (), overrides: dict | None = None) -> CN:
    """FT defaults <- cfg_file <- --opts <- CLI overrides, validated."""
    cfg = load_config(cfg_file, opts, overrides, defaults=ft_defaults(), choices=FT_CHOICES)
    d = cfg.DISTILL
    if d.MAX_PROMPTS < 1 or d.DECODE_ITERS < 1:
        raise ConfigError(f"DISTILL.MAX_PROMPTS / DECODE_ITERS: expected >= 1, got {d.MAX_PROMPTS} / {d.DECODE_ITERS}")
    if d.REFINE_POINTS < 1:
        raise ConfigError(f"DISTILL.REFINE_POINTS: expected >= 1, got {d.REFINE_POINTS}")
    if not (d.USE_BOX_PROMPTS or d.USE_POINT_PROMPTS):
        raise ConfigError("DISTILL.USE_BOX_PROMPTS / USE_POINT_PROMPTS: at least one must be true")
    if d.CACHE_TEACHER and not d.FIXED_PROMPTS:
        raise ConfigError("DISTILL.CACHE_TEACHER: needs DISTILL.FIXED_PROMPTS True (the prompts must repeat)")
    if not d.SELECT_BEST_MASK:
        raise ConfigError("DISTILL.SELECT_BEST_MASK: only the teacher's best query is distilled here; expected true")
    if d.CACHE_TEACHER_DEVICE_GB < 0:
        raise ConfigError(f"DISTILL.CACHE_TEACHER_DEVICE_GB: expected >= 0, got {d.CACHE_TEACHER_DEVICE_GB}")
    if d.TEMPERATURE <= 0:
        raise ConfigError(f"DISTILL.TEMPERATURE: expected > 0, got {d.TEMPERATURE}")
    return cfg
