"""Export (resume, --check), stage-1 training (2 steps, resume equals an uninterrupted run, online teacher),
losses on hand-made tensors."""

import math
from pathlib import Path

import pytest
import torch

from efficientsam3.engine.export import export
from efficientsam3.engine.losses import masked_cosine, masked_mse, stage1_loss
from efficientsam3.engine.schedule import lr_at
from efficientsam3.engine.stage1 import train
from efficientsam3.store import EmbeddingStore
from run_kit import load_checkpoint


def test_masked_losses_by_hand():
    pred = torch.zeros(1, 2, 2, 2)
    target = torch.zeros(1, 2, 2, 2)
    pred[0, :, 0, 0] = torch.tensor([1.0, 0.0])
    target[0, :, 0, 0] = torch.tensor([0.0, 1.0])  # orthogonal: cos 0, sq err 1 + 1
    pred[0, :, 0, 1] = torch.tensor([2.0, 2.0])
    target[0, :, 0, 1] = torch.tensor([1.0, 1.0])  # parallel: cos 1, sq err 1 + 1
    pred[0, :, 1, :] = 5.0  # padded row: must not count
    valid = torch.tensor([[[True, True], [False, False]]])
    assert masked_mse(pred, target, valid).item() == pytest.approx(4 / 4)  # 4 squared errors over 2 cells x 2 ch
    assert masked_cosine(pred, target, valid).item() == pytest.approx((1 + 0) / 2)
    total, parts = stage1_loss(pred, target, valid, 1.0, 2.0)
    assert total.item() == pytest.approx(1.0 + 2.0 * 0.5) and parts["mse"] == pytest.approx(1.0)


def test_lr_schedule_by_hand():
    assert lr_at(0, 100, 10, 1e-3, 1e-6, 1e-5) == pytest.approx(1e-6)
    assert lr_at(5, 100, 10, 1e-3, 1e-6, 1e-5) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert lr_at(10, 100, 10, 1e-3, 1e-6, 1e-5) == pytest.approx(1e-3)
    assert lr_at(55, 100, 10, 1e-3, 1e-6, 1e-5) == pytest.approx(
        1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi / 2))
    )
    assert lr_at(100, 100, 10, 1e-3, 1e-6, 1e-5) == pytest.approx(1e-5)


def _export(cfg, sa1b, store, *extra):
    return export(["--cfg", str(cfg), "--data-path", str(sa1b), "--teacher-embed-path", str(store), "--device", "cpu",
                   *extra])  # fmt: skip


def test_export_resume_and_check(tiny_cfg, sa1b, tmp_path):
    store = tmp_path / "emb"
    first = _export(tiny_cfg, sa1b, store, "--max-images", "2")
    assert first["written"] == 2
    second = _export(tiny_cfg, sa1b, store)
    assert second["written"] == 2  # only the two missing ones
    keys = (store / "rank0-keys.txt").read_text().split()
    assert sorted(keys) == ["sa_1000", "sa_1001", "sa_1002", "sa_1003"]
    fresh = tmp_path / "emb_fresh"
    _export(tiny_cfg, sa1b, fresh)
    a, b = EmbeddingStore(str(store)), EmbeddingStore(str(fresh))
    for k in keys:
        assert torch.equal(a.get(k)[1], b.get(k)[1])
    # a record equals the teacher on the preprocessed image (fp16 rounding only)
    from efficientsam3.data.sa1b import SA1BDataset
    from efficientsam3.model.teacher import build_teacher

    teacher = build_teacher("standin", embed_dim=16, embed_size=8, img_size=64)
    item = SA1BDataset(str(sa1b), img_size=64)[0]
    with torch.no_grad():
        want = teacher(item["image"][None])[0]
    torch.testing.assert_close(a.get(item["key"])[1], want.half().float())
    report = _export(tiny_cfg, sa1b, store, "--check", "3")
    assert report["checked"] == 3 and report["max_abs_err"] < 1e-2 and report["cos_min"] > 0.999


def test_export_rejects_wrong_shape_config(tiny_cfg, sa1b, tmp_path):
    with pytest.raises(ValueError, match="DISTILL.EMBED_DIM"):
        _export(tiny_cfg, sa1b, tmp_path / "e", "--teacher-type", "sam3_tiny")


def test_run_teacher_padding_equals_one_image_at_a_time():
    """pad_to (the compiled export's static batch) returns only the real images, each equal to running it alone."""
    from efficientsam3.engine.common import run_teacher
    from efficientsam3.model.teacher import build_teacher

    torch.manual_seed(0)
    teacher = build_teacher("sam3_tiny")
    images = torch.randn(2, 3, 112, 112)
    got = run_teacher(teacher, images, pad_to=5)
    want = torch.cat([run_teacher(teacher, images[i : i + 1]) for i in range(2)])
    assert got.shape[0] == 2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_compile_default_is_cuda_only():
    from efficientsam3.engine.common import use_compile
    from efficientsam3.engine.export import build_parser

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_compile(None, cuda) and not use_compile(None, cpu)
    assert use_compile(True, cpu) and not use_compile(False, cuda)
    base = ["--cfg", "x.yaml"]
    assert build_parser().parse_args(base).compile is None
    assert build_parser().parse_args([*base, "--no-compile"]).compile is False
    assert build_parser().parse_args([*base, "--compile"]).compile is True


