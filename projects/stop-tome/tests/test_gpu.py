"""CUDA checks (``-m gpu``; skipped without a GPU): fp16 merging matches fp32 closely, inductor compiles the adapter,
the never-slower policy decides, and the benchmark runs."""

from __future__ import annotations

import json

import pytest
import torch

from stop_tome.benchmark import main as bench_main
from stop_tome.merging import apply_tome_patch, merge_state
from stop_tome.model import CLIP4Clip, task_config
from stop_tome.testing import tiny_state_dict

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("mode", ["group2-2", "DGL", "none"])
def test_fp16_merging_close_to_fp32(mode):
    model = CLIP4Clip.from_pretrained(tiny_state_dict(), task_config(temporal_prompt=mode, max_frames=4))
    model = model.cuda().eval()
    apply_tome_patch(model, r=2)
    model.merge_policy = "force"
    video = torch.randn(3, 4, 3, 64, 64, device="cuda")
    with torch.no_grad():
        ref = model.get_video_features(video)
        half = model.half().get_video_features(video.half())
    assert merge_state(model).tokens[-1] == (21 if mode != "none" else 17) - 6
    assert (ref - half).abs().max() < 0.05


def test_benchmark_tiny_cuda(tmp_path):
    out = tmp_path / "b.json"
    assert (
        bench_main(
            [
                "--tiny",
                "--device",
                "cuda",
                "--batch",
                "2",
                "--frames",
                "4",
                "--iters",
                "2",
                "--cross_layers",
                "1",
                "--cross_frames",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert all(r["peak_mem_mib"] > 0 and r["videos_per_s"] > 0 for r in rows)
    assert any(r["policy_merged"] is not None for r in rows if r["r"] > 0)


@pytest.mark.parametrize("mode", ["channels_last", "padded", "fold2d", "fft", "auto"])
def test_prompter_conv_paths_match_native_cuda(mode):
    """fp32 without TF32: each prompter conv layer under every --prompter_conv path equals cuDNN's native Conv3d
    (output and input/weight gradients), layer by layer: the whole prompter's top-eta region mask is a threshold,
    so a last-bit difference upstream can flip one patch and is no evidence about the conv paths."""
    from stop_tome.fastconv import PrompterConv3d, clear_auto_cache
    from stop_tome.prompts import TemporalPrompt

    torch.manual_seed(0)
    tp = TemporalPrompt(64, 2, 7, 8, 4).cuda()
    layers = [(n, m) for n, m in tp.named_modules() if isinstance(m, PrompterConv3d)]
    assert len(layers) == 8  # Conv x4, Cal_Net, InterConv x2, Cal_Net_Inter
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for name, layer in layers:
            x = torch.randn(2, layer.in_channels, 4, 30, 34, device="cuda")
            grads = torch.randn(2, layer.out_channels, 4, 30, 34, device="cuda")
            results = []
            for m in ("native", mode):
                clear_auto_cache()
                layer.zero_grad(set_to_none=True)
                inp = x.clone().requires_grad_(True)
                layer.conv_mode = m
                out = layer(inp)
                out.backward(grads)
                results.append((out.detach(), inp.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
            layer.conv_mode = None
            for a, b in zip(*results, strict=True):
                scale = a.abs().max().item()
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * max(scale, 1.0), msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fft_autocast_dtype_and_cuda_graph(dtype):
    """Under autocast fft returns the autocast dtype like cuDNN's Conv3d, within one rounding of it, and replays
    identically from a CUDA graph (cuFFT plans are made in the eager warm-up)."""
    from stop_tome.fastconv import conv3d_fft

    torch.manual_seed(0)
    x = torch.randn(2, 9, 6, 40, 56, device="cuda")
    w, b = torch.randn(16, 9, 3, 11, 11, device="cuda") * 0.05, torch.randn(16, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        ref, out = torch.nn.functional.conv3d(x, w, b, padding=(1, 5, 5)), conv3d_fft(x, w, b, (1, 5, 5))
    assert out.dtype == ref.dtype == dtype
    assert (out.float() - ref.float()).abs().max() <= 2 * torch.finfo(dtype).eps * ref.float().abs().max()
    static = x.clone()
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            eager = conv3d_fft(static, w, b, (1, 5, 5))
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = conv3d_fft(static, w, b, (1, 5, 5))
        static.copy_(torch.randn_like(static))
        graph.replay()
        torch.testing.assert_close(captured, conv3d_fft(static, w, b, (1, 5, 5)))
    assert eager.shape == captured.shape


def test_prompter_bench_tiny_cuda(tmp_path):
    from stop_tome.prompter_bench import main as pb_main

    argv = ["--device", "cuda", "--tiny", "--out_dir", str(tmp_path), "--warmup", "1", "--iters", "2"]
    assert pb_main(argv) == 0
    result = json.loads((tmp_path / "prompter_bench.json").read_text())
    assert all("fwd_ms" in r for r in result["whole_prompter"]) and result["stop_tome_benchmark"]


def test_inductor_compile_matches_eager():
    model = CLIP4Clip.from_pretrained(tiny_state_dict(), task_config(temporal_prompt="DGL", max_frames=4))
    visual = model.cuda().eval().clip.visual
    apply_tome_patch(visual, r=2)
    visual.merge_policy = "force"
    video = torch.randn(2, 4, 3, 64, 64, device="cuda")
    with torch.no_grad():
        _, local = model.encode_prompts()
        local = local[:, None].expand(-1, 2, -1, -1, -1)
        eager, _ = visual(video, local)
        compiled, _ = torch.compile(visual, fullgraph=True)(video, local)
    torch.testing.assert_close(compiled, eager, atol=1e-3, rtol=1e-3)
