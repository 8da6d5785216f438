"""Exact, faster execution of STOP's prompter Conv3d layers (``--prompter_conv``).

STOP's prompters are Conv3d layers with 1, 3, 9 or 16 channels and 3x11x11 / 5x11x11 / 3x15x25 kernels on raw
224-px frames; on an H200 they took 97% of STOP's GPU time, because such channel counts keep cuDNN off tensor cores.
``PrompterConv3d`` is an ``nn.Conv3d`` (same parameters and state-dict keys, so checkpoints load as before) whose
forward can run one of these mathematically identical paths (only the summation order differs):

- ``native``: ``nn.Conv3d`` as is: STOP's exact op order (bitwise what STOP computes), kept selectable;
- ``channels_last``: the same Conv3d on ``channels_last_3d`` tensors;
- ``padded``: input and output channels zero-padded to a multiple of 8 (zero weights, so the extra outputs are 0
  and are sliced off), channels-last, Conv3d: tensor-core friendly shapes;
- ``fold2d``: the temporal taps folded into channels: each output frame sees its ``kt`` input frames stacked on the
  channel axis (``kt x C`` channels, zero frames at the ends = the temporal zero padding), one Conv2d over all
  ``B x T`` frames with the weight reshaped to ``(O, kt x C, kh, kw)``, channels padded to a multiple of 8,
  channels-last;
- ``fft``: linear convolution through zero-padded real 2-D FFTs over H, W (fp32 / complex64, fp64 for fp64
  inputs); the temporal taps and input channels are contracted per frequency as one batched complex matmul over
  ``kt x C`` (``conv3d_fft``). Its cost hardly depends on the kernel size (11x11, 15x25): the direct paths do
  ``kt x kh x kw`` = 363-1125 MACs per output and input channel on CUDA cores (~17 TFLOP/s on an H200), this one
  moves a few hundred MB of spectra per layer at memory bandwidth;
- ``auto`` (the default, ``DEFAULT_MODE``): on CUDA, times the fixed paths once per layer shape (first call,
  inputs of that call, forward under no_grad) and keeps the fastest; on CPU ``fold2d`` (oneDNN's CPU Conv3d costs
  ~2 s per call on these kernels whatever the size: a tiny group2-2 train step took 45-70 s native, 11 s fold2d);
  ``native`` elsewhere (meta). Inside CUDA-graph capture or ``torch.compile`` a CUDA shape not yet timed runs
  ``AUTO_FALLBACK`` = ``fft``, the measured winner on every STOP layer (H200, 2026-12-02 18:50 UTC, fp16,
  16 videos, cuDNN autotuning on; ``results/stop-tome-prompter-NVIDIA-H200.*``, run 3): per layer forward ms fft
  vs the best other path ``Conv.0`` 3.69 vs 8.09 (padded), ``Conv.1`` 6.80 vs 11.18, ``Conv.5`` 8.42 vs 11.38,
  ``Cal_Net`` 1.59 vs 7.41, ``InterConv.0`` 2.50 vs 6.08, ``InterConv.2`` 2.52 vs 20.66, ``Cal_Net_Inter`` 0.64 vs
  2.45 (fold2d); whole prompter forward 35.85 ms vs 85.06 fold2d and 225.88 native (6.3x), forward + backward
  106.7 vs 265.4 and 573.6 ms (5.4x); ``auto``'s own timing picked ``fft`` for all 7 layer shapes.

Gradients flow through padding, stacking and slicing, so training sees the same gradients as with ``native``.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

FIXED_MODES = ("native", "channels_last", "padded", "fold2d", "fft")
MODES = (*FIXED_MODES, "auto")
CHANNEL_MULTIPLE = 8
DEFAULT_MODE = "auto"  # every device: CPU = fold2d, CUDA = timed per layer shape (H200: 6.3x over native, = fft)
# ``auto`` for untimed shapes where timing is impossible (graph capture, compile): fft won all 7 STOP layer shapes
# on the H200 (whole prompter fwd 35.9 ms vs 85.1 fold2d, 225.9 native; 16 videos, fp16, 2026-12-02)
AUTO_FALLBACK = "fft"
AUTO_CPU = "fold2d"  # what ``auto`` runs on CPU (timing there would cost seconds per native call)
AUTO_WARMUP, AUTO_ITERS = 1, 3
FFT_CHUNK_BYTES = 256 * 2**20  # ``fft``: output spectra per chunk of output frames (bounds the transient memory)

_mode = DEFAULT_MODE
_auto_cache: dict[tuple, str] = {}


def set_prompter_conv(mode: str) -> None:
    """Process-wide execution path of every ``PrompterConv3d`` (a module's own ``conv_mode`` overrides it)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"--prompter_conv must be one of {MODES}, got {mode!r}")
    _mode = mode


def get_prompter_conv() -> str:
    return _mode


@contextlib.contextmanager
def prompter_conv(mode: str) -> Iterator[None]:
    """Temporarily run every ``PrompterConv3d`` with ``mode`` (e.g. ``native`` for exact FLOP counting)."""
    old = _mode
    set_prompter_conv(mode)
    try:
        yield
    finally:
        set_prompter_conv(old)


def auto_choices() -> dict[str, str]:
    """What ``auto`` picked so far: ``"<input shape> w<weight shape> <dtype>" -> mode``."""
    return {f"x{list(k[1])} w{list(k[2])} {k[4]}": v for k, v in _auto_cache.items()}


def clear_auto_cache() -> None:
    _auto_cache.clear()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_weight(weight: torch.Tensor, out_p: int, in_p: int) -> torch.Tensor:
    """Zero-pad dims 0 (out) and 1 (in) of a conv weight; differentiable (the real block gets the gradient)."""
    o, i = weight.shape[:2]
    if (o, i) == (out_p, in_p):
        return weight
    pad = [0, 0] * (weight.dim() - 2) + [0, in_p - i, 0, out_p - o]
    return F.pad(weight, pad)


def _bias(bias: torch.Tensor | None, out_p: int) -> torch.Tensor | None:
    return None if bias is None else F.pad(bias, (0, out_p - bias.shape[0]))


def conv3d_channels_last(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding) -> torch.Tensor:
    cl = torch.channels_last_3d
    return F.conv3d(x.contiguous(memory_format=cl), weight.contiguous(memory_format=cl), bias, padding=padding)


def conv3d_padded(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding, multiple: int = CHANNEL_MULTIPLE
) -> torch.Tensor:
    """Channels padded with zeros to ``multiple``, channels-last Conv3d, extra output channels sliced off."""
    o, c = weight.shape[:2]
    op, cp = _round_up(o, multiple), _round_up(c, multiple)
    cl = torch.channels_last_3d
    # (B, T, H, W, C) -> pad C -> logical (B, C, T, H, W) view with channels-last strides
    xp = F.pad(x.permute(0, 2, 3, 4, 1), (0, cp - c)).permute(0, 4, 1, 2, 3)
    wp = _pad_weight(weight, op, cp).contiguous(memory_format=cl)
    out = F.conv3d(xp.contiguous(memory_format=cl), wp, _bias(bias, op), padding=padding)
    return out[:, :o]


def conv3d_fold2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding, multiple: int = CHANNEL_MULTIPLE
) -> torch.Tensor:
    """Temporal taps folded into channels: one channels-last Conv2d over all ``B x T_out`` frames."""
    b, c, t = x.shape[:3]
    o, _, kt, kh, kw = weight.shape
    pt, ph, pw = padding
    t_out = t + 2 * pt - kt + 1
    k = kt * c
    kp, op = _round_up(k, multiple), _round_up(o, multiple)
    frames = F.pad(x.permute(0, 2, 3, 4, 1), (0, 0, 0, 0, 0, 0, pt, pt))  # (B, T + 2pt, H, W, C), zero frames
    # stacked[b, t, h, w, dt * C + c] = frames[b, t + dt, h, w, c]
    parts = [frames[:, dt : dt + t_out] for dt in range(kt)]
    if kp > k:
        parts.append(frames.new_zeros(*frames.shape[:1], t_out, *frames.shape[2:4], kp - k))
    stacked = torch.cat(parts, dim=-1).flatten(0, 1).permute(0, 3, 1, 2)  # (B*T_out, Kp, H, W), channels-last
    w2 = weight.permute(0, 2, 1, 3, 4).reshape(o, k, kh, kw)  # channel index dt * C + c, as stacked
    w2 = _pad_weight(w2, op, kp).contiguous(memory_format=torch.channels_last)
    out = F.conv2d(stacked, w2, _bias(bias, op), padding=(ph, pw))  # (B*T_out, Op, H', W')
    out = out[:, :o].unflatten(0, (b, t_out))  # (B, T_out, O, H', W')
    return out.permute(0, 2, 1, 3, 4)