def test_compiled_export_pads_to_one_batch_shape(tiny_cfg, sa1b, tmp_path, monkeypatch):
    """With compile on, every teacher call sees the configured batch size (4 images at batch 3: the last batch
    of 1 is padded), and the records equal an eager export's."""
    import efficientsam3.engine.export as export_mod

    seen: list[int] = []

    class Spy(torch.nn.Module):  # stands in for torch.compile (inductor on CPU is slow): records the shapes
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            seen.append(x.shape[0])
            return self.inner(x)

    monkeypatch.setattr(export_mod, "compile_trunk", Spy)
    _export(tiny_cfg, sa1b, tmp_path / "c", "--compile", "--batch-size", "3")
    assert seen == [3, 3]
    _export(tiny_cfg, sa1b, tmp_path / "e", "--batch-size", "3")  # CPU default: eager
    assert seen == [3, 3]
    a, b = EmbeddingStore(str(tmp_path / "c")), EmbeddingStore(str(tmp_path / "e"))
    for k in ["sa_1000", "sa_1001", "sa_1002", "sa_1003"]:
        torch.testing.assert_close(a.get(k)[1], b.get(k)[1], atol=1e-3, rtol=1e-3)


def _train(cfg, sa1b, store, out, *extra):
    return train(["--cfg", str(cfg), "--data-path", str(sa1b), "--teacher-embed-path", str(store), "--output", str(out),
                  "--device", "cpu", *extra])  # fmt: skip


@pytest.fixture
def exported(tiny_cfg, sa1b, tmp_path) -> Path:
    store = tmp_path / "emb"
    _export(tiny_cfg, sa1b, store)
    return store


def test_train_two_steps_and_resume_equals_uninterrupted(tiny_cfg, sa1b, exported, tmp_path):
    full = _train(tiny_cfg, sa1b, exported, tmp_path / "full")
    assert full["epochs_run"] == 2 and full["step"] == 4 and math.isfinite(full["final_loss"])
    for n in (0, 1):
        assert (tmp_path / "full" / f"ckpt_epoch_{n}.pth").is_file()
    assert (tmp_path / "full" / "config.json").is_file() and (tmp_path / "full" / "log_rank0.txt").is_file()
    part = _train(tiny_cfg, sa1b, exported, tmp_path / "part", "--stop-after-epochs", "1")
    assert part["epochs_run"] == 1 and not (tmp_path / "part" / "ckpt_epoch_1.pth").exists()
    rest = _train(tiny_cfg, sa1b, exported, tmp_path / "part")  # auto-resume from ckpt_epoch_0.pth
    assert rest["epochs_run"] == 1 and rest["step"] == 4
    a = load_checkpoint(tmp_path / "full" / "ckpt_epoch_1.pth")
    b = load_checkpoint(tmp_path / "part" / "ckpt_epoch_1.pth")
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0, msg=k)
    assert a["extra"]["loss"] == b["extra"]["loss"]


def test_train_online_teacher_and_compact_store(tiny_cfg, sa1b, exported, tmp_path):
    online = _train(tiny_cfg, sa1b, tmp_path / "none", tmp_path / "online", "--online-teacher", "--opts",
                    "TRAIN.EPOCHS", "1")  # fmt: skip
    stored = _train(tiny_cfg, sa1b, exported, tmp_path / "stored", "--opts", "TRAIN.EPOCHS", "1")
    # the fp16 store differs from the online teacher only by rounding
    assert online["final_loss"] == pytest.approx(stored["final_loss"], rel=1e-2)
    from efficientsam3.store.compact import compact_store

    compact_store(str(exported), str(tmp_path / "u8"), "uint8")
    q = _train(tiny_cfg, sa1b, tmp_path / "u8", tmp_path / "q", "--opts", "TRAIN.EPOCHS", "1")
    assert q["final_loss"] == pytest.approx(stored["final_loss"], rel=5e-2)


def test_missing_embeddings_is_one_line(tiny_cfg, sa1b, tmp_path):
    with pytest.raises(FileNotFoundError, match="DISTILL.TEACHER_EMBED_PATH: not a folder"):
        _train(tiny_cfg, sa1b, tmp_path / "nowhere", tmp_path / "o")


@pytest.mark.parametrize("mode", ["block", "span"])
def test_merged_export_checked_against_exact_teacher(tiny_cfg, sa1b, tmp_path, mode):
    """A merged-teacher store, re-checked by the exact teacher: --check reports the merge's error."""
    store = tmp_path / "merged"
    tiny = ["--teacher-type", "sam3_tiny", "--opts", "DISTILL.EMBED_DIM", "32", "DATA.IMG_SIZE", "112"]
    r = _export(tiny_cfg, sa1b, store, "--merge-r", "6", "--merge-global-r", "24", "--merge-mode", mode, *tiny)
    assert r["written"] == 4
    exact = _export(tiny_cfg, sa1b, store, "--check", "4", *tiny)
    merged = _export(tiny_cfg, sa1b, store, "--check", "4", "--merge-r", "6", "--merge-global-r", "24",
                     "--merge-mode", mode, *tiny)  # fmt: skip
    assert merged["max_abs_err"] < 1e-2  # the same merged teacher reproduces its records (fp16 rounding)
    assert exact["mean_abs_err"] > merged["mean_abs_err"]  # the exact teacher sees the merging error
