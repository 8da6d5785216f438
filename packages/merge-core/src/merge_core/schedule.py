"""Per-layer merge schedules: ToMe's ``r`` forms and a keep-rate form, both resolved to a static list."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from ._checks import check_count

RSpec = int | float | torch.Tensor | tuple[int, float] | Sequence[int]


def parse_r(num_layers: int, r: RSpec) -> list[int]:
    """Resolve ``r`` into one count per layer, like ToMe's ``parse_r``.

    - a count (``int``, numpy integer, integral float such as ``8.0``, 0-d tensor): the same r at every layer.
    - ``(r, inflect)``: a linear ramp; inflect < 0 merges more early, > 0 more late.
    - ``list`` (any non-tuple sequence): explicit per-layer values, zero-padded to ``num_layers``.

    Unlike ToMe a list longer than the model raises instead of being ignored past the depth, a
    non-integral r (``2.5``) raises instead of being truncated, and one layer gives ``[r]`` (ToMe divides by 0).
    """
    num_layers = check_count(num_layers, "num_layers")
    if isinstance(r, Sequence) and not isinstance(r, (tuple, str)):
        values = [check_count(value, f"r[{i}]") for i, value in enumerate(r)]
        if len(values) > num_layers:
            raise ValueError(f"r schedule has {len(values)} entries but the model has {num_layers} layers")
        return values + [0] * (num_layers - len(values))
    inflect = 0.0
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"a tuple r must be (r, inflect), got {r!r}; use a list for a per-layer schedule")
        r, inflect = r
        if isinstance(inflect, torch.Tensor) and inflect.dim() == 0:
            inflect = inflect.item()
        if isinstance(inflect, bool) or not isinstance(inflect, numbers.Real):
            raise TypeError(f"r's inflect (second item of (r, inflect)) must be a number, got {inflect!r}")
        inflect = float(inflect)
    r = check_count(r, "r")
    if num_layers == 0:
        return []
    if num_layers == 1:
        return [r]
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1)
    return [max(0, int(min_val + step * i)) for i in range(num_layers)]


def keep_rate_schedule(
    num_layers: int,
    num_tokens: int,
    keep_rate: float,
    layers: Sequence[int],
    protected: int = 1,
) -> list[int]:
    """Turn "keep ``keep_rate`` of the unprotected tokens at these layers" into a per-layer r list.

    Token counts are static, so the result is a fixed schedule (friendly to ``torch.compile``).
    Kept counts round half up: 196 spatial tokens at 0.7 give 137 -> 96 -> 67 -> 47.
    Bipartite matching merges at most half of the unprotected tokens per layer, so keep rates
    below 0.5 are clamped to that cap (the returned r already includes the clamp).
    """
    check_count(num_layers, "num_layers")
    check_count(num_tokens, "num_tokens")
    check_count(protected, "protected")
    if not 0.0 < float(keep_rate) <= 1.0:
        raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
    bad = [layer for layer in layers if isinstance(layer, bool) or not 0 <= int(layer) < num_layers]
    if bad:
        raise ValueError(f"merge layers must be in [0, {num_layers}), got {list(layers)}")
    schedule = [0] * num_layers
    tokens = num_tokens - protected
    for layer in sorted(set(int(layer) for layer in layers)):
        keep = int(math.floor(tokens * float(keep_rate) + 0.5))
        r = min(tokens - keep, tokens // 2)
        schedule[layer] = r
        tokens -= r
    return schedule


def tokens_per_layer(num_tokens: int, schedule: Sequence[int], protected: int = 1) -> list[int]:
    """Token count entering each layer's MLP after that layer's merge (r clamped as in matching)."""
    counts = []
    tokens = num_tokens
    for r in schedule:
        tokens -= min(r, (tokens - protected) // 2)
        counts.append(tokens)
    return counts
