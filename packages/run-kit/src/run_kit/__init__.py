"""Shared run plumbing for the workspace's trainers: checkpoints, resume, DDP, logs, seeds.

No merging code lives here; see docs/architecture.md (section ``packages/run-kit``) for the conventions.
"""

from .amp import amp_autocast, grad_scaler
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_state_dict_checked,
    save_checkpoint,
    stale_temp_files,
    unwrap_model,
)
from .cli import OneLineArgumentParser, explicit_dests, parse_args_explicit
from .dist import (
    DistEnv,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast_object,
    cleanup_distributed,
    resolve_device,
    set_sampler_epoch,
    setup_distributed,
    wrap_ddp,
)
from .resume import (
    ConfigMismatchWarning,
    ResumeInfo,
    gather_rng_states,
    reconcile_config,
    restore_resume_state,
    resume_state,
)
from .rng import capture_rng_state, restore_rng_state, seed_everything
from .runlog import RunLogger, progress, write_json_atomic

__all__ = [
    "CheckpointError",
    "ConfigMismatchWarning",
    "DistEnv",
    "OneLineArgumentParser",
    "ResumeInfo",
    "RunLogger",
    "all_reduce_mean",
    "all_reduce_sum",
    "amp_autocast",
    "barrier",
    "broadcast_object",
    "capture_rng_state",
    "cleanup_distributed",
    "explicit_dests",
    "gather_rng_states",
    "grad_scaler",
    "load_checkpoint",
    "load_state_dict_checked",
    "parse_args_explicit",
    "progress",
    "reconcile_config",
    "resolve_device",
    "restore_resume_state",
    "restore_rng_state",
    "resume_state",
    "save_checkpoint",
    "seed_everything",
    "set_sampler_epoch",
    "setup_distributed",
    "stale_temp_files",
    "unwrap_model",
    "wrap_ddp",
    "write_json_atomic",
]
