import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from efficientsam3.evaluation.coco_box import BoxFillPredictor, evaluate_box_prompts, main


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
