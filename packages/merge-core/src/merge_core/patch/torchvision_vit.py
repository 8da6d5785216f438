"""torchvision ``VisionTransformer`` adapter (also ``merge_core.patch.swag``: SWAG weights ship as torchvision ViTs).

Like ToMe's SWAG patch: merging between attention and MLP of every ``EncoderBlock``, proportional attention
on by default, the class token protected. Unlike it, torchvision's encoder is already batch-first, so no
transposes are patched in, and at r=0 the blocks run torchvision's own ``EncoderBlock.forward`` with no adapter
frame inside (the adapter kit's zero-cost path, ``MergeState.run_plain``), bit-exact. torchvision is
not imported: classes are recognised by name and module, so ``import merge_core`` never needs it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapter import MatchFn, MergeAdapter, MergeState
from ..attention import proportional_attention


def _is_torchvision(obj: nn.Module, name: str) -> bool:
    return any(c.__name__ == name and c.__module__.startswith("torchvision.") for c in type(obj).__mro__)


def mha_attention(
    attn: nn.MultiheadAttention, x: torch.Tensor, size: torch.Tensor | None, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention of a batch-first ``nn.MultiheadAttention`` with token sizes; returns (output, mean key)."""
    b, n, c = x.shape
    heads = attn.num_heads
    qkv = nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    dropout_p = attn.dropout if attn.training else 0.0
    out = proportional_attention(q, k, v, size, dropout_p=dropout_p, backend=backend)
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, c)), k.mean(1)


class _MergeEncoderBlock:
    """torchvision ``EncoderBlock`` with ToMe's merge step after the attention residual."""

    _merge_info: MergeState
    _merge_layer: int

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        state, layer = self._merge_info, self._merge_layer
        if not state.merging:
            out = super().forward(input)
            state.tokens.append(out.shape[-2])
            return out
        if input.dim() != 3:
            raise ValueError(f"input must have shape (batch, tokens, channels), got {tuple(input.shape)}")
        h = self.ln_1(input)
        x, metric = mha_attention(self.self_attention, h, state.attn_size(), state.attn_backend)
        x = self.dropout(x) + input
        x = state.merge_tokens(layer, x, metric, block=self, attn_input=h)
        return x + self.mlp(self.ln_2(x))


class _MergeTorchvisionViT:
    """Resets the merge state at every forward."""

    _merge_info: MergeState
    _merge_num_layers: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state, depth = self._merge_info, self._merge_num_layers
        state.begin(depth, self.r)
        if state.merging:
            return super().forward(x)
        out = state.run_plain(super().forward, x)  # the zero-cost path: torchvision's own blocks
        state.fill_tokens(depth, self.seq_length)
        return out


class TorchvisionAdapter(MergeAdapter):
    name = "torchvision"

    def check(self, model: nn.Module) -> None:
        if not _is_torchvision(model, "VisionTransformer"):
            raise TypeError(f"model must be a torchvision VisionTransformer, got {type(model).__name__}")
        for i, block in enumerate(model.encoder.layers):
            if not _is_torchvision(block, "EncoderBlock"):
                raise TypeError(
                    f"model.encoder.layers[{i}] is {type(block).__name__}, expected torchvision EncoderBlock"
                )
            if not getattr(block.self_attention, "batch_first", False):
                raise TypeError(f"model.encoder.layers[{i}].self_attention must be batch_first")

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.encoder.layers)

    def protected_tokens(self, model: nn.Module) -> tuple[int, bool, bool]:
        return 1, True, False

    def attach(self, model: nn.Module, state: MergeState) -> None:
        self.swap(model, _MergeTorchvisionViT, state)
        self.attach_attr(model, "_merge_num_layers", len(model.encoder.layers), state)
        for i, block in enumerate(model.encoder.layers):
            self.swap(block, _MergeEncoderBlock, state, steps_out=True)
            self.attach_attr(block, "_merge_info", state, state)
            self.attach_attr(block, "_merge_layer", i, state)


ADAPTER = TorchvisionAdapter()


def apply_patch(
    model: nn.Module,
    trace_source: bool | str = False,
    prop_attn: bool = True,
    *,
    attn_backend: str = "auto",
    match_fn: MatchFn | None = None,
) -> nn.Module:
    """Patch a torchvision VisionTransformer in place (ToMe's ``tome.patch.swag``); set ``model.r`` afterwards."""
    return ADAPTER.apply(model, trace_source, prop_attn, attn_backend=attn_backend, match_fn=match_fn)
