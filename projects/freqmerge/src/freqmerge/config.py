"""All hyperparameters and paths (the guide's ``config.py``); every CLI flag overrides one of them.

Module-level UPPER_CASE names are the defaults, exactly as the guide's tables give them. ``Config``
is the resolved, per-run copy (lower-case fields) that the scripts pass around and that checkpoints
store, so ``evaluate.py``/``ablation.py`` rebuild the model a checkpoint was trained with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# --- Model (guide: Configuration Reference) -------------------------------------------------------
BACKBONE = "vit_small_patch16_224"  # timm model identifier
IMAGE_SIZE = 224  # upscaled resolution (CIFAR-100 native: 32x32)
MERGE_LAYERS = [4, 6, 8, 10]  # encoder block indices where the DTM is applied (0-indexed)
KEEP_RATE = 0.7  # fraction of spatial tokens kept per merge layer
ALPHA = 0.7  # frequency penalty weight alpha
HPF_RADIUS = 2  # high-pass filter radius (frequency-grid units): a disc of this radius around DC is zeroed
NUM_CLASSES = 100

# --- Training -------------------------------------------------------------------------------------
BATCH_SIZE = 32  # training mini-batch size (per process under torchrun)
LR = 3e-4  # base learning rate (AdamW)
WEIGHT_DECAY = 0.01  # AdamW weight decay
NUM_EPOCHS = 20  # training epochs

# --- CUDA (guide: CUDA Configuration) -------------------------------------------------------------
USE_AMP = True  # float16 autocast + GradScaler on CUDA (ignored on CPU)
CUDNN_BENCHMARK = True  # cuDNN auto-tune for fixed 224x224 inputs
CUDNN_DETERMINISTIC = False  # bit-exact reproducibility (slower)
USE_MULTI_GPU = True  # DistributedDataParallel when launched with torchrun (the guide said DataParallel)
EMPTY_CACHE_EVERY_N_EPOCHS = 5  # torch.cuda.empty_cache() every N epochs (0 = never)
USE_GRAD_CHECKPOINT = False  # activation checkpointing (only without token merging, see README)

# --- Defaults the guide leaves open (documented in README) ---------------------------------------
PENALTY_MODE = "shifted"  # "shifted": (1+cos)/2 * (1 - a*max(phi)); "guide": cos * (1 - a*max(phi)) as printed
LFGM_BORDER = "wrap"  # "wrap": the guide's periodic FFT; "reflect": mirror-extended grid, no border artefact
PHI_POOL = "mean"  # how grid scores are pooled onto merged tokens at later layers: "mean" or "amax"
SCORER = "lfgm"  # token scorer: lfgm | attention | random (pruning) | none (= ToMe)
PROP_ATTN = False  # ToMe's proportional attention (log(size) on the keys); not part of the guide's algorithm
PRETRAINED = True  # timm hub weights when online; otherwise --pretrained_path or random init (warning)
PRETRAINED_PATH = ""  # local timm checkpoint (state dict), loaded with weights_only=True
LABEL_SMOOTHING = 0.0
WARMUP_EPOCHS = 0  # linear LR warm-up epochs before the cosine decay
NUM_WORKERS = 4  # capped at the CPU cores this process may use (DataLoader warns above that)
SEED = 42
DATA_ROOT = "data"  # holds cifar-100-python/ (torchvision's on-disk layout)
OUTPUT_DIR = "."  # checkpoints/, logs/, visualizations/ are created under it
CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"
VIS_DIR = "visualizations"
BEST_CHECKPOINT = "best_model.pth"
LAST_CHECKPOINT = "last_model.pth"  # written every epoch, used by --resume
HISTORY_FILE = "training_history.json"
TRAIN_LOG_FILE = "train_log.txt"  # the lines train.py prints (rank 0); TensorBoard events go to logs/tensorboard/
ABLATION_FILE = "ablation_results.json"
ALPHA_SWEEP = [0.0, 0.25, 0.5, 0.7, 1.0]
SCORING_STRATEGIES = ["random", "attention", "lfgm"]
BENCHMARK_BATCH_SIZE = 64
BENCHMARK_WARMUP = 10
BENCHMARK_ITERS = 30
# On a CPU the GPU values above take minutes per model; used there unless the --bench_* flags are given.
CPU_BENCHMARK_BATCH_SIZE = 8
CPU_BENCHMARK_WARMUP = 1
CPU_BENCHMARK_ITERS = 5
MODEL_KWARGS: dict[str, Any] = {}  # extra timm.create_model kwargs (tests build a tiny ViT with this)


@dataclass
class Config:
    """Resolved settings of one run (defaults = the module constants above)."""

    backbone: str = BACKBONE
    image_size: int = IMAGE_SIZE
    merge_layers: list[int] = field(default_factory=lambda: list(MERGE_LAYERS))
    keep_rate: float = KEEP_RATE
    alpha: float = ALPHA
    hpf_radius: float = HPF_RADIUS
    num_classes: int = NUM_CLASSES
    batch_size: int = BATCH_SIZE
    lr: float = LR
    weight_decay: float = WEIGHT_DECAY
    epochs: int = NUM_EPOCHS
    use_amp: bool = USE_AMP
    cudnn_benchmark: bool = CUDNN_BENCHMARK
    cudnn_deterministic: bool = CUDNN_DETERMINISTIC
    use_multi_gpu: bool = USE_MULTI_GPU
    empty_cache_every_n_epochs: int = EMPTY_CACHE_EVERY_N_EPOCHS
    use_grad_checkpoint: bool = USE_GRAD_CHECKPOINT
    freqmerge: bool = True
    penalty_mode: str = PENALTY_MODE
    phi_pool: str = PHI_POOL
    lfgm_border: str = LFGM_BORDER
    scorer: str = SCORER
    prop_attn: bool = PROP_ATTN
    pretrained: bool = PRETRAINED
    pretrained_path: str = PRETRAINED_PATH
    label_smoothing: float = LABEL_SMOOTHING
    warmup_epochs: int = WARMUP_EPOCHS
    num_workers: int = NUM_WORKERS
    seed: int = SEED
    data_root: str = DATA_ROOT
    output_dir: str = OUTPUT_DIR
    download: bool = False  # fetch CIFAR-100 with torchvision when missing (needs internet)
    max_train_batches: int = 0  # 0 = all (debugging / smoke runs)
    max_eval_batches: int = 0
    benchmark_batch_size: int = BENCHMARK_BATCH_SIZE
    benchmark_warmup: int = BENCHMARK_WARMUP
    benchmark_iters: int = BENCHMARK_ITERS
    model_kwargs: dict[str, Any] = field(default_factory=lambda: dict(MODEL_KWARGS))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """Build from a stored dict, ignoring keys this version does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    # Output locations (guide: checkpoints/best_model.pth, logs/..., visualizations/...).
    def path(self, *parts: str) -> str:
        import os

        return os.path.join(self.output_dir, *parts)

    @property
    def checkpoint_dir(self) -> str:
        return self.path(CHECKPOINT_DIR)

    @property
    def log_dir(self) -> str:
        return self.path(LOG_DIR)

    @property
    def vis_dir(self) -> str:
        return self.path(VIS_DIR)


# Fields that describe the network a checkpoint holds (restored by evaluate/ablation from the checkpoint).
ARCH_FIELDS = ("backbone", "image_size", "num_classes", "model_kwargs")
# Fields that describe the token-merging setup (restored too, unless overridden on the command line).
MERGE_FIELDS = (
    "merge_layers",
    "keep_rate",
    "alpha",
    "hpf_radius",
    "freqmerge",
    "penalty_mode",
    "phi_pool",
    "lfgm_border",
    "scorer",
    "prop_attn",
)
