"""Stage-1 converter: put a trained student into a SAM3 checkpoint in place of the ViT trunk.

Student keys (`backbone.*`, `head.*`; `module.` / `student_trunk.` prefixes stripped) go under
`detector.backbone.vision_backbone.trunk.model.`; every `detector.backbone.vision_backbone.trunk.*` key of
the SAM3 checkpoint is dropped; all other `detector.*` / `tracker.*` keys are copied. The student is
checked key by key and shape by shape against a freshly built student first, so a mismatch is refused
with a one-line error instead of producing a checkpoint that fails later. Output: {"model": merged}."""

from __future__ import annotations

import os

import torch

from run_kit import CheckpointError, OneLineArgumentParser, load_checkpoint, save_checkpoint

from .engine.common import run_cli
from .model.students import build_student
from .model.teacher import TRUNK_PREFIXES

TRUNK = TRUNK_PREFIXES[0]
TARGET = TRUNK + "model."
STRIP = ("module.", "student_trunk.")


def student_state(ckpt: dict) -> dict:
    sd = ckpt.get("model", ckpt)
    out = {}
    for key, value in sd.items():
        for prefix in STRIP:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def check_shapes(sd: dict, ref: dict, source: str, what: str) -> None:
    """Every key of `sd` must be in `ref` with the same shape; the first bad key is a one-line error."""
    for key, value in sd.items():
        if key not in ref:
            raise CheckpointError(f"{source}: {what} has no key {key}")
        if tuple(ref[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{source}: shape mismatch for {key}: {tuple(value.shape)} vs {tuple(ref[key].shape)} in {what}"
            )


def check_student(sd: dict, backbone: str, embed_dim: int, source: str) -> None:
    """Refuse a student that does not match the architecture (first bad key named)."""
    with torch.device("meta"):
        ref = build_student(backbone, embed_dim).state_dict()
    missing = [k for k in ref if k not in sd]
    if missing:
        raise CheckpointError(f"{source}: missing student key {missing[0]} (backbone {backbone})")
    extra = [k for k in sd if k not in ref]
    if extra:
        raise CheckpointError(f"{source}: unexpected student key {extra[0]} ({len(extra)} unexpected, {backbone})")
    check_shapes(sd, ref, source, f"the {backbone} student")


def convert(student_ckpt: str, sam3_ckpt: str, output: str, backbone: str | None = None) -> dict:
    for flag, path in (("--student-ckpt", student_ckpt), ("--sam3-checkpoint", sam3_ckpt)):
        if not os.path.isfile(path):
            raise CheckpointError(f"{flag}: file not found: {path}")
    ckpt = load_checkpoint(student_ckpt)
    cfg = ckpt.get("config") or {}
    backbone = backbone or cfg.get("MODEL", {}).get("BACKBONE")
    if not backbone:
        raise CheckpointError(f"{student_ckpt}: no MODEL.BACKBONE in its config; pass --backbone")
    embed_dim = int(cfg.get("DISTILL", {}).get("EMBED_DIM", 1024))
    student = student_state(ckpt)
    check_student(student, backbone, embed_dim, student_ckpt)
    sam3 = torch.load(sam3_ckpt, map_location="cpu", weights_only=True, mmap=True)
    sam3 = sam3["model"] if isinstance(sam3.get("model"), dict) else sam3
    trunk = [k for k in sam3 if k.startswith(TRUNK)]
    if not trunk:
        raise CheckpointError(f"{sam3_ckpt}: no {TRUNK}* keys (not a SAM3 checkpoint?)")
    already = [k for k in trunk if k.startswith(TARGET)]
    if already:
        raise CheckpointError(f"{sam3_ckpt}: already holds a student ({already[0]}); convert from the SAM3 original")
    merged = {k: v for k, v in sam3.items() if not k.startswith(TRUNK)}
    kept = len(merged)
    for key, value in student.items():
        merged[TARGET + key] = value
    report = {
        "student_keys": len(student),
        "trunk_keys_dropped": len(trunk),
        "other_keys_copied": kept,
        "total_keys": len(merged),
        "backbone": backbone,
    }
    save_checkpoint(output, {"model": merged})
    return report


def main(argv=None) -> dict:
    return run_cli("efficientsam3-convert-stage1", _main, argv)


def _main(argv=None) -> dict:
    p = OneLineArgumentParser(prog="efficientsam3-convert-stage1", description=__doc__.splitlines()[0])
    p.add_argument("--student-ckpt", required=True, help="stage-1 ckpt_epoch_N.pth (or a bare student state dict)")
    p.add_argument("--sam3-checkpoint", required=True, help="local sam3.pt")
    p.add_argument("--output", required=True, help="merged checkpoint to write")
    p.add_argument("--backbone", default=None, help="student backbone when the checkpoint has no config")
    args = p.parse_args(argv)
    r = convert(args.student_ckpt, args.sam3_checkpoint, args.output, args.backbone)
    print(f"Student encoder keys extracted: {r['student_keys']} ({r['backbone']})")
    print(f"SAM3 trunk keys replaced: {r['trunk_keys_dropped']}")
    print(f"Other SAM3 keys copied: {r['other_keys_copied']}")
    print(f"Output saved to: {args.output}")
    print(f"Total keys in output: {r['total_keys']}")
    return r


if __name__ == "__main__":
    main()
