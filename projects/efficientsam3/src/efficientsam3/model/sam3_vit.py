"""SAM3's ViT image trunk (ViTDet-style, windowed + global attention, 2-D axial RoPE, tiled absolute
position embedding), written for this project in the exact state-dict layout of
`sam3.model.vitdet.ViT` so `detector.backbone.vision_backbone.trunk.*` from `sam3.pt` loads 1:1.

Why our own module and not PyPI `sam3`: the wheel does not import on CPU without four patches and
drags in the whole detector; the trunk is ~300 lines of plain torch. The layout (420 keys for the
full size, including the complex `freqs_cis` buffers) is tested, and the forward is tested against
`sam3.model.vitdet.ViT` when that package is importable.

Two forwards of the same weights. The reference path (`model.fast = False`, and whenever a block is
patched, e.g. by the merged teacher) is SAM3's: RoPE in fp32 from the complex table, windows cut out
and pasted back around every windowed attention. The fast path (default) computes the same function
with fewer memory passes: the residual stream is kept in window-major token order for the whole trunk
(windows are then a free view as the batch axis; the global blocks attend over all tokens in that order
with a RoPE table permuted to match, so there is one reorder in and one out instead of two copies per
windowed block), RoPE runs in the compute dtype from precomputed real cos/sin tables on q and k
together, and q/k/v reach SDPA as strided views (head dim 64, no mask: the flash kernel is eligible).
It equals the reference to rounding (fp32: 1e-5; bf16: RoPE rounding) and compiles with fullgraph."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ViTConfig:
    """Trunk hyper-parameters; the defaults are SAM3's (`_create_vit_backbone`)."""

    img_size: int = 1008
    pretrain_img_size: int = 336
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 32
    num_heads: int = 16
    mlp_ratio: float = 4.625
    window_size: int = 24
    global_att_blocks: tuple[int, ...] = field(default=(7, 15, 23, 31))
    rope_theta: float = 10000.0
    bias_patch_embed: bool = False

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


SAM3_VIT = ViTConfig()
# Reduced size for CPU tests: same structure (windows + global blocks, tiled abs-pos, RoPE).
TINY_VIT = ViTConfig(
    img_size=112, pretrain_img_size=56, embed_dim=32, depth=4, num_heads=2, window_size=4, global_att_blocks=(1, 3)
)


def axial_rope(head_dim: int, side: int, scale: float, theta: float) -> torch.Tensor:
    """Complex rotations (side*side, head_dim/2): the first half rotates by the x position, the second by
    y, each with head_dim/4 frequencies theta^(-4i/head_dim); positions are scaled by `scale`."""
    n = head_dim // 4
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 4)[:n].float() / head_dim)
    idx = torch.arange(side * side, dtype=torch.float32)
    px, py = (idx % side) * scale, torch.div(idx, side, rounding_mode="floor") * scale
    ang = torch.cat([torch.outer(px, inv), torch.outer(py, inv)], dim=-1)
    return torch.polar(torch.ones_like(ang), ang)


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to (..., L, D): channel pairs (2i, 2i+1) are rotated by freqs[:, i] (computed in fp32)."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = xf[..., 0], xf[..., 1]
    cos, sin = freqs.real, freqs.imag
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def rope_tables(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real (L, D) tables for `rotate_fast`: cos repeated per channel pair, sin with the pair's sign
    (-sin on the even channel, +sin on the odd one)."""
    cos, sin = freqs.real.float(), freqs.imag.float()
    return cos.repeat_interleave(2, dim=-1), torch.stack([-sin, sin], dim=-1).flatten(-2)


def rotate_fast(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`rotate` as x*cos + pair_swap(x)*sin in the tables' dtype (the compute dtype after `.to(dtype)`);
    cos / sin broadcast against x. Result in x's dtype."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (x * cos + swapped * sin).to(x.dtype)


def window_major_order(side: int, ws: int) -> torch.Tensor:
    """Raster index of each position of the window-major order (window row, window col, row, col)."""
    n = side // ws
    return torch.arange(side * side).view(n, ws, n, ws).permute(0, 2, 1, 3).flatten()


def to_window_major(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, H*W, C) in window-major order (H, W multiples of ws)."""
    b, h, w, c = x.shape
    return x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h * w, c)


