import pytest
import torch

from efficientsam3.finetune.convert import convert_geometry, main
from efficientsam3.model.students import build_student
from run_kit import CheckpointError

TRUNK = "detector.backbone.vision_backbone.trunk.model."


def _student_shapes(name="repvit_m1_1"):
    with torch.device("meta"):
        return {k: v.shape for k, v in build_student(name).state_dict().items()}


def _pretrained(path, shapes, wrapped=True):
    """A stage-1 merged model: the student under the trunk prefix (zeros) + 1045 other SAM3 keys."""
    sd = {TRUNK + k: torch.zeros(s) for k, s in shapes.items()}
    for i in range(1045):
        sd[f"{'detector.transformer' if i < 700 else 'tracker.sam_mask_decoder'}.p{i}"] = torch.full((2,), float(i))
    torch.save({"model": sd} if wrapped else sd, path)
    return sd


def _finetune(path, shapes, extra=None):
    model = {"student_trunk." + k: torch.ones(s) for k, s in shapes.items()}
    model.update(extra or {})
    torch.save({"model": model, "optimizer": {}, "epoch": 29}, path)


@pytest.mark.parametrize("wrapped", [True, False])
def test_geometry_convert_repvit_m1_1_report(tmp_path, capsys, wrapped):
    shapes = _student_shapes()
    assert len(shapes) == 653
    _pretrained(tmp_path / "pre.pt", shapes, wrapped)
    # skipped like the reference: keys naming sam3/teacher even under the student prefix
    _finetune(tmp_path / "ft.pth", shapes, {"student_trunk.sam3_alias.w": torch.ones(1), "sam3.x": torch.ones(1)})
    r = main(["--finetune-ckpt", str(tmp_path / "ft.pth"), "--pretrained", str(tmp_path / "pre.pt"),
              "--output", str(tmp_path / "out.pt")])  # fmt: skip
    out = capsys.readouterr().out
    for line in ("Student encoder keys extracted: 653", "Keys matched in pretrained: 653",
                 "Replaced 653 weights in pretrained model", "  ✓ c.weight", "  ✓ bn.weight", "  ✓ bn.bias",
                 "Total keys in output: 1698", "Image encoder weights replaced: 653"):  # fmt: skip
        assert line in out
    assert r["total_keys"] == 1698
    saved = torch.load(tmp_path / "out.pt", weights_only=True)
    assert ("model" in saved) == wrapped
    sd = saved["model"] if wrapped else saved
    assert len(sd) == 1698
    assert all(bool((sd[TRUNK + k] == 1).all()) for k in shapes)
    assert sd["tracker.sam_mask_decoder.p1000"].tolist() == [1000.0, 1000.0]


def test_geometry_convert_refuses(tmp_path):
    shapes = _student_shapes()
    _pretrained(tmp_path / "pre.pt", shapes)
    bad = dict(shapes)
    bad["head.0.weight"] = torch.Size([1024, 7, 1, 1])
    _finetune(tmp_path / "ft.pth", bad)
    with pytest.raises(CheckpointError, match="shape mismatch for .*trunk.model.head.0.weight"):
        convert_geometry(str(tmp_path / "ft.pth"), str(tmp_path / "pre.pt"), str(tmp_path / "o.pt"))
    _finetune(tmp_path / "ft2.pth", {**shapes, "head.9.weight": torch.Size([3])})
    with pytest.raises(CheckpointError, match="has no key .*head.9.weight"):
        convert_geometry(str(tmp_path / "ft2.pth"), str(tmp_path / "pre.pt"), str(tmp_path / "o.pt"))
    torch.save({"model": {"backbone.x": torch.ones(1)}}, tmp_path / "ft3.pth")
    with pytest.raises(CheckpointError, match="no student_trunk"):
        convert_geometry(str(tmp_path / "ft3.pth"), str(tmp_path / "pre.pt"), str(tmp_path / "o.pt"))
    with pytest.raises(CheckpointError, match="--pretrained: file not found"):
        convert_geometry(str(tmp_path / "ft.pth"), str(tmp_path / "none.pt"), str(tmp_path / "o.pt"))
    assert not (tmp_path / "o.pt").exists()


def test_geometry_convert_cli_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--finetune-ckpt", str(tmp_path / "x.pth"), "--pretrained", str(tmp_path / "y.pt"),
              "--output", str(tmp_path / "o.pt")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--finetune-ckpt: file not found" in err
