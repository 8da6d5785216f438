"""What PT-v3m1 (PTv3 base) and PT-v3m2 (Sonata) share: argument checks and the encoder/decoder stage layout.

The two differ only in the stem, the down/up-sampling modules and the norm of the pooling; the stages (Pointcept's
``enc{s}.down`` + ``enc{s}.block{i}``, ``dec{s}.up`` + ``dec{s}.block{i}``, stochastic depth spread linearly
over all blocks, decoder rates reversed) are built here once, so both keep Pointcept's state-dict keys.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from .modules import PointSequential

# the constructor arguments both backbones pass through to every Block
BLOCK_ARGS = ("mlp_ratio", "qkv_bias", "qk_scale", "attn_drop", "proj_drop", "layer_scale", "pre_norm", "enable_rpe",
              "enable_flash", "upcast_attention", "upcast_softmax")  # fmt: skip


def block_kwargs(args: Mapping[str, Any]) -> dict[str, Any]:
    """The Block keywords among a backbone's constructor arguments (``locals()``), plus LayerNorm and GELU."""
    return {**{k: args[k] for k in BLOCK_ARGS if k in args}, "norm_layer": nn.LayerNorm, "act_layer": nn.GELU}


def linspace(end: float, n: int) -> list[float]:
    """Stochastic-depth rates 0..end (python floats, so building on the meta device works)."""
    return [end * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def check_lengths(name: str, value: Sequence, expected: int) -> None:
    if len(value) != expected:
        raise ValueError(f"{name} must have {expected} entries, got {len(value)}")


def check_orders(order: str | Sequence[str]) -> list[str]:
    """The serialization orders as a list, each one of ``serialization.ORDERS``."""
    from .serialization import ORDERS

    orders = [order] if isinstance(order, str) else list(order)
    for o in orders:
        if o not in ORDERS:
            raise ValueError(f"order entries must be in {ORDERS}, got {o!r}")
    return orders


def check_stages(stride, enc: dict[str, Sequence], dec: dict[str, Sequence] | None) -> int:
    """Number of stages (len of enc_depths); every per-stage list must match it (decoder: one fewer)."""
    stages = len(enc["enc_depths"])
    check_lengths("stride", stride, stages - 1)
    for name, val in enc.items():
        check_lengths(name, val, stages)
    for name, val in (dec or {}).items():
        check_lengths(name, val, stages - 1)
    return stages


def _add_blocks(stage: PointSequential, block: Callable[..., nn.Module], s: int, dims: tuple[int, int, int],
                rates: Sequence[float], num_orders: int, block_kw: dict[str, Any]) -> None:  # fmt: skip
    """``block{i}`` per rate, ``dims`` = (channels, heads, patch size); block i uses order ``i % num_orders`` and
    the CPE convs of stage s share one neighbour map (``cpe_indice_key``)."""
    for i, rate in enumerate(rates):
        blk = block(*dims, drop_path=rate, order_index=i % num_orders, cpe_indice_key=f"stage{s}", **block_kw)
        stage.add(blk, name=f"block{i}")


def build_encoder(
    block: Callable[..., nn.Module],
    down: Callable[[int, int, int], nn.Module],
    depths: Sequence[int],
    channels: Sequence[int],
    num_head: Sequence[int],
    patch_size: Sequence[int],
    stride: Sequence[int],
    drop_path: float,
    num_orders: int,
    block_kw: dict[str, Any],
) -> PointSequential:
    """``enc{s}``: ``down`` (from stage 1 on) then ``depths[s]`` blocks cycling through the orders."""
    rates = linspace(drop_path, sum(depths))
    encoder = PointSequential()
    for s in range(len(depths)):
        stage = PointSequential()
        if s > 0:
            stage.add(down(channels[s - 1], channels[s], stride[s - 1]), name="down")
        dims = (channels[s], num_head[s], patch_size[s])
        _add_blocks(stage, block, s, dims, rates[sum(depths[:s]) : sum(depths[: s + 1])], num_orders, block_kw)
        if len(stage) != 0:
            encoder.add(stage, name=f"enc{s}")
    return encoder


def build_decoder(
    block: Callable[..., nn.Module],
    up: Callable[[int, int, int], nn.Module],
    depths: Sequence[int],
    channels: Sequence[int],
    num_head: Sequence[int],
    patch_size: Sequence[int],
    enc_channels: Sequence[int],
    drop_path: float,
    num_orders: int,
    block_kw: dict[str, Any],
) -> PointSequential:
    """``dec{s}`` from the coarsest stage down: ``up(in, skip, out)`` then ``depths[s]`` blocks (rates reversed)."""
    rates = linspace(drop_path, sum(depths))
    decoder = PointSequential()
    dec_ch = list(channels) + [enc_channels[-1]]
    for s in reversed(range(len(enc_channels) - 1)):
        stage = PointSequential()
        stage.add(up(dec_ch[s + 1], enc_channels[s], dec_ch[s]), name="up")
        dims = (dec_ch[s], num_head[s], patch_size[s])
        _add_blocks(stage, block, s, dims, rates[sum(depths[:s]) : sum(depths[: s + 1])][::-1], num_orders, block_kw)
        decoder.add(stage, name=f"dec{s}")
    return decoder
