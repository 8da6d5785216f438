import pytest
import torch

from efficientsam3.convert import convert, main
from efficientsam3.model.sam3_vit import SAM3_VIT, SAM3ViT
from efficientsam3.model.students import build_student
from efficientsam3.store.cli import main as compact_main
from run_kit import CheckpointError


def _synthetic_sam3(path, n_other=1045):
    """420 trunk keys with SAM3's names (tiny tensors) + 1045 other detector/tracker keys (research notes:
    the image model with the interactive predictor has 1465 entries, 420 of them the trunk)."""
    with torch.device("meta"):
        names = list(SAM3ViT(SAM3_VIT).state_dict())
    sd = {"detector.backbone.vision_backbone.trunk." + k: torch.zeros(1) for k in names}
    for i in range(n_other):
        prefix = "detector.transformer." if i < 700 else "tracker.sam_mask_decoder."
        sd[f"{prefix}p{i}"] = torch.full((1,), float(i))
    torch.save({"model": sd}, path)
    return sd


def _fast_student(name):
    """Real shapes, uninitialised values (initialising 10M head weights is slow on CPU)."""
    with torch.device("meta"):
        ref = build_student(name).state_dict()
    g = torch.Generator().manual_seed(0)
    return {k: torch.empty(v.shape, dtype=v.dtype).random_(0, 100, generator=g) for k, v in ref.items()}


def test_convert_repvit_m1_1_counts(tmp_path, capsys):
    sam3 = _synthetic_sam3(tmp_path / "sam3.pt")
    assert len(sam3) == 1465
    student = _fast_student("repvit_m1_1")
    torch.save({"model": {"module." + k: v for k, v in student.items()},
                "config": {"MODEL": {"BACKBONE": "repvit_m1_1"}}}, tmp_path / "ckpt_epoch_0.pth")  # fmt: skip
    r = main(["--student-ckpt", str(tmp_path / "ckpt_epoch_0.pth"), "--sam3-checkpoint", str(tmp_path / "sam3.pt"),
              "--output", str(tmp_path / "out.pt")])  # fmt: skip
    assert (r["student_keys"], r["trunk_keys_dropped"], r["other_keys_copied"], r["total_keys"]) == (
        653,
        420,
        1045,
        1698,
    )
    assert "Total keys in output: 1698" in capsys.readouterr().out
    out = torch.load(tmp_path / "out.pt", weights_only=True)["model"]
    key = "detector.backbone.vision_backbone.trunk.model.head.0.weight"
    assert torch.equal(out[key], student["head.0.weight"])
    assert out["tracker.sam_mask_decoder.p1000"].item() == 1000.0
    assert not any(k.startswith("detector.backbone.vision_backbone.trunk.blocks") for k in out)


def test_convert_refuses_mismatch(tmp_path):
    _synthetic_sam3(tmp_path / "sam3.pt", 3)
    sd = _fast_student("efficientvit_b0")
    sd["head.0.weight"] = torch.zeros(1024, 7, 1, 1)
    torch.save({"model": sd, "config": {"MODEL": {"BACKBONE": "efficientvit_b0"}}}, tmp_path / "s.pth")
    with pytest.raises(CheckpointError, match="shape mismatch for head.0.weight"):
        convert(str(tmp_path / "s.pth"), str(tmp_path / "sam3.pt"), str(tmp_path / "o.pt"))
    del sd["head.0.weight"]
    torch.save({"model": sd}, tmp_path / "s2.pth")
    with pytest.raises(CheckpointError, match="missing student key"):
        convert(str(tmp_path / "s2.pth"), str(tmp_path / "sam3.pt"), str(tmp_path / "o.pt"), "efficientvit_b0")
    with pytest.raises(CheckpointError, match="no MODEL.BACKBONE"):
        convert(str(tmp_path / "s2.pth"), str(tmp_path / "sam3.pt"), str(tmp_path / "o.pt"))
    with pytest.raises(CheckpointError, match="--sam3-checkpoint: file not found"):
        convert(str(tmp_path / "s.pth"), str(tmp_path / "none.pt"), str(tmp_path / "o.pt"))
    assert not (tmp_path / "o.pt").exists()


def test_compact_store_cli(tmp_path):
    from efficientsam3.store import StoreWriter

    with StoreWriter(tmp_path / "src", 0, 4, 3) as w:
        w.write("a", 1, torch.randn(4, 3, 3))
    fid = compact_main(["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst"), "--format", "uint8"])
    assert fid["records"] == 1 and (tmp_path / "dst" / "fidelity.json").is_file()