def _smooth(n: int, even: bool = False) -> int:
    """The smallest m >= n with no prime factor above 7 (cuFFT's fast radices 2, 3, 5, 7), even if ``even``."""
    m = max(n, 1)
    while True:
        rest = m
        for p in (2, 3, 5, 7):
            while rest % p == 0:
                rest //= p
        if rest == 1 and not (even and m % 2):
            return m
        m += 1


def fft_size(size: int, k: int, pad: int, even: bool = False) -> int:
    """FFT length at which circular correlation equals the zero-padded linear one on every output.

    The kernel is placed rolled by ``-pad``, so output ``i`` reads inputs ``i - pad .. i - pad + k - 1`` (mod n):
    indices below 0 wrap to ``n - pad ..`` and must land past the input (``n >= size + pad``), the largest index
    ``out + k - 1 - pad - 1`` must not wrap, and kernel and output must fit. For "same" padding that is
    ``size + pad`` (e.g. 224 + 5 -> 240), one ``pad`` shorter than the full ``size + k - 1``.
    """
    out = size + 2 * pad - k + 1
    return _smooth(max(size + pad, out + k - 1 - pad, k, out), even)


def _result_dtype(x: torch.Tensor) -> torch.dtype:
    """What ``F.conv3d`` returns for ``x``: the autocast dtype where autocast would cast ``x``, else ``x.dtype``."""
    dev = x.device.type
    if x.dtype != torch.float64 and x.is_floating_point() and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def conv3d_fft(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding,
    chunk_bytes: int = FFT_CHUNK_BYTES,
) -> torch.Tensor:
    """Conv3d (cross-correlation, zero padding) through real 2-D FFTs over H, W; taps over T in the spectrum.

    ``out[b, o, t] = sum_{dt, c} corr2d(x[b, c, t + dt - pt], w[o, c, dt])``; per frequency ``f`` of the rfft2
    that is ``Y[f, (b, t), o] = sum_{(dt, c)} X[f, b, c, t + dt] conj(W[f, o, c, dt])`` (``conj``: correlation,
    not convolution; ``X`` with ``pt`` zero frames at both ends) - one batched complex matmul over ``kt x C``.
    fp32 / complex64 (fp64 / complex128 for fp64 inputs) on the operands as ``F.conv3d`` would see them (rounded
    to the autocast dtype under autocast), result in the dtype ``F.conv3d`` would give. Output
    spectra are made per chunk of videos of at most ``chunk_bytes`` (transient memory), then inverse-transformed.

    Why it is fast for STOP (16 videos x 12 frames, fp16, H200): the direct paths do ``kt kh kw`` (363-1125) MACs
    per output pixel and channel pair on CUDA cores (~17 TFLOP/s); here each layer moves its spectra (input
    ``B C (T + 2pt)``, stacked ``B T kt C`` and output ``B T O`` planes of ``n1 x (n2 / 2 + 1)`` complex64; Conv.5
    at 240 x 121: 0.5, 1.2 and 0.7 GB) a few times at memory bandwidth: measured 0.64-8.4 ms per layer (est.
    0.4-6) instead of 2.5-21 ms for the best direct path (H200, 2026-12-02). Autograd saves the stacked spectra
    (``kt x`` the input spectra) for the weight gradient: whole-prompter training peak 10.2 GiB at 16 videos
    (fold2d 7.2, native 4.2).
    """
    b, c, t, h, w = x.shape
    o, _, kt, kh, kw = weight.shape
    pt, ph, pw = padding
    t_out, h_out, w_out = t + 2 * pt - kt + 1, h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    n1, n2 = fft_size(h, kh, ph), fft_size(w, kw, pw, even=True)
    nf = n1 * (n2 // 2 + 1)
    out_dtype = _result_dtype(x)
    real = torch.float64 if x.dtype == torch.float64 else torch.float32
    # the operands rounded as F.conv3d sees them (autocast casts x, weight and bias), then transformed in fp32
    x, weight = x.to(out_dtype), weight.to(out_dtype)
    bias = None if bias is None else bias.to(out_dtype)
    with torch.autocast(x.device.type, enabled=False):
        # weight spectra, kernel rolled by -pad (output i reads inputs i - pad ..), conjugated: (F, kt x C, O)
        wpad = F.pad(weight.to(real), (0, n2 - kw, 0, n1 - kh)).roll((-ph, -pw), dims=(-2, -1))
        ws = torch.fft.rfft2(wpad).conj().permute(3, 4, 2, 1, 0).reshape(nf, kt * c, o).resolve_conj()
        # input spectra with pt zero frames at both ends (zero frames transform to zero): (B, C, T + 2pt, n1, n2h)
        xs = torch.fft.rfft2(F.pad(x.to(real), (0, n2 - w, 0, n1 - h, pt, pt)))
        per_video = nf * t_out * max(kt * c, o) * xs.element_size()
        step = max(1, min(b, chunk_bytes // per_video))
        chunks = []
        for b0 in range(0, b, step):
            bc = min(b, b0 + step) - b0
            # stacked[f, (b, t), (dt, c)] = X[b, c, t + dt, f]: the frames each output frame reads, one copy
            stacked = xs[b0 : b0 + bc].unfold(2, kt, 1).permute(3, 4, 0, 2, 5, 1).reshape(nf, bc * t_out, kt * c)
            ys = torch.bmm(stacked, ws).view(n1, n2 // 2 + 1, bc, t_out, o)
            # inverse over the leading frequency dims: cuFFT reads the (bc, T, O) batch interleaved (stride 1), so
            # the spectra need no transposing copy; its output is batch-major (bc, T, O, n1, n2)
            y = torch.fft.irfft2(ys, s=(n1, n2), dim=(0, 1)).permute(2, 4, 3, 0, 1)[..., :h_out, :w_out].contiguous()
            if bias is not None:
                y = y + bias.to(real).view(1, o, 1, 1, 1)
            chunks.append(y.to(out_dtype))
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=0)


_FUNCS = {
    "native": lambda x, w, b, p: F.conv3d(x, w, b, padding=p),
    "channels_last": conv3d_channels_last,
    "padded": conv3d_padded,
    "fold2d": conv3d_fold2d,
    "fft": conv3d_fft,
}


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding, mode: str) -> torch.Tensor:
    """Stride-1, dilation-1, zero-padded Conv3d by ``mode`` (one of ``FIXED_MODES``)."""
    if mode not in _FUNCS:
        raise ValueError(f"prompter conv mode must be one of {FIXED_MODES}, got {mode!r}")
    return _FUNCS[mode](x, weight, bias, tuple(padding))


def _in_capture_or_compile() -> bool:
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)()
    return bool(compiling) or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _autotune(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding) -> str:
    """The fastest fixed mode for this (device, input shape, weight shape, padding, dtype), timed once on CUDA."""
    if x.device.type != "cuda":
        return AUTO_CPU if x.device.type == "cpu" else "native"
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    key = (str(x.device), tuple(x.shape), tuple(weight.shape), tuple(padding), str(dtype).replace("torch.", ""))
    if key in _auto_cache:
        return _auto_cache[key]
    if _in_capture_or_compile():
        return AUTO_FALLBACK
    times: dict[str, float] = {}
    with torch.no_grad():
        xd, wd = x.detach(), weight.detach()
        bd = None if bias is None else bias.detach()
        for mode in FIXED_MODES:
            for _ in range(AUTO_WARMUP):  # cuDNN's own autotuning (cudnn.benchmark) happens here
                conv3d(xd, wd, bd, padding, mode)
            runs = []
            for _ in range(AUTO_ITERS):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                conv3d(xd, wd, bd, padding, mode)
                end.record()
                end.synchronize()
                runs.append(start.elapsed_time(end))
            times[mode] = statistics.median(runs)
    _auto_cache[key] = min(times, key=times.get)
    return _auto_cache[key]


class PrompterConv3d(nn.Conv3d):
    """``nn.Conv3d`` (same parameters, state-dict keys and ``repr``) with a switchable execution path.

    ``conv_mode`` = None follows ``set_prompter_conv``; a mode name pins this layer. Only stride 1, dilation 1,
    groups 1, zero padding are rerouted (STOP's layers); anything else runs natively.
    """

    conv_mode: str | None = None

    def _reroutable(self) -> bool:
        return (
            self.stride == (1, 1, 1)
            and self.dilation == (1, 1, 1)
            and self.groups == 1
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.conv_mode or _mode
        if mode == "native" or not self._reroutable():
            return super().forward(x)
        if mode == "auto":
            mode = _autotune(x, self.weight, self.bias, self.padding)
        return conv3d(x, self.weight, self.bias, self.padding, mode)
