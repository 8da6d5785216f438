"""`efficientsam3-bench`: the issue's GPU benchmark, runnable on CPU at tiny size.

Suites (`--suite`, repeatable):
- students: forward img/s of the 9 students at --img-size for each --batch, params and GMACs.
- teacher: SAM3 trunk export img/s, exact and merged for each --merge W:G (window r : global r), with
  fidelity (cosine / MSE / relative MSE of merged vs exact) and model-FLOP utilisation against --peak-tflops.
- distill: a student trained on exact vs merged teacher embeddings for --distill-steps, both scored
  against the exact embeddings on held-out images (the stage-1 loss a user would get from each store).
- train: stage-1 training img/s of --train-student reading a store written to --workdir, and the store's
  read MB/s against what training consumes (img/s x record bytes).
`--tiny` switches to CPU-sized settings (tiny SAM3 trunk, 64 px students). Results go to --out (JSON)."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from merge_core.adapter import remove_patch
from merge_core.bench import measure
from run_kit import OneLineArgumentParser, write_json_atomic

from .data.transforms import preprocess, valid_mask
from .engine.losses import stage1_loss
from .model.merged_teacher import apply_merging, attended_tokens
from .model.sam3_vit import SAM3_VIT, TINY_VIT, SAM3ViT
from .model.students import STUDENTS, build_student
from .model.teacher import load_trunk
from .store import EmbeddingStore, StoreWriter
from .store.compact import ErrorMeter

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def sample_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Photo-like inputs: scikit-image photos when installed, else smooth random fields (never downloads)."""
    imgs = []
    try:
        from skimage import data as skdata

        names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"]
        for i in range(n):
            arr = np.asarray(getattr(skdata, names[i % len(names)])())[..., :3]
            t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
            if i >= len(names):
                t = t.flip(-1)
            imgs.append(preprocess(t, size, "sam3")[0])
    except ImportError:
        g = torch.Generator().manual_seed(seed)
        for _ in range(n):
            low = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
            imgs.append(torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic")[0])
    return torch.stack(imgs)


def bench_students(args, device, dtype) -> list[dict]:
    rows = []
    for name in args.students:
        m = build_student(name, args.embed_dim, args.embed_size).eval().to(device=device, dtype=dtype)
        params = sum(p.numel() for p in m.parameters())
        x1 = torch.randn(1, 3, args.img_size, args.img_size, device=device, dtype=dtype)
        with torch.no_grad():
            macs = _flops(lambda m=m, x1=x1: m(x1)) / 2
            for b in args.batch:
                x = torch.randn(b, 3, args.img_size, args.img_size, device=device, dtype=dtype)
                t = measure(lambda m=m, x=x: m(x), device, args.warmup, args.iters)
                ms = t["ms_median"]
                rows.append({"student": name, "zoo": STUDENTS[name].zoo, "batch": b, "params_M": params / 1e6,
                             "gmacs": macs / 1e9, "ms": ms, "img_per_s": b / ms * 1e3})  # fmt: skip
                print(json.dumps(rows[-1]))
        del m
    return rows


def _teacher(args, device, dtype) -> SAM3ViT:
    """Random weights (sam3.pt is gated), or --sam3-checkpoint. --weight-scale multiplies every Linear weight:
    at SAM3's init scale (std 0.02) attention barely moves the residual stream, so merging looks free;
    a larger scale makes attention dominate (a harsher, still synthetic, fidelity test)."""
    torch.manual_seed(0)
    model = SAM3ViT(TINY_VIT if args.tiny else SAM3_VIT).eval()
    if args.sam3_checkpoint:
        load_trunk(model, args.sam3_checkpoint)
    elif args.weight_scale != 1.0:
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, torch.nn.Linear):
                    mod.weight.mul_(args.weight_scale)
    return model.to(device=device, dtype=dtype)


