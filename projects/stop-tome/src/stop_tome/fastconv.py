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
- ``auto`` (the default, ``DEFAULT_MODE``): on CUDA, times the fixed paths once per layer shape (first call,
  inputs of that call, forward under no_grad) and keeps the fastest; on CPU ``fold2d`` (oneDNN's CPU Conv3d costs
  ~2 s per call on these kernels whatever the size: a tiny group2-2 train step took 45-70 s native, 11 s fold2d);
  ``native`` elsewhere (meta). Inside CUDA-graph capture or ``torch.compile`` a CUDA shape not yet timed runs
  ``AUTO_FALLBACK`` = ``fold2d``, the H200 winner (2026-12-02, fp16, 16 videos: whole prompter 226 ms native,
  85 ms fold2d, 82 ms auto; per layer fold2d won 6 of 7 layers, padded only ``Conv.0``).

Gradients flow through padding, stacking and slicing, so training sees the same gradients as with ``native``.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

FIXED_MODES = ("native", "channels_last", "padded", "fold2d")
MODES = (*FIXED_MODES, "auto")
CHANNEL_MULTIPLE = 8
DEFAULT_MODE = "auto"  # every device: CPU = fold2d, CUDA = timed per layer shape (H200: 2.8x over native)
AUTO_FALLBACK = "fold2d"  # ``auto`` for untimed shapes where timing is impossible (graph capture, compile): H200 winner
AUTO_CPU = "fold2d"  # what ``auto`` runs on CPU (timing there would cost seconds per native call)
AUTO_WARMUP, AUTO_ITERS = 1, 3

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


_FUNCS = {
    "native": lambda x, w, b, p: F.conv3d(x, w, b, padding=p),
    "channels_last": conv3d_channels_last,
    "padded": conv3d_padded,
    "fold2d": conv3d_fold2d,
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
