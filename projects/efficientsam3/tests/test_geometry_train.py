"""Geometry fine-tune on the tiny stand-in: 2 steps, a resume that continues and equals an uninterrupted
run, only trainable weights saved, the converter on the result, one-line errors."""

import json
from pathlib import Path

import pytest
import torch

from efficientsam3.config import ConfigError
from efficientsam3.engine.export import export
from efficientsam3.engine.geometry import main, teacher_targets, train
from efficientsam3.finetune.cache import HostTeacherCache
from efficientsam3.finetune.config import load_ft_config
from efficientsam3.finetune.convert import extract_student
from efficientsam3.model.sam3_frozen import TINY_DIMS, build_frozen_sam3
from run_kit import load_checkpoint

EXPORT_CFG = """
DATA:
  IMG_SIZE: 64
  BATCH_SIZE: 2
  NUM_WORKERS: 0
TEACHER:
  TYPE: standin
DISTILL:
  EMBED_DIM: 32
  EMBED_SIZE: 8
AMP_ENABLE: False
"""

FT_CFG = """
DATA:
  IMG_SIZE: 64
  BATCH_SIZE: 2
  NUM_WORKERS: 0
MODEL:
  BACKBONE: efficientvit_b0
  SAM3_TYPE: tiny
DISTILL:
  EMBED_DIM: 32
  EMBED_SIZE: 8
TRAIN:
  EPOCHS: 2
  WARMUP_EPOCHS: 1
  ACCUMULATION_STEPS: 1
AMP_ENABLE: False
PRINT_FREQ: 1
"""


@pytest.fixture
def ft_setup(sa1b, tmp_path):
    (tmp_path / "export.yaml").write_text(EXPORT_CFG)
    (tmp_path / "ft.yaml").write_text(FT_CFG)
    store = tmp_path / "emb"
    export(["--cfg", str(tmp_path / "export.yaml"), "--data-path", str(sa1b), "--teacher-embed-path", str(store),
            "--device", "cpu"])  # fmt: skip
    return tmp_path / "ft.yaml", sa1b, store


def _run(cfg, sa1b, store, out, *extra):
    return train(["--cfg", str(cfg), "--data-path", str(sa1b), "--teacher-embed-path", str(store), "--output",
                  str(out), "--device", "cpu", *extra])  # fmt: skip


def test_two_steps_resume_and_convert(ft_setup, tmp_path):
    cfg, sa1b, store = ft_setup
    full = _run(cfg, sa1b, store, tmp_path / "full")
    assert full["step"] == 4 and full["epochs_run"] == 2  # 4 images / batch 2 = 2 steps per epoch
    part = _run(cfg, sa1b, store, tmp_path / "part", "--stop-after-epochs", "1")
    assert part["step"] == 2
    rest = _run(cfg, sa1b, store, tmp_path / "part")  # auto-resume from ckpt_epoch_0.pth
    assert rest["epochs_run"] == 1 and rest["step"] == 4
    a = load_checkpoint(tmp_path / "full" / "ckpt_epoch_1.pth")
    b = load_checkpoint(tmp_path / "part" / "ckpt_epoch_1.pth")
    assert set(a["model"]) == set(b["model"]) and all(k.startswith("student_trunk.") for k in a["model"])
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, atol=1e-6, rtol=1e-5)
    assert "optimizer" in a
    for f in ("config.json", "log_rank0.txt", "ckpt_epoch_0.pth"):
        assert (tmp_path / "full" / f).is_file()
    ev = _run(cfg, sa1b, store, tmp_path / "full", "--eval")["eval"]
    assert set(ev) == {"loss", "embed_mse", "mask_bce", "mask_dice"}
    assert ev["loss"] == pytest.approx(0.0015 * ev["embed_mse"] + ev["mask_bce"] + ev["mask_dice"], rel=1e-5)
    assert not (tmp_path / "full" / "ckpt_epoch_2.pth").exists()
    start = extract_student({"model": a["model"]}, "student_trunk.", "", "x")
    assert len(start) == sum(1 for k in a["model"])


