"""MACs, latency and peak memory of a PT-v3m2 forward, merged or not.

- Attention MACs follow the paper's "GFLOPs" (fvcore on the attention modules, which counts one
  multiply-add as one FLOP): qkv and proj linears, the QK^T and AV matmuls on the (merged) patches,
  and the matcher's similarity matmul; softmax, gathers and scatters are not counted.
- Whole-model MACs add every other Linear and the sparse convs (active neighbour pairs x Cin x Cout);
  norms, activations and pooling reductions are not counted.
Counts come from forward hooks on one real forward, so they follow the actual patch sizes, padding,
weighted_patch groups and the tokens each merge kept.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .merging import MergedSerializedAttention, merge_state
from .models.point_transformer_v3m2 import SerializedAttention
from .models.sparse_conv import SparseTensor, SubMConv3d, submanifold_neighbors


@dataclass
class MacCount:
    attention: int = 0  # paper-style attention-module MACs (linears + matmuls + similarity)
    attention_linear: int = 0  # qkv + proj
    attention_matmul: int = 0  # QK^T + AV
    similarity: int = 0  # the matcher's source x destination cosine matmul
    linear_other: int = 0
    sparse_conv: int = 0
    per_block: list[tuple[str, int]] = field(default_factory=list)

    @property
    def whole_model(self) -> int:
        return self.attention + self.linear_other + self.sparse_conv


def _attention_matmul_macs(module: SerializedAttention, point, record) -> tuple[int, int]:
    """(QK^T + AV MACs, similarity MACs) of one attention call."""
    k = module.patch_size
    h, d = module.num_heads, module.channels // module.num_heads
    counts = torch.diff(point["offset"], prepend=point["offset"].new_zeros(1)).tolist()
    patches = sum(-(-n // k) if n > k else 1 for n in counts)
    if record is None:
        return 2 * patches * h * k * k * d, 0
    matmul = sim = 0
    for kept, group, stride in zip(record.kept, record.group_patches, record.strides, strict=True):
        n_bins = k // stride
        sim += group * h * (k - n_bins) * n_bins * d if kept < k else 0
        matmul += 2 * group * h * kept * kept * d
    return matmul, sim


def count_macs(model: nn.Module, inputs: dict) -> MacCount:
    """One no-grad forward with counting hooks; returns the MAC breakdown."""
    counts = MacCount()
    attn_linears = set()
    for m in model.modules():
        if isinstance(m, SerializedAttention):
            attn_linears.update({id(m.qkv), id(m.proj)})
    state = merge_state(model)
    names = {id(m): n for n, m in model.named_modules()}

    def linear_hook(mod, inp, out):
        macs = inp[0].numel() // mod.in_features * mod.in_features * mod.out_features
        if id(mod) in attn_linears:
            counts.attention += macs
            counts.attention_linear += macs
        else:
            counts.linear_other += macs

    def conv_hook(mod, inp, out):
        x: SparseTensor = inp[0]
        nbr = x.cache.get(("torch", mod.indice_key or id(mod), mod.kernel_size))
        if nbr is None:
            nbr = submanifold_neighbors(x.indices, mod.kernel_size)
        counts.sparse_conv += int((nbr < x.indices.shape[0]).sum()) * mod.in_channels * mod.out_channels

    def attn_hook(mod, inp, out):
        record = None
        records = state.extra.get("layers", []) if state is not None else []
        if isinstance(mod, MergedSerializedAttention) and records and records[-1].name == names.get(id(mod)):
            record = records[-1]
        matmul, sim = _attention_matmul_macs(mod, out, record)
        counts.attention += matmul + sim
        counts.attention_matmul += matmul
        counts.similarity += sim
        counts.per_block.append((names.get(id(mod), "?"), matmul + sim))

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, SubMConv3d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, SerializedAttention):
            handles.append(m.register_forward_hook(attn_hook))
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for h in handles:
            h.remove()
    return counts


@contextlib.contextmanager
def attention_skipped():
    """Replace the patch-attention step (matching, merging, attention, unmerging) by returning v.

    Timing with and without it gives the share of time spent in that step.
    """
    saved = SerializedAttention.__dict__["attend"], MergedSerializedAttention.__dict__["attend"]

    def skip(self, q, k, v, bias, point):
        return v

    SerializedAttention.attend = skip
    MergedSerializedAttention.attend = skip
    try:
        yield
    finally:
        SerializedAttention.attend, MergedSerializedAttention.attend = saved