def from_window_major(x: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """(B, H*W, C) in window-major order -> (B, C, H, W) (the trunk's output layout)."""
    b, _, c = x.shape
    return x.view(b, h // ws, w // ws, ws, ws, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(3, cfg.embed_dim, p, stride=p, bias=cfg.bias_patch_embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Attention(nn.Module):
    """qkv -> RoPE on q, k -> SDPA -> proj. `attend` is the one hook the merged teacher replaces."""

    fast_ok = True  # False on patched subclasses (the merged teacher): the model then takes the reference path

    def __init__(self, cfg: ViTConfig, side: int, rope_scale: float, order: torch.Tensor | None = None) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.embed_dim // cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.register_buffer("freqs_cis", axial_rope(self.head_dim, side, rope_scale, cfg.rope_theta))
        # fast path: real tables in the token order the fast path uses (window-major for global blocks);
        # not in the state dict (420 keys kept), rebuilt from freqs_cis after load_state_dict
        self.register_buffer("order", order, persistent=False)
        cos, sin = self._tables()
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh_rope())

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = self.freqs_cis if self.order is None else self.freqs_cis[self.order.to(self.freqs_cis.device)]
        return rope_tables(freqs)

    @torch.no_grad()
    def refresh_rope(self) -> None:
        """Rebuild the fast path's cos/sin from `freqs_cis` (keeping their dtype and device)."""
        cos, sin = self._tables()
        self.rope_cos = cos.to(self.rope_cos)
        self.rope_sin = sin.to(self.rope_sin)

    def _apply(self, fn, recurse=True):
        """Keep the RoPE table complex64 under `.to(dtype)` / `.half()` (which would drop its imaginary
        part); it follows the weights' device only. The reference path's RoPE runs in fp32, as in SAM3; the
        fast path's real cos/sin tables follow `.to(dtype)` like the weights (RoPE in the compute dtype)."""
        freqs = self._buffers.pop("freqs_cis")
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["freqs_cis"] = freqs.to(self.qkv.weight.device)
        return self

    def qkv_rope(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, H, W, C) -> q, k, v as (B, heads, H*W, head_dim), RoPE applied to q and k."""
        b, h, w, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return rotate(q, self.freqs_cis), rotate(k, self.freqs_cis), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        q, k, v = self.qkv_rope(x)
        out = self.attend(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Fast path: (b, n, C) tokens (a window or a whole image in the table's order) -> (b, n, C)."""
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim)
        cos = self.rope_cos.view(n, 1, 1, self.head_dim)
        sin = self.rope_sin.view(n, 1, 1, self.head_dim)
        qk = rotate_fast(qkv[:, :, :2], cos, sin)  # q and k in one pass, (b, n, 2, heads, d)
        q, k, v = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, n, d); flash writes it as (b, n, heads, d)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def window_partition(x: torch.Tensor, ws: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B*nW, ws, ws, C), zero-padding H, W up to multiples of ws."""
    b, h, w, c = x.shape
    ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws, ws, c), (hp, wp)


def window_unpartition(x: torch.Tensor, ws: int, padded: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    hp, wp = padded
    b = x.shape[0] // ((hp // ws) * (wp // ws))
    x = x.view(b, hp // ws, wp // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, : hw[0], : hw[1]]


def fast_layout_ok(cfg: ViTConfig) -> bool:
    """The fast path needs whole windows (no padding)."""
    return cfg.window_size > 0 and cfg.grid % cfg.window_size == 0


class Block(nn.Module):
    fast_ok = True  # see Attention.fast_ok

    def __init__(self, cfg: ViTConfig, window_size: int) -> None:
        super().__init__()
        self.window_size = window_size
        side = window_size if window_size else cfg.grid
        # SAM3 builds RoPE for the window size (scale 1) and interpolates it to the global grid.
        scale = cfg.window_size / side
        order = window_major_order(side, cfg.window_size) if not window_size and fast_layout_ok(cfg) else None
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-5)
        self.attn = Attention(cfg, side, scale, order)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-5)
        self.mlp = Mlp(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size:
            hw = (x.shape[1], x.shape[2])
            x, padded = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(x), self.window_size, padded, hw)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))

    def forward_tokens(self, x: torch.Tensor, windows: int) -> torch.Tensor:
        """Fast path: (B, N, C) in window-major order; `windows` per image (a windowed block attends per
        window: a free view as (B*windows, ws*ws, C))."""
        b, n, c = x.shape
        y = self.norm1(x)
        if self.window_size:
            y = y.view(b * windows, n // windows, c)
        x = x + self.attn.forward_tokens(y).view(b, n, c)
        return x + self.mlp(self.norm2(x))


class SAM3ViT(nn.Module):
    """Image (B, 3, img, img) -> trunk embedding (B, C, grid, grid), before SAM3's FPN neck."""

    def __init__(self, cfg: ViTConfig = SAM3_VIT) -> None:
        super().__init__()
        if cfg.img_size % cfg.patch_size or cfg.embed_dim % (4 * cfg.num_heads):
            raise ValueError("ViTConfig: img_size must be a multiple of patch_size, head_dim a multiple of 4")
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        n_pre = (cfg.pretrain_img_size // cfg.patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pre + 1, cfg.embed_dim))  # + the pretraining cls slot
        self.ln_pre = nn.LayerNorm(cfg.embed_dim, eps=1e-5)
        self.blocks = nn.ModuleList(
            Block(cfg, 0 if i in cfg.global_att_blocks else cfg.window_size) for i in range(cfg.depth)
        )
        self.fast = True  # False: always the reference path (SAM3's op order, fp32 RoPE)
        self.reset_parameters()

    def uses_fast_path(self) -> bool:
        """Fast path when switched on, the windows tile the grid and no block is patched."""
        return (
            self.fast and fast_layout_ok(self.cfg) and all(blk.fast_ok and blk.attn.fast_ok for blk in self.blocks)  # type: ignore[union-attr]
        )

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def embed_size(self) -> int:
        return self.cfg.grid

    @property
    def img_size(self) -> int:
        return self.cfg.img_size

    def abs_pos(self, h: int, w: int) -> torch.Tensor:
        """Drop the cls slot, tile the pretraining grid over (h, w) (SAM3's tile_abs_pos)."""
        pos = self.pos_embed[:, 1:]
        side = int(math.isqrt(pos.shape[1]))
        pos = pos.reshape(1, side, side, -1)
        if side != h or side != w:
            pos = pos.repeat(1, h // side + 1, w // side + 1, 1)[:, :h, :w]
        return pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self.ln_pre(x + self.abs_pos(x.shape[1], x.shape[2]))
        if self.uses_fast_path():
            ws, h, w = self.cfg.window_size, x.shape[1], x.shape[2]
            t = to_window_major(x, ws)
            for blk in self.blocks:
                t = blk.forward_tokens(t, (h // ws) * (w // ws))
            return from_window_major(t, ws, h, w)
        for blk in self.blocks:
            x = blk(x)
        return x.permute(0, 3, 1, 2)


def compile_trunk(model: nn.Module, fullgraph: bool = True) -> nn.Module:
    """torch.compile for export / benchmarks: static shapes, one graph for the whole trunk."""
    return torch.compile(model, fullgraph=fullgraph, dynamic=False)
