"""Point Transformer V3 mode 2 (Sonata's backbone) in Pointcept's module and state-dict layout.

Same submodule names as Pointcept's ``PT-v3m2`` so ``sonata.pth`` and Pointcept checkpoints load
strictly. Differences that do not touch the weights:
- attention goes through ``F.scaled_dot_product_attention`` over equal-size serialized patches
  (K = min(smallest sample, patch_size), duplicate padding as Pointcept's non-flash path); on CUDA in
  fp16/bf16 SDPA picks a FlashAttention kernel, so ``enable_flash`` needs no flash-attn package;
- sparse convs come from ``sparse_conv`` (pure torch / spconv-triton / spconv), pooling from
  ``torch.segment_reduce``.
Merging is not here: ``gitmerge3d.merging`` swaps the attention class (``attend``) when enabled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import trunc_normal_

from .modules import PointModule, PointSequential
from .pooling import GridPooling, GridUnpooling
from .ptv3_common import block_kwargs, build_decoder, build_encoder, check_orders, check_stages
from .sparse_conv import SubMConv3d
from .structure import PATCH_ORDER_PREFIX, Point, offset2bincount


class DropPath(nn.Module):
    """Stochastic depth per sample (point clouds: per point row, as timm's DropPath on (N, C))."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class RPE(nn.Module):
    """Pointcept's relative position bias table (only with enable_rpe)."""

    def __init__(self, patch_size: int, num_heads: int):
        super().__init__()
        self.pos_bnd = int((4 * patch_size) ** (1 / 3) * 2)
        self.rpe_num = 2 * self.pos_bnd + 1
        self.rpe_table = nn.Parameter(torch.zeros(3 * self.rpe_num, num_heads))
        trunc_normal_(self.rpe_table, std=0.02)

    def forward(self, rel: torch.Tensor) -> torch.Tensor:
        idx = rel.clamp(-self.pos_bnd, self.pos_bnd) + self.pos_bnd
        idx = idx + torch.arange(3, device=rel.device) * self.rpe_num
        out = self.rpe_table.index_select(0, idx.reshape(-1)).view(*idx.shape, -1).sum(3)
        return out.permute(0, 3, 1, 2)  # (N', H, K, K)


def patch_padding(offset: torch.Tensor, k: int):
    """Pointcept's duplicate padding to a multiple of ``k`` per sample: (pad, unpad) index maps."""
    counts = offset2bincount(offset).tolist()
    pad_parts, unpad_parts = [], []
    start = start_pad = 0
    for n in counts:
        n_pad = -(-n // k) * k if n > k else n
        idx = torch.arange(n_pad, device=offset.device)
        if n_pad != n:
            rem = n % k
            # padded slots copy the slots one patch earlier
            idx[n_pad - k + rem : n_pad] = idx[n_pad - 2 * k + rem : n_pad - k].clone()
        pad_parts.append(idx + start)
        unpad_parts.append(torch.arange(n, device=offset.device) + start_pad)
        start += n
        start_pad += n_pad
    return torch.cat(pad_parts), torch.cat(unpad_parts)


class SerializedAttention(PointModule):
    def __init__(
        self,
        channels: int,
        num_heads: int,
        patch_size: int,
        qkv_bias: bool = True,
        qk_scale=None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        order_index: int = 0,
        enable_rpe: bool = False,
        enable_flash: bool = True,
        upcast_attention: bool = True,
        upcast_softmax: bool = True,
    ):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.channels, self.num_heads = channels, num_heads
        self.scale = qk_scale or (channels // num_heads) ** -0.5
        self.order_index = order_index
        self.patch_size_max = patch_size
        self.patch_size = patch_size
        self.enable_rpe, self.enable_flash = enable_rpe, enable_flash
        self.upcast_attention, self.upcast_softmax = upcast_attention, upcast_softmax
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(channels, channels * 3, bias=qkv_bias)
        self.proj = nn.Linear(channels, channels)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rpe = RPE(patch_size, num_heads) if enable_rpe else None

    def patches(self, point: Point):
        """(order, inverse, K): serialized order with duplicate padding, its inverse, patch size."""
        if "min_bincount" not in point.keys():  # one host sync per Point, not per block
            point["min_bincount"] = int(offset2bincount(point["offset"]).min().item())
        k = min(point["min_bincount"], self.patch_size_max)
        self.patch_size = k
        key = f"pad_unpad_{k}"
        if key not in point.keys():
            point[key] = patch_padding(point["offset"], k)
        # every block of a stage with the same order index reuses the same padded order (cached per
        # Point; ``Point.serialization`` drops these entries when it re-serializes)
        cache_key = f"{PATCH_ORDER_PREFIX}{self.order_index}_{k}"
        if cache_key not in point.keys():
            pad, unpad = point[key]
            order = point["serialized_order"][self.order_index][pad]
            inverse = unpad[point["serialized_inverse"][self.order_index]]
            point[cache_key] = (order, inverse)
        order, inverse = point[cache_key]
        return order, inverse, k

    def rel_pos_bias(self, point: Point, order: torch.Tensor, k: int) -> torch.Tensor | None:
        if self.rpe is None:
            return None
        grid = point["grid_coord"][order].reshape(-1, k, 3)
        return self.rpe(grid.unsqueeze(2) - grid.unsqueeze(1))

    def attend(self, q, k, v, bias, point: Point) -> torch.Tensor:
        """Attention inside each patch: q, k, v (N', H, K, D) -> (N', H, K, D). Merging overrides this."""
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )

    def forward(self, point: Point) -> Point:
        order, inverse, k = self.patches(point)
        h, c = self.num_heads, self.channels
        qkv = self.qkv(point["feat"])[order]
        q, kk, v = qkv.reshape(-1, k, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
        dtype = v.dtype
        if self.upcast_attention or self.upcast_softmax:
            q, kk, v = q.float(), kk.float(), v.float()
        bias = self.rel_pos_bias(point, order, k)
        if bias is not None:
            bias = bias.to(q.dtype)
        feat = self.attend(q, kk, v, bias, point).to(dtype)
        feat = feat.transpose(1, 2).reshape(-1, c)[inverse]
        point["feat"] = self.proj_drop(self.proj(feat))
        return point


class MLP(nn.Module):
    def __init__(self, in_channels, hidden_channels=None, out_channels=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden_channels or in_channels)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_channels or in_channels, out_channels or in_channels)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(PointModule):
    def __init__(
        self,
        channels,
        num_heads,
        patch_size=48,
        mlp_ratio=4.0,
        qkv_bias=True,
        qk_scale=None,
        attn_drop=0.0,
        proj_drop=0.0,
        drop_path=0.0,
        layer_scale=None,
        norm_layer=nn.LayerNorm,
        act_layer=nn.GELU,
        pre_norm=True,
        order_index=0,
        cpe_indice_key=None,
        enable_rpe=False,
        enable_flash=True,
        upcast_attention=True,
        upcast_softmax=True,
    ):
        super().__init__()
        self.channels, self.pre_norm = channels, pre_norm
        self.cpe = PointSequential(
            SubMConv3d(channels, channels, kernel_size=3, bias=True, indice_key=cpe_indice_key),
            nn.Linear(channels, channels),
            norm_layer(channels),
        )
        self.norm1 = PointSequential(norm_layer(channels))
        self.ls1 = PointSequential(LayerScale(channels, layer_scale) if layer_scale is not None else nn.Identity())
        self.attn = SerializedAttention(
            channels=channels,
            num_heads=num_heads,
            patch_size=patch_size,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            order_index=order_index,
            enable_rpe=enable_rpe,
            enable_flash=enable_flash,
            upcast_attention=upcast_attention,
            upcast_softmax=upcast_softmax,
        )
        self.norm2 = PointSequential(norm_layer(channels))
        self.ls2 = PointSequential(LayerScale(channels, layer_scale) if layer_scale is not None else nn.Identity())
        self.mlp = PointSequential(
            MLP(channels, int(channels * mlp_ratio), channels, act_layer=act_layer, drop=proj_drop)
        )
        self.drop_path = PointSequential(DropPath(drop_path) if drop_path > 0.0 else nn.Identity())

    def forward(self, point: Point) -> Point:
        shortcut = point["feat"]
        point = self.cpe(point)
        point["feat"] = shortcut + point["feat"]
        shortcut = point["feat"]
        if self.pre_norm:
            point = self.norm1(point)
        point = self.drop_path(self.ls1(self.attn(point)))
        point["feat"] = shortcut + point["feat"]
        if not self.pre_norm:
            point = self.norm1(point)
        shortcut = point["feat"]
        if self.pre_norm:
            point = self.norm2(point)
        point = self.drop_path(self.ls2(self.mlp(point)))
        point["feat"] = shortcut + point["feat"]
        if not self.pre_norm:
            point = self.norm2(point)
        point["sparse_conv_feat"] = point["sparse_conv_feat"].replace_feature(point["feat"])
        return point


class Embedding(PointModule):
    def __init__(self, in_channels, embed_channels, norm_layer=None, act_layer=None, mask_token=False):
        super().__init__()
        self.in_channels, self.embed_channels = in_channels, embed_channels
        self.stem = PointSequential(linear=nn.Linear(in_channels, embed_channels))
        if norm_layer is not None:
            self.stem.add(norm_layer(embed_channels), name="norm")
        if act_layer is not None:
            self.stem.add(act_layer(), name="act")
        self.mask_token = nn.Parameter(torch.zeros(1, embed_channels)) if mask_token else None

    def forward(self, point: Point) -> Point:
        if point["feat"].shape[-1] != self.in_channels:
            raise ValueError(f"feat must have {self.in_channels} channels, got {point['feat'].shape[-1]}")
        point = self.stem(point)
        if "mask" in point.keys() and self.mask_token is not None:
            point["feat"] = torch.where(
                point["mask"].unsqueeze(-1), self.mask_token.to(point["feat"].dtype), point["feat"]
            )
        return point


class PointTransformerV3(PointModule):
    """PT-v3m2. Keyword names and defaults follow Pointcept; Sonata's values come from its config."""

    def __init__(
        self,
        in_channels=6,
        order=("z", "z-trans"),
        stride=(2, 2, 2, 2),
        enc_depths=(2, 2, 2, 6, 2),
        enc_channels=(32, 64, 128, 256, 512),
        enc_num_head=(2, 4, 8, 16, 32),
        enc_patch_size=(48, 48, 48, 48, 48),
        dec_depths=(2, 2, 2, 2),
        dec_channels=(64, 64, 128, 256),
        dec_num_head=(4, 4, 8, 16),
        dec_patch_size=(48, 48, 48, 48),
        mlp_ratio=4,
        qkv_bias=True,
        qk_scale=None,
        attn_drop=0.0,
        proj_drop=0.0,
        drop_path=0.3,
        layer_scale=None,
        pre_norm=True,
        shuffle_orders=True,
        enable_rpe=False,
        enable_flash=True,
        upcast_attention=False,
        upcast_softmax=False,
        traceable=False,
        mask_token=False,
        enc_mode=False,
        freeze_encoder=False,
    ):
        super().__init__()
        block_kw = block_kwargs(locals())
        self.order = check_orders(order)
        enc = dict(enc_depths=enc_depths, enc_channels=enc_channels, enc_num_head=enc_num_head,
                   enc_patch_size=enc_patch_size)  # fmt: skip
        dec = dict(dec_depths=dec_depths, dec_channels=dec_channels, dec_num_head=dec_num_head,
                   dec_patch_size=dec_patch_size)  # fmt: skip
        self.num_stages = check_stages(stride, enc, None if enc_mode else dec)
        self.shuffle_orders, self.enc_mode, self.freeze_encoder = shuffle_orders, enc_mode, freeze_encoder
        ln, act = nn.LayerNorm, nn.GELU
        self.embedding = Embedding(in_channels, enc_channels[0], ln, act, mask_token)

        def down(cin: int, cout: int, s: int) -> nn.Module:
            return GridPooling(cin, cout, s, ln, act, shuffle_orders=shuffle_orders)

        def up(cin: int, skip: int, cout: int) -> nn.Module:
            return GridUnpooling(cin, skip, cout, ln, act, traceable)

        n = len(self.order)
        self.enc = build_encoder(Block, down, enc_depths, enc_channels, enc_num_head, enc_patch_size, stride,
                                 drop_path, n, block_kw)  # fmt: skip
        if not enc_mode:
            self.dec = build_decoder(Block, up, dec_depths, dec_channels, dec_num_head, dec_patch_size,
                                     enc_channels, drop_path, n, block_kw)  # fmt: skip
        self.apply(self._init_weights)
        if freeze_encoder:
            for p in list(self.embedding.parameters()) + list(self.enc.parameters()):
                p.requires_grad = False

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, SubMConv3d)):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, data_dict) -> Point:
        point = Point(data_dict)
        point = self.embedding(point)
        point.serialization(order=self.order, shuffle_orders=self.shuffle_orders)
        point.sparsify()
        point = self.enc(point)
        if not self.enc_mode:
            point = self.dec(point)
        return point


