import json

import pytest
import torch

from efficientsam3.data.sa1b import SA1BDataset, collate, decode_mask, load_annotations
from efficientsam3.data.transforms import preprocess, valid_mask
from efficientsam3.store import StoreWriter


def test_annotations_decode(sa1b):
    anns = load_annotations(sa1b / "annotations/train/sa_1000.json")
    m = decode_mask(anns[0])
    x, y, w, h = anns[0]["bbox"]
    assert m.sum() == w * h == anns[0]["area"]
    assert m[y, x] == 1 and m[y + h - 1, x + w - 1] == 1 and m[y + h, x] == 0


def test_letterbox_and_valid_mask():
    img = torch.full((3, 40, 80), 255, dtype=torch.uint8)
    x, hw = preprocess(img, 64, "letterbox")
    assert hw == (32, 64) and x.shape == (3, 64, 64)
    assert torch.allclose(x[0, 0, 0], torch.tensor((255 - 123.675) / 58.395))
    assert (x[:, 32:] == 0).all()
    y, hw2 = preprocess(img, 64, "sam3")
    assert hw2 == (64, 64) and torch.allclose(y, torch.ones_like(y))
    # 8x8 grid over 64 px: cells of 8 px; valid height 32 -> 4 rows, 36 -> 4 rows (half), 37 -> 5 rows
    m = valid_mask(torch.tensor([[32, 64], [36, 64], [37, 20]]), 64, 8)
    assert m[0].sum() == 32 and m[1].sum() == 32
    assert m[2, :, :].any(1).sum() == 5 and m[2, 0].sum() == 2  # width 20: cells 0,1 full, 2 half -> 2


def test_dataset_skips_and_collate(sa1b, tmp_path):
    (sa1b / "annotations/train/sa_1001.json").unlink()
    ds = SA1BDataset(str(sa1b), img_size=32, with_annotations=True)
    assert len(ds) == 3 and ds.skips["no_annotation"] == 1
    with pytest.raises(FileNotFoundError, match="sa_1001.json"):
        SA1BDataset(str(sa1b), img_size=32, with_annotations=True, strict=True)
    store_dir = tmp_path / "emb"
    with StoreWriter(store_dir, 0, 4, 2) as w:
        w.write("sa_1000", 5, torch.zeros(4, 2, 2))
        w.write("sa_1002", 6, torch.ones(4, 2, 2))
    from efficientsam3.store import EmbeddingStore, MissingEmbeddingError

    store = EmbeddingStore(str(store_dir))
    ds = SA1BDataset(str(sa1b), img_size=32, store=store)
    assert ds.keys == ["sa_1000", "sa_1002"] and ds.skips["no_embedding"] == 2
    with pytest.raises(MissingEmbeddingError, match="sa_1001"):
        SA1BDataset(str(sa1b), img_size=32, store=store, strict=True)
    (sa1b / "images/train/sa_1002.jpg").write_bytes(b"not a jpeg")
    batch = collate([ds[0], ds[1]])
    assert batch["skipped"] == 1 and batch["key"] == ["sa_1000"] and batch["target"].shape == (1, 4, 2, 2)
    assert batch["seed"].tolist() == [5]
    with pytest.raises(FileNotFoundError, match="DATA.DATA_PATH"):
        SA1BDataset(str(tmp_path / "nowhere"))


def test_flip_follows_seed(sa1b):
    ds = SA1BDataset(str(sa1b), img_size=32, aug_flip=True)
    item = ds[0]
    plain = SA1BDataset(str(sa1b), img_size=32)[0]
    flipped = bool(item["seed"] & 1)
    assert torch.allclose(item["image"], plain["image"].flip(-1) if flipped else plain["image"], atol=1e-5)
    json.dumps(item["seed"])  # an int, storable as int32
