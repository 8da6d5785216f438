"""Every ``--prompter_conv`` path equals ``nn.Conv3d`` (outputs and gradients), keys are unchanged, flags parse."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stop_tome import fastconv
from stop_tome.fastconv import (
    FIXED_MODES,
    PrompterConv3d,
    conv3d,
    conv3d_fft,
    fft_size,
    prompter_conv,
    set_prompter_conv,
)
from stop_tome.prompts import TemporalPrompt

# STOP's layer shapes (channels, kernels, paddings) on small frames
LAYERS = [
    (3, 9, (3, 11, 11)),  # Conv[0]
    (9, 16, (3, 11, 11)),  # Conv[5]
    (3, 1, (5, 11, 11)),  # Cal_Net
    (1, 9, (3, 15, 25)),  # InterConv[0]
    (9, 1, (3, 15, 25)),  # InterConv[2]
    (1, 1, (5, 11, 11)),  # Cal_Net_Inter
]


def _reference(x, conv: nn.Conv3d):
    return nn.functional.conv3d(x, conv.weight, conv.bias, padding=conv.padding)


@pytest.mark.parametrize("mode", FIXED_MODES)
@pytest.mark.parametrize(("cin", "cout", "k"), LAYERS)
def test_every_mode_equals_native_forward_and_backward(mode, cin, cout, k):
    torch.manual_seed(0)
    pad = tuple((v - 1) // 2 for v in k)
    ref = nn.Conv3d(cin, cout, k, padding=pad).double()
    fast = PrompterConv3d(cin, cout, k, padding=pad).double()
    fast.load_state_dict(ref.state_dict())
    fast.conv_mode = mode
    x = torch.randn(2, cin, 4, 7, 9, dtype=torch.float64)  # T=4 < 5 and H, W < kernel: all padding is exercised
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yf = ref(xr), fast(xf)
    assert yf.shape == yr.shape
    torch.testing.assert_close(yf, yr, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(yr)
    yr.backward(g)
    yf.backward(g)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast.bias.grad, ref.bias.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", FIXED_MODES)
def test_fp32_close_to_native(mode):
    torch.manual_seed(1)
    conv = nn.Conv3d(9, 9, (3, 11, 11), padding=(1, 5, 5))
    x = torch.randn(1, 9, 3, 12, 12)
    torch.testing.assert_close(conv3d(x, conv.weight, conv.bias, conv.padding, mode), _reference(x, conv))


def test_fold2d_matches_hand_written_temporal_sum():
    """Independent of both conv paths: out[t] = sum_dt conv2d(x[t + dt - pt], W[:, :, dt]) with zero frames."""
    torch.manual_seed(2)
    w, b = torch.randn(2, 3, 3, 5, 5, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    x = torch.randn(1, 3, 4, 9, 9, dtype=torch.float64)
    expect = torch.zeros(1, 2, 4, 9, 9, dtype=torch.float64)
    for t in range(4):
        expect[:, :, t] = b[None, :, None, None]
        for dt in range(3):
            src = t + dt - 1
            if 0 <= src < 4:
                expect[:, :, t] += nn.functional.conv2d(x[:, :, src], w[:, :, dt], padding=2)
    torch.testing.assert_close(conv3d(x, w, b, (1, 2, 2), "fold2d"), expect, rtol=1e-10, atol=1e-10)


KERNELS = [(3, 11, 11), (5, 11, 11), (3, 15, 25)]  # every kernel shape STOP uses


@pytest.mark.parametrize("k", KERNELS)
@pytest.mark.parametrize(("cin", "cout", "bias"), [(1, 9, True), (3, 1, False), (9, 16, True), (16, 3, False)])
@pytest.mark.parametrize("size", [(5, 7, 9), (6, 8, 10), (2, 16, 3)])  # odd, even, fewer frames / pixels than taps
def test_fft_equals_conv3d_float64(k, cin, cout, bias, size):
    """Output and input / weight / bias gradients equal ``F.conv3d`` (fp64) to 1e-10, one chunk and one video
    per chunk."""
    gen = torch.Generator().manual_seed(sum(k) + cin * 7 + cout + sum(size))
    pad = tuple((v - 1) // 2 for v in k)
    x = torch.randn(2, cin, *size, dtype=torch.float64, generator=gen)
    w = torch.randn(cout, cin, *k, dtype=torch.float64, generator=gen)
    b = torch.randn(cout, dtype=torch.float64, generator=gen) if bias else None
    leaves = [t.clone().requires_grad_() for t in (x, w, *([b] if bias else []))]
    ref = nn.functional.conv3d(leaves[0], leaves[1], leaves[2] if bias else None, padding=pad)
    g = torch.randn(ref.shape, dtype=torch.float64, generator=gen)
    expect = torch.autograd.grad(ref, leaves, g)
    for chunk in (2**30, 1):
        fl = [t.clone().requires_grad_() for t in leaves]
        out = conv3d_fft(fl[0], fl[1], fl[2] if bias else None, pad, chunk_bytes=chunk)
        assert out.shape == ref.shape and out.dtype == torch.float64 and out.is_contiguous()
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        for got, want in zip(torch.autograd.grad(out, fl, g), expect, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k", KERNELS)
def test_fft_float32_close_to_conv3d(k):
    """fp32 in, fp32 out, within 1e-4 of the fp64 convolution relative to its largest output."""
    gen = torch.Generator().manual_seed(5)
    pad = tuple((v - 1) // 2 for v in k)
    x, w, b = torch.randn(2, 9, 4, 20, 31, generator=gen), torch.randn(9, 9, *k, generator=gen), torch.randn(9)
    out = conv3d_fft(x, w, b, pad)
    ref = nn.functional.conv3d(x.double(), w.double(), b.double(), padding=pad)
    assert out.dtype == torch.float32
    assert (out.double() - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_fft_result_dtype_follows_autocast_and_input():
    """As ``F.conv3d``: the autocast dtype under autocast (not for fp64 inputs), else the input dtype."""
    x, w, b = torch.randn(1, 2, 3, 5, 5), torch.randn(2, 2, 3, 3, 3), torch.randn(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv3d_fft(x, w, b, (1, 1, 1))
        assert out.dtype == nn.functional.conv3d(x, w, b, padding=1).dtype == torch.bfloat16
        assert conv3d_fft(x.double(), w.double(), None, (1, 1, 1)).dtype == torch.float64
    # autocast rounds the operands to bf16 first; then the result is one bf16 rounding of the exact convolution
    ref = nn.functional.conv3d(*(t.bfloat16().double() for t in (x, w)), b.bfloat16().double(), padding=1)
    assert (out.double() - ref).abs().max() <= 2**-8 * ref.abs().max()
    assert conv3d_fft(x.bfloat16(), w.bfloat16(), None, (1, 1, 1)).dtype == torch.bfloat16


def test_fft_sizes_are_cufft_friendly_and_cover_the_taps():
    """2^a 3^b 5^c 7^d, at least size + pad (and kernel, output), even for the rfft axis: STOP's shapes by hand."""
    assert fft_size(224, 11, 5) == 240  # 229 -> 240 = 2^4 3 5
    assert fft_size(49, 15, 7) == 56 and fft_size(49, 11, 5) == 54  # 56 = 2^3 7, 54 = 2 3^3
    assert fft_size(768, 25, 12, even=True) == 784 and fft_size(768, 11, 5, even=True) == 784  # 2^4 7^2
    assert fft_size(3, 15, 7) == 15  # the kernel must fit
    assert fft_size(9, 3, 1, even=True) == 10  # 10 = 2 5; 9 + 1 = 10


