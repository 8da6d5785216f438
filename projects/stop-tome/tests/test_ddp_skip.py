"""DDP robustness without spawning processes: the collective skip decision for empty / small batches, and the
feature all-gather for ranks that lost different numbers of bad videos."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from run_kit import DistEnv
from stop_tome import engine
from stop_tome.engine import _all_gather_counts, _gather_cat, step_counts

DDP2 = DistEnv(rank=0, world_size=2, distributed=True)


def _fake_ranks(*counts: int):
    """A stand-in for the all-gather: every rank reports ``counts`` (what the real collective returns)."""
    return lambda n, env: list(counts)


@pytest.mark.parametrize(
    ("counts", "expect"),
    [
        ((0, 3), None),  # rank 0's whole batch failed: everyone skips (before: KeyError on rank 0, rank 1 hangs)
        ((3, 0), None),  # the same seen from the rank that has samples
        ((0, 0), None),
        ((1, 1), [1, 1]),  # two pairs in all: a valid contrastive step
        ((4, 2), [4, 2]),  # uneven but non-empty: runs, the gather pads
    ],
)
def test_all_ranks_take_the_same_decision(counts, expect):
    for rank in range(2):
        env = DistEnv(rank=rank, world_size=2, distributed=True, is_main=rank == 0)
        assert step_counts(counts[rank], env, _fake_ranks(*counts)) == expect


def test_single_process_skips_small_batches_without_collectives():
    def boom(n, env):
        raise AssertionError("no collective in a single process")

    env = DistEnv()
    assert step_counts(0, env, boom) is None and step_counts(1, env, boom) is None
    assert step_counts(2, env, boom) == [2]


@pytest.fixture
def gloo_world_of_one():
    if dist.is_initialized():
        pytest.skip("a process group already exists")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield DistEnv(rank=0, world_size=1, distributed=True)
    dist.destroy_process_group()


def test_real_collectives_world_of_one(gloo_world_of_one):
    env = gloo_world_of_one
    assert _all_gather_counts(5, env) == [5]
    assert step_counts(0, env) is None and step_counts(3, env) == [3]
    t = torch.randn(3, 4, requires_grad=True)
    out = _gather_cat(t, env, [3])
    out.sum().backward()
    assert torch.equal(out, t) and torch.equal(t.grad, torch.ones(3, 4))


def test_uneven_gather_pads_and_strips(monkeypatch):
    """Rank 0 has 2 rows, rank 1 has 4: the collective sees equal shapes, the result has exactly 6 real rows and
    the gradient reaches rank 0's own rows only through its slice."""
    other = torch.arange(16.0).view(4, 4)
    seen = []

    def fake_all_gather(t):
        seen.append(tuple(t.shape))
        return [t, other]  # own part keeps its graph, as torch.distributed.nn.functional.all_gather does

    import torch.distributed.nn.functional as dnf

    monkeypatch.setattr(dnf, "all_gather", fake_all_gather)
    mine = torch.randn(2, 4, requires_grad=True)
    out = _gather_cat(mine, DDP2, [2, 4])
    assert seen == [(4, 4)]
    assert torch.equal(out, torch.cat([mine.detach(), other]))
    (out * torch.arange(6.0)[:, None]).sum().backward()
    assert torch.equal(mine.grad, torch.tensor([[0.0] * 4, [1.0] * 4]))


def test_engine_uses_the_collective_decision():
    assert engine.step_counts.__defaults__[0] is engine._all_gather_counts
