"""Shared fixtures: a tiny fake CIFAR-100 in the official pickle format and one tiny trained checkpoint."""

import json

import numpy as np
import pytest

# A tiny ViT with the real token layout: 112 px / patch 8 = a 14 x 14 grid + class token = 197 tokens, 12 blocks.
TINY_KWARGS = {"patch_size": 8, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2.0}
TINY_ARGS = ["--image_size", "112", "--model_kwargs", json.dumps(TINY_KWARGS)]


def _tiny_config(**changes):
    from freqmerge.config import Config

    base = dict(image_size=112, model_kwargs=dict(TINY_KWARGS), pretrained=False, num_workers=0, batch_size=8)
    base.update(changes)
    return Config(**base)


@pytest.fixture
def tiny_config():
    """Factory: Config of the tiny ViT (changes as keyword arguments)."""
    return _tiny_config


@pytest.fixture
def tiny_args():
    return list(TINY_ARGS)


def _images(rng, n):
    """Smooth blobs plus a few edges, so images are not pure noise."""
    yy, xx = np.mgrid[0:32, 0:32]
    out = np.empty((n, 32, 32, 3), dtype=np.uint8)
    for i in range(n):
        cy, cx = rng.integers(6, 26, size=2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40.0)
        colour = rng.integers(0, 256, size=3)
        img = blob[..., None] * colour[None, None] + rng.normal(0, 8, (32, 32, 3))
        img[:, rng.integers(4, 28)] = 255
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


@pytest.fixture(scope="session")
def fake_cifar(tmp_path_factory):
    from freqmerge.data.cifar100 import write_cifar100

    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    train = (_images(rng, 32), np.arange(32) % 100)
    test = (_images(rng, 16), (np.arange(16) * 7) % 100)
    write_cifar100(str(root), train, test)
    return str(root)


@pytest.fixture(scope="session")
def trained(fake_cifar, tmp_path_factory):
    """One 1-epoch training run through the CLI entry point; returns its output folder."""
    from freqmerge.train import main

    out = tmp_path_factory.mktemp("run")
    args = ["--epochs", "1", "--batch_size", "8", "--data_root", fake_cifar, "--output_dir", str(out)]
    main([*args, "--num_workers", "0", "--no_pretrained", *TINY_ARGS])
    return out
