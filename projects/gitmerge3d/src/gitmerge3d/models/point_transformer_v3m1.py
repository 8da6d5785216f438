"""Point Transformer V3 base (Pointcept's ``PT-v3m1``) in Pointcept's module and state-dict layout.

Differs from PT-v3m2 (Sonata) where Pointcept's v1m1 differs: a sparse-conv stem (k=5, no bias,
BatchNorm), serialized pooling (codes shifted by 3 bits per halving, reusing the parent's orders)
with BatchNorm, 6 input channels (color, normal), no mask token. Blocks and attention are shared with
``point_transformer_v3m2`` (same keys; v1m1 has no layer scale), so the GitMerge3D adapter applies
unchanged. PDNorm variants are not implemented (a one-line error says so).

Faithful quirk: like Pointcept's v1m1, unpooling adds the coarse features to ``parent.feat`` without
refreshing ``parent.sparse_conv_feat``, so the next block's CPE convolves the skip projection only.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from .modules import PointModule, PointSequential
from .point_transformer_v3m2 import Block
from .pooling import GridUnpooling, segment_reduce
from .ptv3_common import block_kwargs, build_decoder, build_encoder, check_orders, check_stages
from .sparse_conv import SubMConv3d
from .structure import Point


class SerializedPooling(PointModule):
    def __init__(
        self, in_channels, out_channels, stride=2, norm_layer=None, act_layer=None, reduce="max", shuffle_orders=True
    ):
        super().__init__()
        if stride != 2 ** (math.ceil(stride) - 1).bit_length():
            raise ValueError(f"SerializedPooling stride must be a power of two, got {stride}")
        self.stride, self.reduce, self.shuffle_orders, self.traceable = stride, reduce, shuffle_orders, True
        self.proj = nn.Linear(in_channels, out_channels)
        self.norm = PointSequential(norm_layer(out_channels)) if norm_layer is not None else None
        self.act = PointSequential(act_layer()) if act_layer is not None else None

    def forward(self, point: Point) -> Point:
        depth = (math.ceil(self.stride) - 1).bit_length()
        if depth > point["serialized_depth"]:
            depth = 0
        code = point["serialized_code"] >> (depth * 3)
        _, cluster, counts = torch.unique(code[0], sorted=True, return_inverse=True, return_counts=True)
        _, indices = torch.sort(cluster, stable=True)
        indptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, dim=0)])
        head = indices[indptr[:-1]]
        code = code[:, head]
        order = torch.argsort(code, dim=1)
        inverse = torch.empty_like(order).scatter_(
            1, order, torch.arange(code.shape[1], device=code.device).expand_as(order)
        )
        if self.shuffle_orders:
            perm = torch.randperm(code.shape[0])
            code, order, inverse = code[perm], order[perm], inverse[perm]
        pooled = Point(
            feat=segment_reduce(self.proj(point["feat"])[indices], indptr, self.reduce),
            coord=segment_reduce(point["coord"][indices], indptr, "mean"),
            grid_coord=point["grid_coord"][head] >> depth,
            serialized_code=code,
            serialized_order=order,
            serialized_inverse=inverse,
            serialized_depth=point["serialized_depth"] - depth,
            batch=point["batch"][head],
        )
        for key in ("condition", "context"):
            if key in point.keys():
                pooled[key] = point[key]
        pooled["pooling_inverse"] = cluster
        pooled["pooling_parent"] = point
        if self.norm is not None:
            pooled = self.norm(pooled)
        if self.act is not None:
            pooled = self.act(pooled)
        pooled.sparsify()
        return pooled


class SerializedUnpooling(GridUnpooling):
    """GridUnpooling's layers (same keys); forward keeps v1m1's quirk (``sparse_conv_feat`` not refreshed)."""

    def forward(self, point: Point) -> Point:
        if "pooling_parent" not in point.keys() or "pooling_inverse" not in point.keys():
            raise KeyError("SerializedUnpooling needs 'pooling_parent' and 'pooling_inverse'")
        parent = point.pop("pooling_parent")
        inverse = point.pop("pooling_inverse")
        point = self.proj(point)
        parent = self.proj_skip(parent)
        parent["feat"] = parent["feat"] + point["feat"][inverse]
        if self.traceable:
            parent["unpooling_parent"] = point
        return parent


class Embedding(PointModule):
    def __init__(self, in_channels, embed_channels, norm_layer=None, act_layer=None):
        super().__init__()
        self.in_channels, self.embed_channels = in_channels, embed_channels
        self.stem = PointSequential(conv=SubMConv3d(in_channels, embed_channels, 5, bias=False, indice_key="stem"))
        if norm_layer is not None:
            self.stem.add(norm_layer(embed_channels), name="norm")
        if act_layer is not None:
            self.stem.add(act_layer(), name="act")

    def forward(self, point: Point) -> Point:
        if point["feat"].shape[-1] != self.in_channels:
            raise ValueError(f"feat must have {self.in_channels} channels, got {point['feat'].shape[-1]}")
        return self.stem(point)


class PointTransformerV3M1(PointModule):
    """PT-v3m1 (PTv3 base). Keyword names and defaults follow Pointcept."""

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
        pre_norm=True,
        shuffle_orders=True,
        enable_rpe=False,
        enable_flash=True,
        upcast_attention=False,
        upcast_softmax=False,
        cls_mode=False,
        pdnorm_bn=False,
        pdnorm_ln=False,
        pdnorm_decouple=True,
        pdnorm_adaptive=False,
        pdnorm_affine=True,
        pdnorm_conditions=("ScanNet", "S3DIS", "Structured3D"),
    ):
        super().__init__()
        block_kw = block_kwargs(locals())
        if pdnorm_bn or pdnorm_ln:
            raise ValueError("pdnorm_bn / pdnorm_ln (PDNorm, multi-dataset training) are not implemented")
        self.order = check_orders(order)
        enc = dict(enc_depths=enc_depths, enc_channels=enc_channels, enc_num_head=enc_num_head,
                   enc_patch_size=enc_patch_size)  # fmt: skip
        dec = dict(dec_depths=dec_depths, dec_channels=dec_channels, dec_num_head=dec_num_head,
                   dec_patch_size=dec_patch_size)  # fmt: skip
        self.num_stages = check_stages(stride, enc, None if cls_mode else dec)
        self.cls_mode, self.shuffle_orders = cls_mode, shuffle_orders
        bn = partial(nn.BatchNorm1d, eps=1e-3, momentum=0.01)
        act = nn.GELU
        self.embedding = Embedding(in_channels, enc_channels[0], bn, act)

        def down(cin: int, cout: int, s: int) -> nn.Module:
            return SerializedPooling(cin, cout, s, bn, act, shuffle_orders=shuffle_orders)

        def up(cin: int, skip: int, cout: int) -> nn.Module:
            return SerializedUnpooling(cin, skip, cout, bn, act)

        n = len(self.order)
        self.enc = build_encoder(Block, down, enc_depths, enc_channels, enc_num_head, enc_patch_size, stride,
                                 drop_path, n, block_kw)  # fmt: skip
        if not cls_mode:
            self.dec = build_decoder(Block, up, dec_depths, dec_channels, dec_num_head, dec_patch_size,
                                     enc_channels, drop_path, n, block_kw)  # fmt: skip

    def forward(self, data_dict) -> Point:
        point = Point(data_dict)
        point.serialization(order=self.order, shuffle_orders=self.shuffle_orders)
        point.sparsify()
        point = self.embedding(point)
        point = self.enc(point)
        if not self.cls_mode:
            point = self.dec(point)
        return point


# PTv3 base on ScanNet (Pointcept's semseg-pt-v3m1-0-base backbone)
PTV3_BASE = dict(
    in_channels=6,
    order=("z", "z-trans", "hilbert", "hilbert-trans"),
    stride=(2, 2, 2, 2),
    enc_depths=(2, 2, 2, 6, 2),
    enc_channels=(32, 64, 128, 256, 512),
    enc_num_head=(2, 4, 8, 16, 32),
    enc_patch_size=(1024, 1024, 1024, 1024, 1024),
    dec_depths=(2, 2, 2, 2),
    dec_channels=(64, 64, 128, 256),
    dec_num_head=(4, 4, 8, 16),
    dec_patch_size=(1024, 1024, 1024, 1024),
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
