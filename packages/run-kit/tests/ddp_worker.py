"""Run by test_dist.py under ``torchrun --nproc_per_node=2`` (gloo, CPU): a tiny DDP training built on run_kit.

Phase A trains 3 epochs straight. Phase B trains 1 epoch, saves (rank 0 only), rebuilds every object from a fresh
seed, resumes from the file and trains the remaining 2 epochs. Each rank writes its results to ``<out>/rank<r>.json``.
"""

import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import run_kit
from run_kit import (
    all_reduce_sum,
    barrier,
    gather_rng_states,
    load_checkpoint,
    restore_resume_state,
    resume_state,
    seed_everything,
    set_sampler_epoch,
    setup_distributed,
    wrap_ddp,
)

EPOCHS = 3


def build(env, seed):
    seed_everything(seed + env.rank, deterministic=True)
    g = torch.Generator().manual_seed(7)  # the same data on every rank
    data = TensorDataset(torch.randn(32, 5, generator=g), torch.randint(0, 3, (32,), generator=g))
    sampler = DistributedSampler(data, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=1)
    loader = DataLoader(data, batch_size=4, sampler=sampler)
    torch.manual_seed(0)  # identical initial weights (DDP also broadcasts rank 0's)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.2), nn.Linear(8, 3))
    net = wrap_ddp(model, env)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    return loader, net, opt


def run_epochs(env, loader, net, opt, start, stop, history):
    for epoch in range(start, stop):
        set_sampler_epoch(loader, epoch)
        total = all_reduce_sum(0.0, env)
        for x, y in loader:
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total = total + all_reduce_sum(loss.detach().double(), env)
        history.append(round(total.item() / (len(loader) * env.world_size), 10))


def main(out: Path) -> None:
    env = setup_distributed("cpu")
    saves = 0
    loader, net, opt = build(env, 0)
    full: list[float] = []
    run_epochs(env, loader, net, opt, 0, EPOCHS, full)
    full_weights = [p.detach().clone() for p in net.parameters()]

    loader, net, opt = build(env, 0)
    part: list[float] = []
    run_epochs(env, loader, net, opt, 0, 1, part)
    rng = gather_rng_states(env)  # collective: every rank
    if env.is_main:
        state = resume_state(net, opt, epoch=1, step=len(loader), config={"epochs": EPOCHS}, sampler_epoch=1,
                             extra={"history": part}, rng=rng)  # fmt: skip
        run_kit.save_checkpoint(out / "last.pth", state)
        saves += 1
    barrier(env)
    loader, net, opt = build(env, 99)
    info = restore_resume_state(load_checkpoint(out / "last.pth"), net, opt, source="last.pth")
    resumed = list(info.extra["history"])
    run_epochs(env, loader, net, opt, info.epoch, EPOCHS, resumed)
    same = all(torch.equal(a, b) for a, b in zip(net.parameters(), full_weights, strict=True))
    result = {"rank": env.rank, "world": env.world_size, "full": full, "resumed": resumed, "saves": saves, "same": same}
    (out / f"rank{env.rank}.json").write_text(json.dumps(result))
    run_kit.cleanup_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
