"""Sparse convs against a dense conv3d on a scattered grid (independent reference) and spconv if installed."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gitmerge3d.models import sparse_conv as sc


def sparse_input(n=150, size=8, cin=4, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cells = torch.randperm(batch * size**3, generator=g)[:n]
    b = cells // size**3
    rest = cells % size**3
    idx = torch.stack([b, rest // size**2, (rest // size) % size, rest % size], 1).int()
    return sc.SparseTensor(torch.randn(n, cin, generator=g), idx, [size] * 3, batch)


def dense(x: sc.SparseTensor, size: int):
    grid = torch.zeros(x.batch_size, x.features.shape[1], size, size, size)
    i = x.indices.long()
    grid[i[:, 0], :, i[:, 1], i[:, 2], i[:, 3]] = x.features
    return grid


@pytest.mark.parametrize("k", [3, 5])
def test_submanifold_equals_dense_conv(k):
    x = sparse_input()
    conv = sc.SubMConv3d(4, 6, kernel_size=k, indice_key="t")
    torch.nn.init.normal_(conv.bias)
    out = conv(x)
    ref = F.conv3d(dense(x, 8), conv.weight.permute(0, 4, 1, 2, 3), conv.bias, padding=k // 2)
    i = x.indices.long()
    torch.testing.assert_close(out.features, ref[i[:, 0], :, i[:, 1], i[:, 2], i[:, 3]], atol=1e-5, rtol=1e-5)
    assert ("torch", "t", k) in x.cache  # neighbour map reused by later convs with the same key


def test_strided_conv_equals_dense_conv():
    x = sparse_input(size=8)
    conv = sc.SparseConv3d(4, 5, kernel_size=2, stride=2)
    out = conv(x)
    ref = F.conv3d(dense(x, 8), conv.weight.permute(0, 4, 1, 2, 3), conv.bias, stride=2)
    i = out.indices.long()
    torch.testing.assert_close(out.features, ref[i[:, 0], :, i[:, 1], i[:, 2], i[:, 3]], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="kernel_size == stride"):
        sc.SparseConv3d(4, 5, kernel_size=3, stride=2)


def test_backend_switch_errors():
    with pytest.raises(ValueError, match="sparse-conv backend must be one of"):
        sc.set_backend("cuda")


def test_default_backend_is_torch_unless_env_says_otherwise():
    """The H200 run of 2026-12-02 made ``torch`` the default (spconv-triton was slower); the env var still wins."""
    code = "from gitmerge3d.models import sparse_conv as s; print(s.get_backend())"
    env = {k: v for k, v in os.environ.items() if k != "GITMERGE3D_SPCONV"}
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "torch"
    env["GITMERGE3D_SPCONV"] = "auto"
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "auto"


def test_torch_equals_spconv_cpu():
    spconv = pytest.importorskip("spconv.pytorch")
    x = sparse_input()
    conv = sc.SubMConv3d(4, 6, kernel_size=3, indice_key="s")
    ref = conv(x).features
    sc.set_backend("spconv")
    try:
        conv.eval()
        got = conv(sc.SparseTensor(x.features, x.indices, x.spatial_shape, x.batch_size)).features
    finally:
        sc.set_backend(sc.DEFAULT_BACKEND)
    assert spconv is not None
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
