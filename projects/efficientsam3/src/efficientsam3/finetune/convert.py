"""Geometry-FT converter: put the fine-tuned student into a merged EfficientSAM3 checkpoint.

Only the `student_trunk.*` tensors of the fine-tune checkpoint are taken (keys naming `sam3` or `teacher`
are skipped, as in the reference), re-prefixed to the merged model's trunk prefix and written over the
matching tensors of the stage-1 merged checkpoint. Every key must already exist there with the same
shape, so the output has exactly the pretrained model's structure; the wrapping ({"model": ...} or bare)
of the pretrained file is kept."""

from __future__ import annotations

import os

import torch

from run_kit import CheckpointError, OneLineArgumentParser, load_checkpoint, save_checkpoint

from ..convert import TARGET, check_shapes
from ..engine.common import run_cli

STUDENT_PREFIX = "student_trunk."
SKIP = ("sam3", "teacher")


def extract_student(ckpt: dict, student_prefix: str, target_prefix: str, source: str) -> dict:
    """{target_prefix + tail: tensor} for every `student_prefix` key (after a DDP `module.`)."""
    sd = ckpt["model"] if isinstance(ckpt.get("model"), dict) else ckpt
    out = {}
    for key, value in sd.items():
        key = key[len("module.") :] if key.startswith("module.") else key
        if not key.startswith(student_prefix) or any(s in key for s in SKIP):
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"--finetune-ckpt: {source}: {key} is a {type(value).__name__}, expected a tensor")
        out[target_prefix + key[len(student_prefix) :]] = value
    if not out:
        raise CheckpointError(f"--finetune-ckpt: {source}: no {student_prefix}* keys (not a geometry-FT checkpoint?)")
    return out


def convert_geometry(
    finetune_ckpt: str,
    pretrained: str,
    output: str,
    student_prefix: str = STUDENT_PREFIX,
    target_prefix: str = TARGET,
) -> dict:
    """Write the merged checkpoint; returns the report's numbers."""
    for flag, path in (("--finetune-ckpt", finetune_ckpt), ("--pretrained", pretrained)):
        if not os.path.isfile(path):
            raise CheckpointError(f"{flag}: file not found: {path}")
    student = extract_student(load_checkpoint(finetune_ckpt), student_prefix, target_prefix, finetune_ckpt)
    base = load_checkpoint(pretrained)
    wrapped = isinstance(base.get("model"), dict)
    merged = dict(base["model"] if wrapped else base)
    check_shapes(student, merged, f"--pretrained: {pretrained}", "the pretrained merged model")
    matched = sum(1 for k in student if k in merged)
    for key, value in student.items():
        merged[key] = value.to(merged[key].dtype)
    checked = list(student)[:3]
    for key in checked:
        if not torch.equal(merged[key], student[key].to(merged[key].dtype)):
            raise CheckpointError(f"verification failed for {key}")
    save_checkpoint(output, {**base, "model": merged} if wrapped else merged)
    return {
        "extracted": len(student),
        "matched": matched,
        "replaced": len(student),
        "verified": [".".join(k.split(".")[-2:]) for k in checked],
        "total_keys": len(merged),
        "wrapped": wrapped,
    }


def main(argv=None) -> dict:
    return run_cli("efficientsam3-convert-geometry-finetune", _main, argv)


def _main(argv=None) -> dict:
    p = OneLineArgumentParser(prog="efficientsam3-convert-geometry-finetune", description=__doc__.splitlines()[0])
    p.add_argument("--finetune-ckpt", required=True, help="geometry-FT ckpt_epoch_N.pth (student_trunk.* keys)")
    p.add_argument("--pretrained", required=True, help="stage-1 merged model, e.g. efficient_sam3_repvit_m.pt")
    p.add_argument("--output", required=True, help="merged checkpoint to write")
    p.add_argument("--student-prefix", default=STUDENT_PREFIX, help="prefix of the student keys in --finetune-ckpt")
    p.add_argument("--target-prefix", default=TARGET, help="prefix of the student keys in --pretrained")
    args = p.parse_args(argv)
    r = convert_geometry(args.finetune_ckpt, args.pretrained, args.output, args.student_prefix, args.target_prefix)
    rule = "=" * 60
    print(f"Student encoder keys extracted: {r['extracted']}")
    print(f"Keys matched in pretrained: {r['matched']}")
    print(f"Replaced {r['replaced']} weights in pretrained model")
    print("\n=== Verification ===")
    for tail in r["verified"]:
        print(f"  ✓ {tail}")
    print(f"\n{rule}\nOutput saved to: {args.output}\nTotal keys in output: {r['total_keys']}")
    print(f"Image encoder weights replaced: {r['replaced']}\n✓ All weights successfully replaced!\n{rule}")
    return r


if __name__ == "__main__":
    main()
