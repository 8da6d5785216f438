"""Issue 9 target 4 probe: what a per-key float bias (proportional attention's log(size)) costs in each SDPA backend.

Why: the padded-channel path (head dim 64 -> 72) is what keeps proportional attention on FlashAttention today; if
cuDNN's SDPA took a broadcast (B, 1, 1, N) bias at near no-mask speed, it would be the cheaper exact path. Each row
times one backend / mask layout at a ViT attention shape (fp16, CUDA events, median) and checks the result against
an fp32 reference. Run: ``python -m merge_bench.sdpa_bias --out results/`` (about 30 s on an H200).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from merge_core.bench import measure

from .common import DTYPES, device_slug, environment, write_json

# (batch, heads, tokens, head dim): ViT-B bs256 at 197 and at 99 tokens (merged), ViT-L@512 bs32 at 1025 and 545
SHAPES = ((256, 12, 197, 64), (256, 12, 99, 64), (32, 16, 1025, 64), (32, 16, 545, 64), (64, 12, 197, 64))
ALL_BACKENDS = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]
# label -> (backends or None for torch's choice, mask layout or None)
CASES = {
    "default, no mask": (None, None),
    "cudnn, no mask": ([SDPBackend.CUDNN_ATTENTION], None),
    "default, bias (B,1,1,N)": (None, "b11n"),
    "cudnn, bias (B,1,1,N)": ([SDPBackend.CUDNN_ATTENTION], "b11n"),
    "cudnn, bias expanded (B,H,N,N) stride 0": ([SDPBackend.CUDNN_ATTENTION], "expand"),
    "cudnn, bias (B,1,N,N) contiguous": ([SDPBackend.CUDNN_ATTENTION], "b1nn"),
    "efficient, bias (B,1,1,N)": ([SDPBackend.EFFICIENT_ATTENTION], "b11n"),
}


def _mask(bias: torch.Tensor, layout: str | None, heads: int) -> torch.Tensor | None:
    b, _, _, n = bias.shape
    if layout is None:
        return None
    if layout == "b11n":
        return bias
    if layout == "expand":
        return bias.expand(b, heads, n, n)
    return bias.expand(b, 1, n, n).contiguous()


def _mixed_dims(q, k, v, size, layout: str, backends):
    """Proportional attention with unequal head dims (exact maths, copies not counted as free: they are timed).

    ``qk72``: q' = [q, 1/scale, 0...], k' = [k, log s, 0...] (head dim 72), v unpadded (64);
    ``v72``: q, k unpadded, v' = [s v, s, 0...] (72), out = o[..., :D] / o[..., D] = sum s e v / sum s e.
    """
    d = q.shape[-1]
    scale = d**-0.5
    pad = 8
    if layout == "qk72":
        ones = torch.full_like(q[..., :1], 1.0 / scale)
        q2 = torch.cat([q, ones, q.new_zeros(*q.shape[:-1], pad - 1)], dim=-1)
        k2 = torch.cat([k, size.log()[:, None, :, None].expand_as(k[..., :1]), k.new_zeros(*k.shape[:-1], pad - 1)], -1)
        v2 = v
    else:
        s = size[:, None, :, None]
        q2, k2 = q, k
        v2 = torch.cat([v * s, s.expand_as(v[..., :1]), v.new_zeros(*v.shape[:-1], pad - 1)], dim=-1)
    with sdpa_kernel(backends):
        out = F.scaled_dot_product_attention(q2, k2, v2, scale=scale)
    return out if layout == "qk72" else out[..., :d] / out[..., d : d + 1]


def probe_shape(batch: int, heads: int, tokens: int, head_dim: int, device, dtype, warmup: int, iters: int):
    """Rows for one attention shape: q/k/v as strided views of a ViT's qkv output, integer token sizes 1-4."""
    torch.manual_seed(0)
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, device=device, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    size = torch.randint(1, 5, (batch, tokens), device=device).to(dtype)
    bias = size.log()[:, None, None, :]
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias.float())
    rows: list[dict[str, Any]] = []
    for label, (backends, layout) in CASES.items():
        mask = _mask(bias, layout, heads)

        def run(backends=backends, mask=mask):
            if backends is None:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        row: dict[str, Any] = {"shape": [batch, heads, tokens, head_dim], "case": label}
        try:
            out = run()
            row["max_abs_diff"] = None if mask is None else (out.float() - ref).abs().max().item()
            row.update(measure(run, device, warmup, iters))
        except RuntimeError as exc:  # a forced backend may refuse a shape or a mask layout
            row["error"] = str(exc).splitlines()[0][:200]
        rows.append(row)
    for layout in ("qk72", "v72"):  # unequal head dims: does any backend run them near the no-mask speed?
        for name, backends in (("default", ALL_BACKENDS), ("cudnn", [SDPBackend.CUDNN_ATTENTION])):
            row = {"shape": [batch, heads, tokens, head_dim], "case": f"{name}, head dims {layout}"}
            try:
                out = _mixed_dims(q, k, v, size, layout, backends)
                row["max_abs_diff"] = (out.float() - ref).abs().max().item()
                row.update(
                    measure(lambda b=backends, lay=layout: _mixed_dims(q, k, v, size, lay, b), device, warmup, iters)
                )
            except RuntimeError as exc:
                row["error"] = str(exc).splitlines()[0][:200]
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--shapes", default=None, help="e.g. 2x2x16x64,4x2x8x32 (default: the ViT shapes)")
    parser.add_argument("--out", default="results", help="folder for merge-bench-sdpa-bias-<device>.json")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.iters < 1:
        raise ValueError(f"--warmup must be >= 0 and --iters >= 1, got {args.warmup}, {args.iters}")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    shapes = SHAPES
    if args.shapes:
        try:
            shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
        except ValueError:
            raise ValueError(f"--shapes must look like 2x2x16x64,..., got {args.shapes!r}") from None
        if any(len(s) != 4 for s in shapes):
            raise ValueError(f"--shapes must have 4 sizes each (BxHxNxD), got {args.shapes!r}")
    payload: dict[str, Any] = {"suite": "sdpa-bias", "environment": environment(device), "rows": []}
    for shape in shapes:
        for row in probe_shape(*shape, device, dtype, args.warmup, args.iters):
            payload["rows"].append(row)
            shown = f"{row['ms_median']:.4f} ms" if "ms_median" in row else f"error: {row['error']}"
            diff = row.get("max_abs_diff")
            print(f"{'x'.join(map(str, shape)):14s} {row['case']:40s} {shown}  max|diff| {diff}", flush=True)
    write_json(f"{args.out}/merge-bench-sdpa-bias-{device_slug(device)}.json", payload)
    return payload


if __name__ == "__main__":
    main()
