"""CUDA checks (skipped without a GPU: the repository conftest skips tests marked gpu)."""

import json

import pytest
import torch

from freqmerge import benchmark
from freqmerge.models import build_model

pytestmark = pytest.mark.gpu


def test_fp16_autocast_forward_and_backward_on_cuda(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config()).cuda().train()
    x = torch.randn(4, 3, 112, 112, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(x).float().logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_cuda_matches_cpu_in_float32(tiny_config, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 convolutions could flip a merge
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    cpu = build_model(tiny_config()).eval()
    gpu = build_model(tiny_config()).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), atol=1e-3, rtol=1e-3)


def test_benchmark_fp16_small(tmp_path):
    tiny = json.dumps({"patch_size": 8, "embed_dim": 64, "num_heads": 2})
    args = ["--batch-size", "8", "--iters", "2", "--warmup", "1", "--rounds", "1", "--image-size", "112"]
    result = benchmark.run(benchmark.parse_args([*args, "--model-kwargs", tiny, "--out", str(tmp_path / "b.json")]))
    assert result["dtype"] == "float16" and len(result["results"]) == len(benchmark.VARIANTS)


def test_amp_train_and_resume_on_cuda(fake_cifar, tmp_path, tiny_args):
    """AMP training on CUDA writes an enabled GradScaler state, and --resume continues from it."""
    from freqmerge import train

    args = ["--data_root", fake_cifar, "--output_dir", str(tmp_path), "--num_workers", "0", "--no_pretrained",
            "--batch_size", "8", "--max_eval_batches", "1", "--device", "cuda", *tiny_args]  # fmt: skip
    train.main([*args, "--epochs", "1"])
    state = torch.load(tmp_path / "checkpoints/last_model.pth", weights_only=True)
    assert state["scaler"] and state["scaler"]["scale"] > 0 and state["rng"]["cuda"]
    train.main(["--resume", "--output_dir", str(tmp_path), "--epochs", "2", "--device", "cuda"])
    after = torch.load(tmp_path / "checkpoints/last_model.pth", weights_only=True)
    assert after["epoch"] == 2 and after["history"][0] == state["history"][0]