# Sonata (PT-v3m2 pretraining) backbone settings, as in Sonata's released config.
SONATA_ENCODER = dict(
    in_channels=9,
    order=("z", "z-trans", "hilbert", "hilbert-trans"),
    stride=(2, 2, 2, 2),
    enc_depths=(3, 3, 3, 12, 3),
    enc_channels=(48, 96, 192, 384, 512),
    enc_num_head=(3, 6, 12, 24, 32),
    enc_patch_size=(1024, 1024, 1024, 1024, 1024),
    mlp_ratio=4,
    qkv_bias=True,
    drop_path=0.3,
    shuffle_orders=True,
    pre_norm=True,
    enable_rpe=False,
    enable_flash=True,
    upcast_attention=False,
    upcast_softmax=False,
)
SONATA_DECODER = dict(
    dec_depths=(2, 2, 2, 2),
    dec_channels=(64, 96, 192, 384),
    dec_num_head=(4, 6, 12, 24),
    dec_patch_size=(1024, 1024, 1024, 1024),
)


def sonata_config(variant: str = "0c", **overrides) -> dict:
    """Backbone kwargs: '0a' (encoder only, linear probe), '0b'/'0c' (encoder + decoder), 'pretrain'."""
    if variant not in ("0a", "0b", "0c", "pretrain"):
        raise ValueError(f"variant must be '0a', '0b', '0c' or 'pretrain', got {variant!r}")
    cfg = dict(SONATA_ENCODER)
    if variant in ("0a", "pretrain"):
        cfg.update(enc_mode=True, mask_token=variant == "pretrain")
    else:
        cfg.update(SONATA_DECODER, enc_mode=False, freeze_encoder=variant == "0b")
    cfg.update(overrides)
    return cfg