def bench_teacher(args, device, dtype) -> list[dict]:
    model = _teacher(args, device, dtype)
    size = model.cfg.img_size
    b = args.teacher_batch
    x = sample_images(b, size).to(device=device, dtype=dtype)
    rows = []
    run = torch.compile(model) if args.compile else model
    with torch.no_grad():
        flops = _flops(lambda: model(x[:1]))
        exact = run(x).float()
        t = measure(lambda: run(x), device, args.warmup, args.iters)
        base = b / t["ms_median"] * 1e3
        row = {"teacher": "exact", "window_r": 0, "global_r": 0, "batch": b, "img_per_s": base, "speedup": 1.0,
               "tflop_per_img": flops / 1e12, "cos_mean": 1.0, "rel_mse": 0.0}  # fmt: skip
        if args.peak_tflops:
            row["mfu"] = base * flops / (args.peak_tflops * 1e12)
        rows.append(row)
        print(json.dumps(row))
        for spec, mode in [(sp, md) for md in args.merge_modes for sp in args.merge]:
            wr, gr = (int(v) for v in spec.split(":"))
            apply_merging(model, wr, gr, mode=mode)
            if args.compile:
                torch._dynamo.reset()
                run = torch.compile(model)
            y = run(x).float()
            meter = ErrorMeter()
            meter.add(exact, y)
            e = meter.summary()
            t = measure(lambda run=run: run(x), device, args.warmup, args.iters)
            ips = b / t["ms_median"] * 1e3
            row = {"teacher": f"merged-{mode}", "window_r": wr, "global_r": gr, "batch": b, "img_per_s": ips,
                   "speedup": ips / base, "cos_mean": e["cos_mean"], "cos_min": e["cos_min"], "mse": e["mse"],
                   "rel_mse": e["rel_mse"], "attended": attended_tokens(model, model.r)[:8]}  # fmt: skip
            rows.append(row)
            print(json.dumps(row))
            remove_patch(model)
    return rows


