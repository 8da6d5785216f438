import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from efficientsam3.evaluation.coco_box import BoxFillPredictor, evaluate_box_prompts, main
from efficientsam3.model.sam3_interactive import (
    HEAD_PREFIXES,
    NO_MEM_KEY,
    TINY_INTERACTIVE,
    TRUNK_PREFIX,
    InteractiveHeads,
    build_predictor,
)
from efficientsam3.model.sam3_vit import TINY_VIT, SAM3ViT


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def _fixture(tmp_path):
    """3 images, 4 non-crowd instances with hand-drawn masks and 1 crowd instance."""
    masks = {}
    a = np.zeros((10, 10), bool)
    a[0:4, 0:4] = True  # square = its box: box-fill IoU 1
    b = np.zeros((10, 10), bool)
    for r in range(5):
        b[5 + r, 5 : 5 + r + 1] = True  # triangle, 15 px in a 5x5 box: IoU 15/25
    c = np.zeros((10, 12), bool)
    c[0:2, 0:10] = True  # bar = its box: IoU 1
    crowd = np.zeros((10, 12), bool)
    crowd[5:10, 0:12] = True
    e = np.zeros((10, 10), bool)
    e[2:8, 2:8] = True
    e[3:7, 3:7] = False  # 6x6 ring, 20 px in a 36 px box: IoU 20/36
    anns = [(1, a, [0, 0, 4, 4], 0), (1, b, [5, 5, 5, 5], 0), (2, c, [0, 0, 10, 2], 0),
            (2, crowd, [0, 5, 12, 5], 1), (3, e, [2, 2, 6, 6], 0)]  # fmt: skip
    (tmp_path / "val2017").mkdir()
    images = []
    for i, (h, w) in zip((1, 2, 3), ((10, 10), (10, 12), (10, 10)), strict=True):
        Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(tmp_path / "val2017" / f"{i:012d}.png")
        images.append({"id": i, "file_name": f"{i:012d}.png", "height": h, "width": w})
    data = {"images": images, "categories": [{"id": 1, "name": "x"}], "annotations": []}
    for k, (img, m, box, crowd_flag) in enumerate(anns):
        data["annotations"].append({"id": k + 1, "image_id": img, "category_id": 1, "bbox": box,
                                    "area": int(m.sum()), "iscrowd": crowd_flag, "segmentation": _rle(m)})  # fmt: skip
        masks[k + 1] = m
    (tmp_path / "instances_val2017.json").write_text(json.dumps(data))
    return masks


class _Oracle:
    """Returns the stored GT mask whose box matches the prompt (checks the evaluator passes the boxes)."""

    def __init__(self, masks, boxes):
        self.masks, self.boxes = masks, boxes

    def set_image(self, image):
        self.hw = image.shape[:2]

    def predict_boxes(self, boxes_xyxy):
        return np.stack([self.masks[self.boxes[tuple(b)]] for b in boxes_xyxy.astype(int).tolist()])


def test_box_fill_miou_hand_computed(tmp_path):
    _fixture(tmp_path)
    r = evaluate_box_prompts(tmp_path / "instances_val2017.json", tmp_path / "val2017", BoxFillPredictor())
    assert (r["images"], r["instances"]) == (3, 4)  # the crowd instance is excluded
    assert r["miou"] == pytest.approx((1 + 15 / 25 + 1 + 20 / 36) / 4)
    assert r["miou_per_image"] == pytest.approx(((1 + 0.6) / 2 + 1 + 20 / 36) / 3)
    assert r["latency_ms_mean"] > 0 and r["images_per_s"] > 0


def test_oracle_and_errors(tmp_path):
    masks = _fixture(tmp_path)
    boxes = {(0, 0, 4, 4): 1, (5, 5, 10, 10): 2, (0, 0, 10, 2): 3, (2, 2, 8, 8): 5}
    r = evaluate_box_prompts(tmp_path / "instances_val2017.json", tmp_path / "val2017", _Oracle(masks, boxes))
    assert r["miou"] == pytest.approx(1.0)
    with pytest.raises(FileNotFoundError, match="--coco-ann: file not found"):
        evaluate_box_prompts(tmp_path / "none.json", tmp_path / "val2017", BoxFillPredictor())
    (tmp_path / "val2017" / "000000000002.png").unlink()
    with pytest.raises(FileNotFoundError, match="--coco-images: .*000000000002.png not found"):
        evaluate_box_prompts(tmp_path / "instances_val2017.json", tmp_path / "val2017", BoxFillPredictor())


def test_cli(tmp_path, capsys):
    _fixture(tmp_path)
    r = main(["--coco-ann", str(tmp_path / "instances_val2017.json"), "--coco-images", str(tmp_path / "val2017"),
              "--max-images", "1", "--output", str(tmp_path / "r.json")])  # fmt: skip
    assert r["miou"] == pytest.approx(0.8) and json.loads((tmp_path / "r.json").read_text())["instances"] == 2
    with pytest.raises(SystemExit):
        main(["--coco-ann", str(tmp_path / "x.json"), "--coco-images", str(tmp_path)])
    assert capsys.readouterr().err.strip().endswith("--coco-ann: file not found: " + str(tmp_path / "x.json"))


