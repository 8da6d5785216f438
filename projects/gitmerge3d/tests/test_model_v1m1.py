"""PTv3 base (PT-v3m1): key layout and size, serialized pooling by hand, forward/backward with merging."""

import pytest
import torch

from gitmerge3d import merging
from gitmerge3d.models.point_transformer_v3m1 import PTV3_BASE, PointTransformerV3M1, SerializedPooling
from gitmerge3d.models.structure import Point

TINY = dict(
    in_channels=6,
    order=("z", "z-trans", "hilbert", "hilbert-trans"),
    enc_depths=(1, 1, 1, 1, 1),
    enc_channels=(16, 16, 32, 32, 32),
    enc_num_head=(2, 2, 4, 4, 4),
    enc_patch_size=(64,) * 5,
    dec_depths=(1, 1, 1, 1),
    dec_channels=(16, 16, 32, 32),
    dec_num_head=(2, 2, 4, 4),
    dec_patch_size=(64,) * 4,
    drop_path=0.0,
)


def test_ptv3_base_layout():
    with torch.device("meta"):
        model = PointTransformerV3M1(**PTV3_BASE)
    sd = model.state_dict()
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 46.2  # the PTv3 paper's 46.2M
    assert sd["embedding.stem.conv.weight"].shape == (32, 5, 5, 5, 6)
    assert "embedding.stem.norm.running_var" in sd and "enc.enc1.down.norm.0.running_mean" in sd
    assert sd["dec.dec0.up.proj_skip.0.weight"].shape == (64, 32)
    with pytest.raises(ValueError, match="PDNorm"):
        PointTransformerV3M1(pdnorm_bn=True)


def test_serialized_pooling_by_hand():
    # 4 points; codes >> 3 group points {0, 1} and {2, 3}
    grid = torch.tensor([[0, 0, 0], [1, 1, 1], [2, 0, 0], [3, 1, 0]])
    point = Point(feat=torch.tensor([[1.0], [3.0], [5.0], [2.0]]), coord=grid.float(), grid_coord=grid)
    point["offset"] = torch.tensor([4])
    point["batch"] = torch.zeros(4, dtype=torch.long)
    point.serialization(order=["z"])
    pool = SerializedPooling(1, 1, stride=2, shuffle_orders=False)
    with torch.no_grad():
        pool.proj.weight.fill_(1.0)
        pool.proj.bias.zero_()
    out = pool(point)
    assert out["feat"].flatten().tolist() == [3.0, 5.0]  # max per cell
    assert out["grid_coord"].tolist() == [[0, 0, 0], [1, 0, 0]]
    assert out["pooling_inverse"].tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="power of two"):
        SerializedPooling(1, 1, stride=3)


def test_forward_backward_and_merging(make_points):
    torch.manual_seed(0)
    model = PointTransformerV3M1(**TINY)
    pts = make_points(1500)
    pts["feat"] = pts["feat"][:, :6]
    merging.patch(model, {"tome": "patch", "r": 0.8})
    out = model(pts)["feat"]
    out.square().mean().backward()
    assert out.shape == (1500, 16)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert len(merging.layer_records(model)) == 9