def test_one_line_errors(ft_setup, tmp_path, capsys):
    cfg, sa1b, store = ft_setup
    with pytest.raises(SystemExit):
        main(["--cfg", str(cfg), "--data-path", str(sa1b), "--teacher-embed-path", str(tmp_path / "none"),
              "--output", str(tmp_path / "o"), "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("efficientsam3-train-geometry-finetune: error:")
    with pytest.raises(SystemExit):
        main(["--cfg", str(cfg), "--opts", "DISTILL.MASK_BCE_WIEGHT", "1", "--device", "cpu"])
    assert "unknown config key DISTILL.MASK_BCE_WIEGHT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--cfg", str(cfg), "--opts", "MODEL.SAM3_TYPE", "sam3", "DISTILL.EMBED_DIM", "1024", "--data-path",
              str(sa1b), "--teacher-embed-path", str(store), "--sam3-checkpoint", str(tmp_path / "no.pt"),
              "--output", str(tmp_path / "o2"), "--device", "cpu"])  # fmt: skip
    assert "MODEL.SAM3_CHECKPOINT: file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--cfg", str(cfg), "--data-path", str(sa1b), "--teacher-embed-path", str(store), "--pretrained",
              str(tmp_path / "stage1.pt"), "--output", str(tmp_path / "o3"), "--device", "cpu"])  # fmt: skip
    assert "MODEL.PRETRAINED: stage-1 student not found" in capsys.readouterr().err


def test_teacher_cache_gives_the_same_training(ft_setup, tmp_path):
    """With prompts fixed per image the cached teacher targets must reproduce the uncached run (up to the
    fp16 storage of the cached mask logits)."""
    cfg, sa1b, store = ft_setup
    fixed = ["--opts", "DISTILL.FIXED_PROMPTS", "True"]
    _run(cfg, sa1b, store, tmp_path / "plain", *fixed)
    _run(cfg, sa1b, store, tmp_path / "cached", "--opts", "DISTILL.FIXED_PROMPTS", "True", "DISTILL.CACHE_TEACHER",
         "True")  # fmt: skip
    a = load_checkpoint(tmp_path / "plain" / "ckpt_epoch_1.pth")["model"]
    b = load_checkpoint(tmp_path / "cached" / "ckpt_epoch_1.pth")["model"]
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, atol=1e-4, rtol=1e-3)


def test_device_teacher_cache_gives_the_host_cache_training(ft_setup, tmp_path):
    """DISTILL.CACHE_TEACHER_DEVICE_GB (here on the CPU 'device', capped at one 32x32 mask so the other images
    spill to the host): the same weights as the host cache."""
    cfg, sa1b, store = ft_setup
    fixed = ["DISTILL.FIXED_PROMPTS", "True", "DISTILL.CACHE_TEACHER", "True"]
    _run(cfg, sa1b, store, tmp_path / "host", "--opts", *fixed)
    _run(cfg, sa1b, store, tmp_path / "dev", "--opts", *fixed, "DISTILL.CACHE_TEACHER_DEVICE_GB", "0.000003")
    a = load_checkpoint(tmp_path / "host" / "ckpt_epoch_1.pth")["model"]
    b = load_checkpoint(tmp_path / "dev" / "ckpt_epoch_1.pth")["model"]
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, atol=0, rtol=0)


def test_teacher_cache_maps_images_to_their_own_targets():
    torch.manual_seed(0)
    frozen = build_frozen_sam3(dims=TINY_DIMS)
    emb = torch.randn(3, TINY_DIMS.embed_dim, 8, 8)
    pts = torch.rand(3, 2, 2)
    boxes = torch.cat([torch.rand(3, 2, 2) * 0.5 + 0.25, torch.full((3, 2, 2), 0.2)], -1)
    pad = torch.zeros(3, 2, dtype=torch.bool)
    cache = HostTeacherCache()
    idx, mask = teacher_targets(frozen, emb, (pts, pad, boxes, pad), ["a", "b", "c"], cache)
    assert len(cache) == 3 and all(k in cache for k in "abc")
    order = [2, 0]  # a later batch with images c and a: served from the cache, in that order
    idx2, mask2 = teacher_targets(frozen, emb[order], (pts[order], pad[order], boxes[order], pad[order]), ["c", "a"],
                                  cache)  # fmt: skip
    assert idx2.tolist() == idx[order].tolist()
    torch.testing.assert_close(mask2.float(), mask[order].half().float())
    fresh, _ = teacher_targets(frozen, emb[order], (pts[order], pad[order], boxes[order], pad[order]), ["c", "a"], None)
    assert fresh.tolist() == idx2.tolist()


EDGESAM = ["DISTILL.MAX_PROMPTS", "1", "DISTILL.PROMPT_MIX", "True", "DISTILL.DECODE_ITERS", "2",
           "DISTILL.ITER_ON_BOX", "True"]  # fmt: skip


def _refine_counts(out):
    """refine_points logged per step (history.json)."""
    return [row["refine_points"] for row in json.loads((out / "history.json").read_text()) if "refine_points" in row]


