"""merge_bench.interleaved: the round orders are balanced for position and for the preceding variant."""

from __future__ import annotations

import argparse
from collections import Counter

import pytest
import torch

from merge_bench import interleaved


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_williams_orders_balance_positions_and_predecessors(n):
    orders = interleaved.williams_orders(n)
    assert len(orders) == (n if n % 2 == 0 else 2 * n)
    assert all(sorted(order) == list(range(n)) for order in orders)
    for position in range(n):  # every variant in every position equally often
        counts = Counter(order[position] for order in orders)
        assert set(counts) == set(range(n)) and len(set(counts.values())) == 1
    pairs = Counter((a, b) for order in orders for a, b in zip(order, order[1:], strict=False))
    assert set(pairs) == {(a, b) for a in range(n) for b in range(n) if a != b}  # every ordered pair
    assert len(set(pairs.values())) == 1  # equally often


def test_four_variants_hand_checked():
    # first order 0, 1, 3, 2, then +1 mod 4 per round: each variant follows each other one exactly once
    assert interleaved.williams_orders(4) == [[0, 1, 3, 2], [1, 2, 0, 3], [2, 3, 1, 0], [3, 0, 2, 1]]
    with pytest.raises(ValueError, match="n must be"):
        interleaved.williams_orders(0)


def test_bench_times_variants_in_balanced_order(monkeypatch):
    models = interleaved.build("tiny", torch.device("cpu"), torch.float32)
    timed: list[str] = []
    names = {id(models[k]): k for k in interleaved.VARIANTS}

    def fake_time(fn, iters, cuda):
        timed.append(names[id(fn.__defaults__[0])])
        return 1.0

    monkeypatch.setattr(interleaved, "_time", fake_time)
    args = argparse.Namespace(rounds=4, iters=1, warmup=0, pin_zero=True)
    row = interleaved.bench("tiny", models, 1, args, torch.device("cpu"), torch.float32)
    n = len(interleaved.VARIANTS)
    rounds = [tuple(timed[i * n : (i + 1) * n]) for i in range(4)]
    assert rounds == [interleaved.balanced(interleaved.VARIANTS, i) for i in range(4)]
    follows_forced = Counter(b for order in rounds for a, b in zip(order, order[1:], strict=False) if a == "forced")
    assert set(follows_forced) == {"plain", "plain_copy", "auto"}
    assert all(len(v) == 4 for v in row["rounds"].values())