def bench_distill(args, device, dtype) -> list[dict]:
    """Train one student per target set (exact, each merged r) from the same init and data order; score all on
    held-out images against the exact teacher."""
    teacher = _teacher(args, device, torch.float32)
    size, n_train, n_test = teacher.cfg.img_size, args.distill_images, max(args.distill_images // 4, 2)
    imgs = sample_images(n_train + n_test, size, seed=1).to(device)
    with torch.no_grad():
        targets = {"exact": teacher(imgs)}
        for spec, mode in [(sp, md) for md in args.merge_modes for sp in args.merge]:
            wr, gr = (int(v) for v in spec.split(":"))
            apply_merging(teacher, wr, gr, mode=mode)
            targets[f"{mode} {spec}"] = teacher(imgs)
            remove_patch(teacher)
    valid = valid_mask(torch.tensor([[size, size]] * len(imgs), device=device), size, teacher.embed_size)
    rows = []
    for name, target in targets.items():
        torch.manual_seed(0)
        student = build_student(args.distill_student, teacher.embed_dim, teacher.embed_size).to(device)
        opt = torch.optim.AdamW(student.parameters(), lr=args.distill_lr)
        g = torch.Generator().manual_seed(0)
        for _ in range(args.distill_steps):
            idx = torch.randperm(n_train, generator=g)[: args.distill_batch]
            loss, _ = stage1_loss(student(imgs[idx]), target[idx], valid[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        student.eval()
        with torch.no_grad():
            test, parts = stage1_loss(student(imgs[n_train:]), targets["exact"][n_train:], valid[n_train:])
        rows.append({"targets": name, "steps": args.distill_steps, "test_loss_vs_exact": test.item(), **parts})
        print(json.dumps(rows[-1]))
    return rows


def bench_train(args, device, dtype) -> list[dict]:
    """Store read MB/s (cold: page cache dropped where the OS allows) vs training consumption."""
    work = Path(args.workdir or tempfile.mkdtemp(prefix="es3bench_"))
    c, s, size = args.embed_dim, args.embed_size, args.img_size
    n = args.train_records
    store_dir = work / "store"
    with StoreWriter(store_dir, 0, c, s) as w:
        for i in range(len(w.done), n):
            w.write(f"k{i}", i, torch.randn(c, s, s))
    values = store_dir / "rank0-values.bin"
    if hasattr(os, "posix_fadvise"):
        fd = os.open(values, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    store = EmbeddingStore(str(store_dir))
    order = np.random.default_rng(0).permutation(n)
    t0 = time.perf_counter()
    for i in order:
        store.get(f"k{i}")
    read_s = time.perf_counter() - t0
    read_mb_s = n * store.item / read_s / 1e6
    student = build_student(args.train_student, c, s).to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    b = args.train_batch
    x = torch.randn(b, 3, size, size, device=device)
    target = torch.randn(b, c, s, s, device=device)
    valid = torch.ones(b, s, s, dtype=torch.bool, device=device)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def step():
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            pred = student(x)
        loss, _ = stage1_loss(pred, target, valid)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    t = measure(step, device, args.warmup, args.iters)
    ips = b / t["ms_median"] * 1e3
    need = ips * store.item / 1e6
    row = {"student": args.train_student, "batch": b, "train_img_per_s": ips, "record_bytes": store.item,
           "consumed_mb_s": need, "store_read_mb_s": read_mb_s, "read_headroom": read_mb_s / need,
           "records": n}  # fmt: skip
    print(json.dumps(row))
    return [row]


def build_parser():
    p = OneLineArgumentParser(prog="efficientsam3-bench", description=__doc__.splitlines()[0])
    p.add_argument("--suite", action="append", choices=("students", "teacher", "distill", "train"), default=None)
    p.add_argument("--tiny", action="store_true", help="CPU-sized settings")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="student forward dtype (fp16 on GPU)")
    p.add_argument("--teacher-dtype", default=None, choices=tuple(DTYPES), help="teacher dtype (bf16 on GPU)")
    p.add_argument("--students", nargs="+", default=list(STUDENTS))
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--embed-dim", type=int, default=None)
    p.add_argument("--embed-size", type=int, default=None)
    p.add_argument("--batch", type=int, nargs="+", default=None)
    p.add_argument("--teacher-batch", type=int, default=None)
    p.add_argument("--merge", nargs="+", default=None, metavar="W:G", help="window r : global r pairs")
    p.add_argument("--merge-modes", nargs="+", default=["attn", "block"], choices=("attn", "block"))
    p.add_argument("--compile", action="store_true", help="torch.compile the teacher (exact and merged)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense peak of the GPU, for MFU (H200 bf16: 989)")
    p.add_argument("--sam3-checkpoint", default="", help="local sam3.pt (real teacher weights) for fidelity")
    p.add_argument("--weight-scale", type=float, default=1.0, help="scale random Linear weights (see _teacher)")
    p.add_argument("--distill-student", default="efficientvit_b0")
    p.add_argument("--distill-images", type=int, default=None)
    p.add_argument("--distill-steps", type=int, default=None)
    p.add_argument("--distill-batch", type=int, default=4)
    p.add_argument("--distill-lr", type=float, default=2e-3)
    p.add_argument("--train-student", default="repvit_m1_1")
    p.add_argument("--train-batch", type=int, default=None)
    p.add_argument("--train-records", type=int, default=None)
    p.add_argument("--workdir", default=None, help="folder for the train suite's store (temp dir by default)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--out", default=None, help="results JSON")
    return p


def _defaults(args) -> None:
    tiny = args.tiny
    pick = {
        "img_size": (64, 1008), "embed_dim": (16, 1024), "embed_size": (8, 72), "batch": ([2], [8, 1]),
        "teacher_batch": (2, 8), "merge": (["2:8", "4:16", "6:24"], ["96:864", "144:1296", "192:1728", "288:2592"]),
        "distill_images": (16, 64), "distill_steps": (20, 300), "train_batch": (2, 64), "train_records": (8, 256),
        "warmup": (1, 5), "iters": (2, 20),
    }  # fmt: skip
    for key, (small, full) in pick.items():
        if getattr(args, key) is None:
            setattr(args, key, small if tiny else full)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    _defaults(args)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))  # fmt: skip
    gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("fp16" if gpu else "fp32")]
    tdtype = DTYPES[args.teacher_dtype or ("bf16" if gpu else "fp32")]
    suites = args.suite or ["students", "teacher", "distill", "train"]
    result = {
        "device": torch.cuda.get_device_name(device) if gpu else cpu_name(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "tiny": args.tiny, "threads": torch.get_num_threads(),
        "weights": args.sam3_checkpoint or f"random x{args.weight_scale}", "compile": args.compile,
    }  # fmt: skip
    if "students" in suites:
        result["students"] = bench_students(args, device, dtype)
    if "teacher" in suites:
        result["teacher"] = bench_teacher(args, device, tdtype)
    if "distill" in suites:
        result["distill"] = bench_distill(args, device, dtype)
    if "train" in suites:
        result["train"] = bench_train(args, device, dtype)
    if args.out:
        write_json_atomic(args.out, result)
    return result


if __name__ == "__main__":
    main()