def test_state_dict_keys_unchanged_and_plain_conv3d_checkpoint_loads():
    tp = TemporalPrompt(width=8, heads=1, grid=4, patch_size=4, local_prompts=2)
    convs = {n: m for n, m in tp.named_modules() if isinstance(m, nn.Conv3d)}
    assert len(convs) == 8 and all(type(m) is PrompterConv3d for m in convs.values())
    plain = {}
    for name, m in convs.items():  # a checkpoint written by plain nn.Conv3d layers of the same shapes
        ref = nn.Conv3d(m.in_channels, m.out_channels, m.kernel_size, padding=m.padding)
        plain.update({f"{name}.{k}": v for k, v in ref.state_dict().items()})
    own = {k for k in tp.state_dict() if k.rsplit(".", 1)[0] in convs}
    assert set(own) == set(plain)
    missing, unexpected = tp.load_state_dict(plain, strict=False)
    assert not unexpected and not any(k in plain for k in missing)
    assert torch.equal(tp.Conv[0].weight, plain["Conv.0.weight"])


@pytest.mark.parametrize("mode", [*FIXED_MODES, "auto"])
def test_prompter_forward_identical_under_every_mode(mode):
    torch.manual_seed(3)
    tp = TemporalPrompt(width=8, heads=1, grid=4, patch_size=4, local_prompts=2).double().eval()
    video = torch.randn(1, 3, 3, 16, 16, dtype=torch.float64)
    frames = torch.randn(1, 3, 17, 8, dtype=torch.float64)
    with prompter_conv("native"):
        ref, mask = tp(video)
        ref_inter = tp.inter_frame_prompt(frames, mask)
    with prompter_conv(mode):  # auto on CPU = fold2d
        out, mask2 = tp(video)
        inter = tp.inter_frame_prompt(frames, mask2)
    assert torch.equal(mask, mask2)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(inter, ref_inter, rtol=1e-10, atol=1e-10)
    assert fastconv.get_prompter_conv() == "fold2d"  # restored: the suite's CPU default (conftest)


def test_default_is_auto_with_fft_fallback():
    """auto everywhere (CPU: fold2d; CUDA: timed among all fixed paths, fft included); untimed CUDA shapes under
    capture/compile run fft."""
    assert fastconv.DEFAULT_MODE == "auto" and fastconv.AUTO_CPU == "fold2d"
    assert "fft" in FIXED_MODES and fastconv.AUTO_FALLBACK == "fft"
    x, w = torch.randn(1, 3, 3, 8, 8), torch.randn(2, 3, 3, 3, 3)
    assert fastconv._autotune(x, w, None, (1, 1, 1)) == "fold2d"
    assert fastconv._autotune(x.to("meta"), w.to("meta"), None, (1, 1, 1)) == "native"


def test_bad_mode_one_line_error():
    with pytest.raises(ValueError, match="--prompter_conv must be one of"):
        set_prompter_conv("winograd")


def test_flags_parse():
    from stop_tome.benchmark import parse_args as bench_args
    from stop_tome.params import parse_args

    args, _ = parse_args(["--do_eval", "--output_dir", "o", "--prompter_conv", "fold2d"])
    assert args.prompter_conv == "fold2d"
    assert parse_args(["--do_eval", "--output_dir", "o", "--prompter_conv", "fft"])[0].prompter_conv == "fft"
    assert bench_args(["--prompter_conv", "fft"]).prompter_conv == "fft"
    assert parse_args(["--do_eval", "--output_dir", "o"])[0].prompter_conv == "auto"  # default on every device
    assert parse_args(["--do_eval", "--output_dir", "o", "--prompter_conv", "native"])[0].prompter_conv == "native"
    assert bench_args([]).prompter_conv == "auto"
    assert bench_args(["--prompter_conv", "native"]).prompter_conv == "native"
