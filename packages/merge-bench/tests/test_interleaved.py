"""merge_bench.interleaved: every variant takes every position in the round order equally often."""

from __future__ import annotations

import argparse

import torch

from merge_bench import interleaved


def test_rotation_gives_each_variant_each_position_once_per_cycle():
    variants = ("a", "b", "c", "d")
    orders = [interleaved.rotated(variants, i) for i in range(4)]
    assert orders[0] == ("a", "b", "c", "d") and orders[1] == ("b", "c", "d", "a")
    for position in range(4):
        assert sorted(order[position] for order in orders) == list(variants)
    assert interleaved.rotated(variants, 5) == orders[1]


def test_bench_times_variants_in_rotated_order(monkeypatch):
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
    firsts = [timed[i * n] for i in range(4)]
    assert sorted(firsts) == sorted(interleaved.VARIANTS)
    assert all(len(v) == 4 for v in row["rounds"].values())