def test_edgesam_style_decode_iterations_resume(ft_setup, tmp_path):
    """DECODE_ITERS 2 with refinement points: 2 steps, then a resume (the saved config keeps the EdgeSAM keys)
    that continues and equals the uninterrupted run."""
    cfg, sa1b, store = ft_setup
    full = _run(cfg, sa1b, store, tmp_path / "full", "--opts", *EDGESAM)
    part = _run(cfg, sa1b, store, tmp_path / "part", "--stop-after-epochs", "1", "--opts", *EDGESAM)
    assert part["step"] == 2
    rest = _run(cfg, sa1b, store, tmp_path / "part")
    assert rest["epochs_run"] == 1 and rest["step"] == full["step"] == 4
    saved = load_checkpoint(tmp_path / "part" / "ckpt_epoch_1.pth")
    assert saved["config"]["DISTILL"]["DECODE_ITERS"] == 2
    a = load_checkpoint(tmp_path / "full" / "ckpt_epoch_1.pth")["model"]
    for k, v in a.items():
        torch.testing.assert_close(saved["model"][k], v, atol=1e-6, rtol=1e-5)
    counts = _refine_counts(tmp_path / "full")
    assert len(counts) == 4 and max(counts) > 0  # points were added (random tiny SAM3 disagrees)


def test_online_teacher_matches_the_store(ft_setup, tmp_path):
    """--online-teacher runs stage 1's teacher (here the stand-in the store was exported with) in the loop:
    the same loss parts as reading the store (which holds fp16), no store needed; it also trains."""
    cfg, sa1b, store = ft_setup
    stored = _run(cfg, sa1b, store, tmp_path / "a", "--eval")["eval"]
    online = train(["--cfg", str(cfg), "--data-path", str(sa1b), "--output", str(tmp_path / "b"), "--device", "cpu",
                    "--online-teacher", "--teacher-type", "standin", "--eval"])["eval"]  # fmt: skip
    for k in stored:
        assert online[k] == pytest.approx(stored[k], rel=2e-3), k
    r = train(["--cfg", str(cfg), "--data-path", str(sa1b), "--output", str(tmp_path / "d"), "--device", "cpu",
               "--online-teacher", "--teacher-type", "standin", "--stop-after-epochs", "1"])  # fmt: skip
    assert r["step"] == 2 and (tmp_path / "d" / "ckpt_epoch_0.pth").is_file()


def test_edgesam_config_and_new_keys():
    cfgs = Path(__file__).resolve().parents[1] / "stage1_geometry_finetune" / "configs"
    d = load_ft_config(str(cfgs / "base_geometry_finetune_edgesam_style.yaml")).DISTILL
    assert (d.MAX_PROMPTS, d.PROMPT_MIX, d.DECODE_ITERS, d.ITER_ON_BOX, d.REFINE_POINTS) == (1, True, 2, True, 1)
    assert load_ft_config(None).MODEL.SAM3_DTYPE == ""  # the frozen path follows AMP_DTYPE
    with pytest.raises(ConfigError, match="DISTILL.REFINE_POINTS: expected >= 1"):
        load_ft_config(None, ["DISTILL.REFINE_POINTS", "0"])
    with pytest.raises(ConfigError, match="MODEL.SAM3_DTYPE"):
        load_ft_config(None, ["MODEL.SAM3_DTYPE", "fp8"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_training_with_the_compiled_frozen_path(ft_setup, tmp_path):
    """On CUDA the frozen path is compiled by default (prompts padded to DISTILL.MAX_PROMPTS, one static
    shape); fp16 AMP; the loss stays finite and --no-compile gives the same first-epoch loss up to rounding."""
    cfg, sa1b, store = ft_setup
    common = ["--cfg", str(cfg), "--data-path", str(sa1b), "--teacher-embed-path", str(store), "--device", "cuda"]
    opts = ["--opts", "AMP_ENABLE", "True", "TRAIN.EPOCHS", "1"]
    a = train([*common, "--output", str(tmp_path / "c"), *opts])
    b = train([*common, "--output", str(tmp_path / "e"), "--no-compile", *opts])
    assert "frozen path compiled" in (tmp_path / "c" / "log_rank0.txt").read_text()
    assert "frozen path eager" in (tmp_path / "e" / "log_rank0.txt").read_text()
    assert a["final_loss"] == a["final_loss"] and a["final_loss"] == pytest.approx(b["final_loss"], rel=5e-2)