def _tiny_sam3_pt(path):
    torch.manual_seed(0)
    trunk, heads = SAM3ViT(TINY_VIT), InteractiveHeads(TINY_INTERACTIVE)
    sd = {TRUNK_PREFIX + k: v for k, v in trunk.state_dict().items()}
    for name, prefix in HEAD_PREFIXES.items():
        sd |= {prefix + k: v for k, v in heads.get_submodule(name).state_dict().items()}
    sd[NO_MEM_KEY] = heads.no_mem_embed.detach()
    torch.save({"model": sd}, path)


def test_end_to_end_through_the_stand_in_predictor(tmp_path):
    """The real interactive path (tiny trunk and heads) on the 3-image fixture. With hole filling over any area
    every mask becomes the whole image, so mIoU = mean(|GT| / (H W)) whatever the weights (by hand)."""
    masks = _fixture(tmp_path)
    _tiny_sam3_pt(tmp_path / "sam3.pt")
    ann, imgs = str(tmp_path / "instances_val2017.json"), str(tmp_path / "val2017")
    common = ["--coco-ann", ann, "--coco-images", imgs, "--predictor", "sam3", "--tiny", "--device", "cpu",
              "--sam3-checkpoint", str(tmp_path / "sam3.pt")]  # fmt: skip
    r = main([*common, "--max-hole-area", "1e9", "--output", str(tmp_path / "r.json")])
    assert (r["images"], r["instances"]) == (3, 4)
    assert r["miou"] == pytest.approx((16 / 100 + 15 / 100 + 20 / 120 + 20 / 100) / 4)
    assert r["latency_ms_mean"] > 0 and json.loads((tmp_path / "r.json").read_text())["predictor"] == "sam3"
    # the default (SAM3's 256-px hole filling): the evaluator's mIoU equals IoUs computed here from the predictor
    r = main(common)
    pred = build_predictor("sam3", sam3_checkpoint=str(tmp_path / "sam3.pt"), tiny=True)
    want = []
    for img_id, box_ids in ((1, (1, 2)), (2, (3,)), (3, (5,))):
        pred.set_image(np.asarray(Image.open(tmp_path / "val2017" / f"{img_id:012d}.png").convert("RGB")))
        boxes = {1: [0, 0, 4, 4], 2: [5, 5, 10, 10], 3: [0, 0, 10, 2], 5: [2, 2, 8, 8]}
        got = pred.predict_boxes(np.array([boxes[i] for i in box_ids], dtype=np.float64))
        for m, i in zip(got, box_ids, strict=True):
            inter, union = (m & masks[i]).sum(), (m | masks[i]).sum()
            want.append(inter / union if union else 0.0)
    assert r["miou"] == pytest.approx(float(np.mean(want)))


def test_synthetic_throughput_command(tmp_path, capsys):
    out = tmp_path / "bench.json"
    r = main(["--synthetic", "2", "--predictor", "sam3", "student", "--tiny", "--device", "cpu",
              "--synthetic-hw", "40x48", "--boxes-per-image", "2", "--warmup", "1", "--out", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert "| sam3 |" in text and "| student |" in text and "img/s" in text
    saved = json.loads(out.read_text())
    assert saved["mode"] == "synthetic" and saved["random_weights"] and saved["dtype"] == "fp32"
    for row in saved["results"]:
        assert row["images"] == 2 and row["images_per_s"] > 0 and row["boxes_per_image"] == 2
        assert row["latency_ms_mean"] == pytest.approx(row["set_image_ms_mean"] + row["boxes_ms_mean"])
    assert [row["predictor"] for row in r["results"]] == ["sam3", "student"]
    assert saved["results"][0]["trunk_params_m"] == pytest.approx(
        sum(p.numel() for p in SAM3ViT(TINY_VIT).parameters()) / 1e6
    )


def test_cli_one_line_errors(tmp_path, capsys):
    _fixture(tmp_path)
    ann, imgs = str(tmp_path / "instances_val2017.json"), str(tmp_path / "val2017")
    cases = [
        (["--coco-ann", ann, "--coco-images", imgs, "--predictor", "sam3", "--tiny"],
         "--sam3-checkpoint: required for --predictor sam3"),
        (["--coco-ann", ann, "--coco-images", imgs, "--predictor", "student", "--tiny"], "--checkpoint: required"),
        (["--predictor", "box"], "--coco-ann/--coco-images: required unless --synthetic N"),
        (["--synthetic", "1", "--synthetic-hw", "big"], "--synthetic-hw: expected HxW"),
    ]  # fmt: skip
    for argv, msg in cases:
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err.strip()
        assert (
            err.startswith("efficientsam3-eval-coco-box: error: ") and err.endswith(msg.split(": ", 1)[1]) or msg in err
        )
        assert "\n" not in err
