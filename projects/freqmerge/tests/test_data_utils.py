import os
import pickle

import numpy as np
import pytest
import torch

from freqmerge.config import Config
from freqmerge.data.cifar100 import (
    CIFAR100,
    DatasetError,
    DatasetNotFoundError,
    build_loaders,
    build_transforms,
    find_cifar_dir,
    load_split,
    usable_workers,
    write_cifar100,
)
from freqmerge.utils.metrics import AverageMeter, accuracy, compute_throughput, count_gmacs


def test_fake_cifar_is_in_the_official_format(fake_cifar):
    folder = os.path.join(fake_cifar, "cifar-100-python")
    with open(os.path.join(folder, "train"), "rb") as f:
        entry = pickle.load(f, encoding="latin1")  # how torchvision reads it
    assert entry["data"].dtype == np.uint8 and entry["data"].shape == (32, 3072)
    assert set(entry) >= {"data", "fine_labels", "coarse_labels", "filenames", "batch_label"}
    with open(os.path.join(folder, "meta"), "rb") as f:
        assert len(pickle.load(f, encoding="latin1")["fine_label_names"]) == 100


def test_load_split_decodes_channel_planes(fake_cifar, tmp_path):
    images, labels, classes = load_split(fake_cifar, train=True)
    assert images.shape == (32, 32, 32, 3) and labels.tolist() == list(range(32)) and len(classes) == 100
    # bytes keys (the official files read with encoding="bytes") and a plane-ordered row
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    row = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.full(1024, 30)]).astype(np.uint8)
    for name in ("train", "test"):
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": row[None], b"fine_labels": [7]}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f)
    images, labels, classes = load_split(str(tmp_path), train=False)
    assert images[0, 5, 9].tolist() == [10, 20, 30] and labels.tolist() == [7] and classes[3] == "c3"
    assert find_cifar_dir(str(folder)) == str(folder)  # the folder itself is accepted too


def test_missing_dataset_is_one_line_with_location(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        find_cifar_dir(str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and "cifar-100-python/" in message
    assert str(tmp_path / "cifar-100-python") in message


def test_transforms_upscale_32_to_image_size(fake_cifar):
    ds = CIFAR100(fake_cifar, train=False, transform=build_transforms(112, (0.5,) * 3, (0.5,) * 3, False))
    image, label = ds[0]
    assert image.shape == (3, 112, 112) and isinstance(label, int)
    raw = torch.from_numpy(ds.data[0]).permute(2, 0, 1).float() / 255 * 2 - 1
    # the upscaled image averaged back to 32x32 is close to the original
    pooled = torch.nn.functional.adaptive_avg_pool2d(image[None], 32)[0]
    assert (pooled - raw).abs().mean() < 0.1
    train_tf = build_transforms(112, (0.5,) * 3, (0.5,) * 3, True)
    assert CIFAR100(fake_cifar, train=True, transform=train_tf)[0][0].shape == (3, 112, 112)


def test_loaders(fake_cifar):
    cfg = Config(data_root=fake_cifar, image_size=112, batch_size=8, num_workers=0)
    train, val, classes = build_loaders(cfg, (0.5,) * 3, (0.5,) * 3)
    x, y = next(iter(train))
    assert x.shape == (8, 3, 112, 112) and y.shape == (8,)
    assert len(val.dataset) == 16 and len(classes) == 100


def test_metrics():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    top1, top2 = accuracy(logits, torch.tensor([1, 2, 0]), (1, 2))
    assert top1 == pytest.approx(100 / 3) and top2 == pytest.approx(100 / 3)
    meter = AverageMeter()
    meter.update(1.0, 2)
    meter.update(4.0, 1)
    assert meter.avg == pytest.approx(2.0)
    tiny = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
    stats = compute_throughput(tiny, batch_size=2, image_size=16, warmup=1, iters=3)
    assert stats["img_s"] > 0 and stats["iters"] == 3


def test_gflops_are_macs_like_the_guide():
    import timm

    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=100)
    assert count_gmacs(model, 224) == pytest.approx(4.6, abs=0.05)  # guide: 4.61 "GFLOPs"


def _copy_of(fake_cifar, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(fake_cifar, dst)
    return dst / "cifar-100-python"


def test_truncated_pickle_is_one_line_naming_the_file(fake_cifar, tmp_path):
    folder = _copy_of(fake_cifar, tmp_path)
    data = (folder / "train").read_bytes()
    (folder / "train").write_bytes(data[: len(data) // 3])
    with pytest.raises(DatasetError) as info:
        load_split(str(folder.parent), train=True)
    msg = str(info.value)
    assert "\n" not in msg and str(folder / "train") in msg and "truncated" in msg and "re-extract" in msg


def test_foreign_pickles_are_one_line(tmp_path):
    folder = tmp_path / "cifar-100-python"
    write_cifar100(str(tmp_path), (np.zeros((2, 32, 32, 3), np.uint8), [0, 1]), (np.zeros((2, 32, 32, 3)), [0, 1]))
    with open(folder / "test", "wb") as f:
        pickle.dump({"pixels": 1}, f)
    with pytest.raises(DatasetError, match="has no 'data' entry"):
        load_split(str(tmp_path), train=False)
    with open(folder / "test", "wb") as f:
        pickle.dump([1, 2, 3], f)
    with pytest.raises(DatasetError, match="holds a list"):
        load_split(str(tmp_path), train=False)


def test_workers_capped_at_available_cores():
    cores = len(os.sched_getaffinity(0))
    assert usable_workers(4) == min(4, cores)
    assert usable_workers(0) == 0 and usable_workers(10_000) == cores


def test_training_curve_ticks_are_whole_epochs():
    """Three epochs used to get ticks at 1.0, 1.25, 1.5, ...; every visible tick must be an integer now."""
    import matplotlib.pyplot as plt

    from freqmerge.utils.visualize import training_curves_figure

    row = {"train_loss": 1.0, "val_loss": 1.1, "train_top1": 5.0, "val_top1": 4.0, "val_top5": 9.0}
    fig = training_curves_figure([{"epoch": e, **row} for e in (1, 2, 3)])
    try:
        for ax in fig.axes:
            lo, hi = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
    finally:
        plt.close(fig)


def test_synthetic_cifar_is_learnable_and_in_the_official_format(tmp_path):
    """tools/make_synthetic_cifar.py: readable by load_split, and the label follows from the image (nearest class
    template recovers it), so a smoke run's loss can fall."""
    import runpy
    from pathlib import Path

    tool = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "make_synthetic_cifar.py"))
    tool["main"](["--out", str(tmp_path), "--train", "200", "--test", "50"])
    images, labels, classes = load_split(str(tmp_path), train=True)
    assert images.shape == (200, 32, 32, 3) and len(classes) == 100 and set(labels) <= set(range(100))
    templates = tool["class_templates"](100, 0).reshape(100, -1)
    dist = ((images.reshape(200, 1, -1).astype(np.float64) - templates[None]) ** 2).sum(-1)
    assert (dist.argmin(1) == labels).mean() > 0.95
