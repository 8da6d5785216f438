"""`efficientsam3-bench`: the issue's GPU benchmark, runnable on CPU at tiny size.

Suites (`--suite`, repeatable):
- students: forward img/s of the 9 students at --img-size for each --batch, params and GMACs.
- teacher: SAM3 trunk export img/s, exact and merged for each --merge W:G (window r : global r; span mode:
  W may be a progressive schedule 288+144, r per block of each windowed run), with TFLOP/img, fidelity
  (cosine / MSE / relative MSE of merged vs exact) and model-FLOP utilisation against --peak-tflops.
- distill: a student trained on exact vs merged teacher embeddings for --distill-steps, both scored
  against the exact embeddings on held-out images (the stage-1 loss a user would get from each store).
- train: stage-1 training img/s of --train-student reading a store written to --workdir, and the store's
  cold read MB/s (--train-readers threads) against what training consumes (img/s x record bytes).
- store: read MB/s of a store of --store-gb written on the spot (deleted afterwards) with each of
  --store-readers reader threads, cold (page cache dropped) and warm, plus the old one-thread memmap read,
  against --consumed-mb-s (what stage-1 training reads). Not in the default suite list.
- finetune: one geometry-FT step of --ft-student at --ft-batch (AMP: fp16 autocast + GradScaler, the frozen
  SAM3 path under each --ft-frozen-dtypes autocast, random weights) with the teacher path uncached and
  cached, at the 72x72 and 36x36 FPN level; its parts (student fwd+bwd, frozen path for the student with
  backward, frozen path for the teacher); an EdgeSAM-style step (1 prompt, 2 decode iterations); and a
  stage-1 step of the same student at the same batch for the ratio (target: FT step <= 1.5x stage-1).
  --ft-modes eager compiled graphed: the same rows with the frozen path under torch.compile (MODEL.COMPILE_FROZEN
  on) and with CUDA graphs (reduce-overhead; compile seconds, graphs compiled and CUDA-graph skips in the
  summary); the cached step with the host and the GPU-resident teacher cache; the summary also holds the FLOP
  bound (frozen path for the student vs the student's own fwd+bwd, counted FLOPs). --ft-profile: the stage-1
  step and one cached FT step per mode under torch.profiler (profile.py) into the summary.
  Not in the default suite list (ask for it).
`--tiny` switches to CPU-sized settings (tiny SAM3 trunk, 64 px students). Results go to --out (JSON)."""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from merge_core.adapter import remove_patch, state_of
from merge_core.bench import measure
from run_kit import OneLineArgumentParser, write_json_atomic

from .data.transforms import preprocess, valid_mask
from .engine.losses import masked_cosine, masked_mse, stage1_loss
from .finetune.cache import DeviceTeacherCache, HostTeacherCache
from .finetune.losses import LossWeights, embedding_mse, mask_terms, pick
from .finetune.step import DecodeSettings, ft_loss, teacher_targets
from .model.merged_teacher import apply_merging, attended_tokens
from .model.sam3_frozen import SAM3_DIMS, TINY_DIMS, build_frozen_sam3, compile_frozen, frozen_step_begin
from .model.sam3_vit import SAM3_VIT, TINY_VIT, SAM3ViT, compile_trunk
from .model.students import STUDENTS, build_student
from .model.teacher import load_trunk
from .profile import profile_step
from .store import EmbeddingStore, ParallelReader, StoreWriter
from .store.compact import ErrorMeter

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FT_MODES = ("eager", "compiled", "graphed")


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
    a larger scale makes attention dominate (a harsher, still synthetic, fidelity test). Random weights are
    drawn on the target device (446M on the CPU takes long)."""
    torch.manual_seed(0)
    with torch.device("cpu" if args.sam3_checkpoint else device):
        model = SAM3ViT(TINY_VIT if args.tiny else SAM3_VIT).eval()
    if args.sam3_checkpoint:
        load_trunk(model, args.sam3_checkpoint)
    elif args.weight_scale != 1.0:
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, torch.nn.Linear):
                    mod.weight.mul_(args.weight_scale)
    return model.to(device=device, dtype=dtype)


def _compiled(model, device, x) -> tuple[object, float]:
    """A fresh fullgraph compile of `model` and the seconds its first call took (compile + one run)."""
    torch._dynamo.reset()
    run = compile_trunk(model)
    t0 = time.perf_counter()
    run(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return run, time.perf_counter() - t0


def parse_merge_spec(spec: str) -> tuple[list[int], int]:
    """--merge W:G -> ([window r, ...], global r); W = 288+144 is a progressive span schedule."""
    try:
        w, g = spec.split(":")
        steps = [int(v) for v in w.split("+")]
        gr = int(g)
    except ValueError:
        raise ValueError(
            f"--merge: expected W:G or W1+W2+...:G with ints (e.g. 288:0, 288+144:0), got {spec!r}"
        ) from None
    return steps, gr


def _apply_spec(model: SAM3ViT, spec: str, mode: str) -> tuple[int, int]:
    """Patch `model` for one --merge spec; (window r, global r)."""
    steps, gr = parse_merge_spec(spec)
    apply_merging(model, steps[0], gr, mode=mode, span_schedule=steps if len(steps) > 1 else None)
    return steps[0], gr


def _why(e: Exception) -> str:
    """One line naming a failed row's exception."""
    msg = str(e).strip().splitlines()
    return f"error: {type(e).__name__}: {msg[0][:200] if msg else ''}"


def bench_teacher(args, device, dtype, save=lambda rows: None) -> list[dict]:
    """Exact trunk: reference path eager ("exact-ref": SAM3's op order, fp32 RoPE), fast path eager
    ("exact-fast") and, with --compile, the fast path under torch.compile ("exact-fast-compiled"); then the
    merged rows (compiled with --compile), their speed-up against the fastest exact row of the same mode. MFU =
    img/s x counted FLOPs (FlopCounterMode: 2 per MAC, matmuls + attention) / --peak-tflops. --time-budget
    skips merged rows that would not finish in time (estimated from the exact compile)."""
    t_start = time.perf_counter()
    model = _teacher(args, device, dtype)
    size = model.cfg.img_size
    b = args.teacher_batch
    x = sample_images(b, size).to(device=device, dtype=dtype)
    rows: list[dict] = []
    with torch.no_grad():
        flops = _flops(lambda: model(x[:1]))
        model.fast = False
        ref = model(x).float()
        meter_base = {"tflop_per_img": flops / 1e12, "tmac_per_img": flops / 2e12, "batch": b}

        def add(name: str, run, y: torch.Tensor, wr: int = 0, gr: int = 0, base: float = 0.0, **extra) -> dict:
            t = measure(lambda: run(x), device, args.warmup, args.iters)
            ips = b / t["ms_median"] * 1e3
            meter = ErrorMeter()
            meter.add(ref, y)
            e = meter.summary()
            row = {"teacher": name, "window_r": wr, "global_r": gr, **meter_base, "ms": t["ms_median"],
                   "img_per_s": ips, "cos_mean": e["cos_mean"], "cos_min": e["cos_min"], "mse": e["mse"],
                   "rel_mse": e["rel_mse"], "elapsed_s": time.perf_counter() - t_start, **extra}  # fmt: skip
            if args.peak_tflops and not wr and not gr:
                row["mfu"] = ips * flops / (args.peak_tflops * 1e12)
            if base:
                row["speedup"] = ips / base
            rows.append(row)
            print(json.dumps(row), flush=True)
            save(rows)
            return row

        add("exact-ref", model, ref)
        model.fast = True
        base = add("exact-fast", model, model(x).float())["img_per_s"]
        compile_s = 0.0
        if args.compile:
            try:
                run, compile_s = _compiled(model, device, x)
                base = add("exact-fast-compiled", run, run(x).float(), compile_s=compile_s)["img_per_s"]
            except Exception as e:  # noqa: BLE001  (report and go on with the eager rows)
                rows.append({"teacher": "exact-fast-compiled", "window_r": 0, "global_r": 0, "skipped": _why(e)})
                print(json.dumps(rows[-1]), flush=True)
        for row in rows:
            if "img_per_s" in row:
                row["speedup"] = row["img_per_s"] / base
        save(rows)
        for spec, mode in [(sp, md) for md in args.merge_modes for sp in args.merge]:
            steps, gr = parse_merge_spec(spec)
            wr = steps[0]
            name = f"merged-{mode}" + ("-compiled" if args.compile else "")
            left = args.time_budget - (time.perf_counter() - t_start) if args.time_budget else float("inf")
            if left < 1.5 * compile_s + 5:
                print(json.dumps({"skipped": name, "merge": spec, "seconds_left": left}), flush=True)
                rows.append({"teacher": name, "window_r": wr, "global_r": gr, "merge": spec, "skipped": "time budget"})
                continue
            extra = {"merge": spec}
            try:
                _apply_spec(model, spec, mode)
                extra["attended"] = attended_tokens(model, model.r, state_of(model).extra["span_schedule"])[:8]
                run = model
                if args.compile:
                    run, extra["compile_s"] = _compiled(model, device, x)
                extra["tflop_per_img"] = _flops(lambda: model(x[:1])) / 1e12
                add(name, run, run(x).float(), wr, gr, base=base, **extra)
            except Exception as e:  # noqa: BLE001  (one failed variant must not lose the others)
                rows.append({"teacher": name, "window_r": wr, "global_r": gr, "merge": spec, "skipped": _why(e)})
                print(json.dumps(rows[-1]), flush=True)
            if hasattr(model, "_merge_info"):
                remove_patch(model)
    print_teacher_table(rows, args.peak_tflops)
    return rows


def print_teacher_table(rows: list[dict], peak: float | None) -> None:
    """MFU = img/s x FLOP/img (2 FLOPs per MAC) / peak; the merged rows' MFU is left out (fewer FLOPs)."""
    print(f"{'teacher':<24} {'r w:g':>12} {'img/s':>7} {'ms':>8} {'x exact':>7} {'TFLOP/img':>9} {'MFU':>6} "
          f"{'cos mean':>8} {'cos min':>7} {'compile s':>9}")  # fmt: skip
    for r in rows:
        spec = r.get("merge", f"{r['window_r']}:{r['global_r']}")
        if "skipped" in r:
            print(f"{r['teacher']:<24} {spec:>12} skipped ({r['skipped']})")
            continue
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        cs = f"{r['compile_s']:.0f}" if "compile_s" in r else "-"
        print(f"{r['teacher']:<24} {spec:>12} {r['img_per_s']:7.1f} {r['ms']:8.2f} "
              f"{r['speedup']:7.2f} {r['tflop_per_img']:9.3f} {mfu:>6} {r['cos_mean']:8.5f} {r['cos_min']:7.4f} "
              f"{cs:>9}")  # fmt: skip
    if peak:
        print(
            f"MFU against a dense peak of {peak:g} TFLOPS (bf16 H100/H200 SXM: 989); FLOPs = 2 x MACs, counted by "
            "torch's FlopCounterMode on one image (matmuls, convolutions, attention). cos: vs the exact-ref output."
        )


def bench_distill(args, device, dtype) -> list[dict]:
    """Train one student per target set (exact, each merged r) from the same init and data order; score all on
    held-out images against the exact teacher."""
    teacher = _teacher(args, device, torch.float32)
    size, n_train, n_test = teacher.cfg.img_size, args.distill_images, max(args.distill_images // 4, 2)
    imgs = sample_images(n_train + n_test, size, seed=1).to(device)
    with torch.no_grad():
        targets = {"exact": teacher(imgs)}
        for spec, mode in [(sp, md) for md in args.merge_modes for sp in args.merge]:
            _apply_spec(teacher, spec, mode)
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
    store = EmbeddingStore(str(store_dir))
    order = [f"k{i}" for i in np.random.default_rng(0).permutation(n)]
    store.evict()
    with ParallelReader(store, args.train_readers) as reader:
        read_mb_s = _read_pass(reader, order)
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
           "records": n, "readers": args.train_readers}  # fmt: skip
    print(json.dumps(row))
    return [row]


def ft_prompts(b: int, n: int, generator: torch.Generator, device) -> dict[str, torch.Tensor]:
    """n boxes + n points per image (the FT default: up to 16 of each in one geometric prompt), normalised."""
    centre = torch.rand(b, n, 2, generator=generator) * 0.6 + 0.2
    size = torch.rand(b, n, 2, generator=generator) * 0.3 + 0.05
    pad = torch.zeros(b, n, dtype=torch.bool)
    out = {"boxes": torch.cat([centre, size], -1), "points": centre.clone(), "box_pad": pad, "point_pad": pad.clone()}
    return {k: v.to(device) for k, v in out.items()}


def _compile_counts() -> dict[str, int]:
    """Graphs dynamo has compiled so far and compiled graphs inductor ran without CUDA graphs (skips)."""
    c = torch._dynamo.utils.counters
    return {"graphs": int(c["stats"]["unique_graphs"]), "cudagraph_skips": int(c["inductor"]["cudagraph_skips"])}


def _count_calls(module: torch.nn.Module, fn) -> int:
    """Forward calls of `module` during one fn() (what a timed step runs through the frozen path)."""
    calls = [0]
    handle = module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        fn()
    finally:
        handle.remove()
    return calls[0]


class FTBench:
    """The FT step's pieces on fixed random tensors (the data loading is not timed). The step is the trainer's
    own code: `ft_loss` and `teacher_targets` with its cache; AMP as the trainer: fp16 autocast for the
    student, GradScaler, clip 1.0, AdamW."""

    def __init__(self, args, device: torch.device) -> None:
        self.args, self.device, self.gpu = args, device, device.type == "cuda"
        self.dims = TINY_DIMS if args.tiny else SAM3_DIMS
        b, s = args.ft_batch, args.embed_size
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        self.student = build_student(args.ft_student, self.dims.embed_dim, s).to(device)
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=5e-5, weight_decay=0.01)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.gpu)
        self.images = torch.randn(b, 3, args.img_size, args.img_size, generator=g).to(device)
        self.target = torch.randn(b, self.dims.embed_dim, s, s, generator=g).to(device)  # one store record each
        self.embed_valid = torch.ones(b, s, s, dtype=torch.bool, device=device)
        self.mask_valid = torch.ones(b, 4 * s, 4 * s, dtype=torch.bool, device=device)
        self.prompts = ft_prompts(b, args.ft_prompts, g, device)
        one = {k: v[:, :1].clone() for k, v in ft_prompts(b, 1, g, device).items()}
        one["point_pad"][: b // 2] = True  # EdgeSAM style: half box-only, half point-only (PROMPT_MIX)
        one["box_pad"][b // 2 :] = True
        self.one_prompt = one
        self.keys = [f"img{i}" for i in range(b)]
        self.frozen = None
        self.frozen_dtype = torch.float32
        self.cache = HostTeacherCache()
        self.device_cache = self._device_cache()

    def _device_cache(self) -> DeviceTeacherCache:
        """The GPU-resident teacher cache (DISTILL.CACHE_TEACHER_DEVICE_GB > 0) with room for the batch."""
        s = 4 * self.args.embed_size
        return DeviceTeacherCache(len(self.keys), 1e12, (s, s), self.device)

    def amp(self, dtype: torch.dtype = torch.float16):
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.gpu)

    def set_frozen(self, level: int, dtype: torch.dtype, mode: str = "eager") -> float:
        """A fresh frozen path (mode "compiled": torch.compile as MODEL.COMPILE_FROZEN on; "graphed": with
        CUDA graphs, MODEL.COMPILE_FROZEN reduce-overhead), both teacher caches filled by one cached step (the
        first epoch of a DISTILL.CACHE_TEACHER run); -> seconds of those steps (compiled: the compile of the
        teacher and student graphs, forward and backward; graphed: also the graph captures)."""
        torch.manual_seed(0)
        self.frozen = build_frozen_sam3("", self.dims, level).to(self.device)
        if mode != "eager":
            torch._dynamo.reset()  # a fresh compile per mode: no graph of the other mode's backend is reused
            graphs = "reduce-overhead" if mode == "graphed" else "default"
            compile_frozen(self.frozen, backend=self.args.ft_compile_backend, mode=graphs)
        self.frozen_dtype = dtype
        self.cache = HostTeacherCache()
        self.device_cache = self._device_cache()
        t0 = time.perf_counter()
        self.ft_step(True)
        self.ft_step("device")
        if self.gpu:
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def update(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.scaler.step(self.opt)
        self.scaler.update()

    def stage1_step(self) -> None:
        """The stage-1 trainer's step (its loss reads its parts with .item(): a host sync before the backward)."""
        with self.amp():
            pred = self.student(self.images)
        self.update(stage1_loss(pred, self.target, self.embed_valid)[0])

    def stage1_step_nosync(self) -> None:
        """The same step without reading the loss parts (the stage-1 loss total: MSE + cosine), the like-for-like
        base for an FT step that no longer reads its parts either."""
        with self.amp():
            pred = self.student(self.images).float()
        valid = self.embed_valid
        self.update(masked_mse(pred, self.target, valid) + masked_cosine(pred, self.target, valid))

    def student_fwd_bwd(self) -> None:
        with self.amp():
            pred = self.student(self.images)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(embedding_mse(pred, self.target, self.embed_valid)).backward()

    def _args(self) -> tuple:
        p = self.prompts
        return p["points"], p["point_pad"], p["boxes"], p["box_pad"]

    def frozen_teacher(self) -> None:
        """The teacher pass as the step runs it: scores of all queries, the best query's mask only."""
        frozen_step_begin(self.frozen)
        with torch.no_grad(), self.amp(self.frozen_dtype):
            self.frozen(self.target, *self._args(), mask_query="best")

    def frozen_student(self, all_queries: bool = False) -> None:
        """Frozen path forward on an embedding that needs a gradient, mask loss, backward to the embedding.
        all_queries: the former way (all Q masks computed, then one picked) for comparison."""
        frozen_step_begin(self.frozen)
        emb = self.target.detach().requires_grad_(True)
        idx = torch.zeros(len(self.keys), dtype=torch.long, device=self.device)
        labels = torch.ones(self.prompts["points"].shape[:2], dtype=torch.long, device=self.device)  # as ft_loss
        with self.amp(self.frozen_dtype):
            if all_queries:
                s_mask = pick(self.frozen(emb, *self._args(), point_labels=labels)["pred_masks"], idx)
            else:
                s_mask = self.frozen(emb, *self._args(), point_labels=labels, mask_query=idx)["pred_masks"][:, 0]
        bce, dice = mask_terms(s_mask, torch.zeros_like(s_mask, dtype=torch.float32), self.mask_valid)
        self.scaler.scale(bce + dice).backward()

    def ft_step(self, cached: bool | str, edgesam: bool = False) -> None:
        """cached: False, True (host cache, the trainer's default) or "device" (DISTILL.CACHE_TEACHER_DEVICE_GB)."""
        settings = DecodeSettings(LossWeights(), decode_iters=2, iter_on_box=True) if edgesam else DecodeSettings()
        prompts = self.one_prompt if edgesam else self.prompts
        cache = self.device_cache if cached == "device" else (self.cache if cached else None)
        with self.amp():
            pred = self.student(self.images)
        loss, _ = ft_loss(
            self.frozen, pred, self.target, prompts, self.embed_valid, self.mask_valid, settings,
            first_teacher=lambda a: teacher_targets(self.frozen, self.target, a, self.keys, cache),
            frozen_ctx=lambda: self.amp(self.frozen_dtype),
        )  # fmt: skip
        self.update(loss)

    def timed(self, name: str, fn, count: bool = False, flops: float | None = None, **info) -> dict:
        """Median ms of fn (merge_core's timing loop: CUDA events around each call), img/s, peak memory.
        flops: GFLOP/img counted before on the eager path (the counter does not see inside compiled code)."""
        if self.gpu:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t = measure(fn, self.device, self.args.warmup, self.args.iters)
        b = self.args.ft_batch
        row = {"part": name, **info, "batch": b, "ms": t["ms_median"], "ms_min": t["ms_min"],
               "img_per_s": b / t["ms_median"] * 1e3}  # fmt: skip
        if self.gpu:
            row["peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if count:
            row["frozen_calls"] = _count_calls(self.frozen, fn)
        # matmuls, convolutions and attention (torch's FLOP counter)
        row["gflop_per_img"] = flops if flops is not None else _flops(fn) / b / 1e9
        row["tflop_per_s"] = row["gflop_per_img"] * b / row["ms"]
        print(json.dumps(row))
        return row


def bench_finetune(args, device, save=lambda part: None) -> dict:
    """One FT step and its parts for each frozen dtype, FPN level and --ft-modes entry; see the module docstring.
    `save` gets the rows so far after each one (a killed run keeps them)."""
    t_start = time.perf_counter()
    fb = FTBench(args, device)
    rows: list[dict] = []
    summary: dict = {}
    gflop: dict = {}  # (part, level) -> GFLOP/img of the eager row, reused by the compiled one

    def add(row: dict) -> None:
        rows.append(row)
        save({"rows": rows, "summary": summary, "partial": True})

    def timed(name: str, fn, count: bool = False, **info) -> None:
        key = (name, info.get("level"))
        row = fb.timed(name, fn, count, gflop.get(key) if info.get("frozen", "eager") != "eager" else None, **info)
        gflop.setdefault(key, row["gflop_per_img"])
        add(row)

    timed("stage1_step", fb.stage1_step)
    timed("stage1_step_nosync", fb.stage1_step_nosync)
    timed("student_fwd_bwd", fb.student_fwd_bwd)
    if args.ft_profile:
        summary["profile"] = {"stage1": profile_step(fb.stage1_step, device, args.ft_profile_top)}
        print_profile("stage-1 step", summary["profile"]["stage1"])
    dtypes = args.ft_frozen_dtypes if fb.gpu else ["fp32"]
    # compiled / graphed rows reuse the eager rows' FLOP counts, so eager always runs first, then the others in
    # the order asked for
    modes = ["eager", *dict.fromkeys(m for m in args.ft_modes if m != "eager")]
    first = (dtypes[0], args.ft_levels[0])

    def run_mode(name: str, level: int, mode: str) -> None:
        """The rows (and the profile) of one frozen dtype, level and mode."""
        before = _compile_counts()
        warm_s = fb.set_frozen(level, DTYPES[name], mode)
        warm = _compile_counts()
        info = {"frozen_dtype": name, "level": level, "frozen": mode}
        if mode != "eager":
            summary[f"compile_s_{name}_{level}" + ("" if mode == "compiled" else f"_{mode}")] = warm_s
        timed("frozen_teacher", fb.frozen_teacher, **info)
        timed("frozen_student", fb.frozen_student, **info)
        if name == dtypes[0] and mode == "eager":
            timed("frozen_student_allq", lambda: fb.frozen_student(True), **info)
        timed("ft_step_cached", lambda: fb.ft_step(True), True, **info)
        timed("ft_step_cached_device", lambda: fb.ft_step("device"), True, **info)
        timed("ft_step_uncached", lambda: fb.ft_step(False), True, **info)
        if (name, level) == first and (mode == "eager" or args.ft_edgesam_compiled):
            timed("ft_step_edgesam", lambda: fb.ft_step(False, True), True, **info)
        if mode != "eager":  # graphs compiled while warming up / during the timed rows (should be 0)
            after = _compile_counts()
            summary[f"graphs_{name}_{level}_{mode}"] = {
                "warm_up": warm["graphs"] - before["graphs"], "during_rows": after["graphs"] - warm["graphs"],
                "cudagraph_skips": after["cudagraph_skips"] - before["cudagraph_skips"],
            }  # fmt: skip
        if args.ft_profile and (name, level) == first:
            for cache, suffix in (("device", ""), (True, "_host_cache")):
                prof = profile_step(lambda c=cache: fb.ft_step(c), device, args.ft_profile_top)
                summary.setdefault("profile", {})[mode + suffix] = prof
                print_profile(f"cached FT step ({suffix[1:] or 'device_cache'}), frozen path {mode}", prof)
            save({"rows": rows, "summary": summary, "partial": True})

    for name in dtypes:
        for level in args.ft_levels:
            for mode in modes:
                try:
                    run_mode(name, level, mode)
                except Exception as e:  # noqa: BLE001  (a failed mode must not lose the others' rows)
                    summary[f"error_{name}_{level}_{mode}"] = _why(e)
                    traceback.print_exc()
                    print(json.dumps({"mode": mode, "error": _why(e)}), flush=True)
                    save({"rows": rows, "summary": summary, "partial": True})
    stage1_ms = rows[0]["ms"]
    nosync_ms = rows[1]["ms"]
    for row in rows:
        row["x_stage1"] = row["ms"] / stage1_ms
        if row["part"].startswith("ft_step_cached"):
            row["x_stage1_nosync"] = row["ms"] / nosync_ms
    summary["stage1_ms"], summary["stage1_nosync_ms"] = stage1_ms, nosync_ms
    for row in rows:
        if row["part"].startswith("ft_step_") and row.get("level") == args.ft_levels[0]:
            key = f"{row['part']}_x_stage1" + ("" if row["frozen_dtype"] == dtypes[0] else f"_{row['frozen_dtype']}")
            summary[key + ("" if row["frozen"] == "eager" else f"_{row['frozen']}")] = row["x_stage1"]
    summary["target_met"] = min(v for k, v in summary.items() if k.startswith("ft_step_cached")) <= 1.5
    summary["target_met_uncached"] = min(v for k, v in summary.items() if k.startswith("ft_step_uncached_x")) <= 1.5
    cached = [r for r in rows if r["part"].startswith("ft_step_cached") and r.get("level") == args.ft_levels[0]]
    best = min(cached, key=lambda r: r["ms"])
    summary["best_cached"] = {"part": best["part"], "frozen": best["frozen"], "frozen_dtype": best["frozen_dtype"],
                              "ms": best["ms"], "x_stage1": best["x_stage1"],
                              "x_stage1_nosync": best["x_stage1_nosync"]}  # fmt: skip
    summary.update(flop_bound(rows, args.ft_levels[0]))
    summary["seconds"] = time.perf_counter() - t_start
    print_ft_table(rows, summary)
    return {"rows": rows, "summary": summary, "student": args.ft_student, "batch": args.ft_batch,
            "img_size": args.img_size, "prompts": args.ft_prompts}  # fmt: skip


def print_profile(title: str, prof: dict) -> None:
    """The profile's short table: wall vs GPU busy, host syncs and copies, the top kernels and CPU ops."""
    print(f"profile: {title}: wall {prof['wall_ms']:.2f} ms, GPU busy {prof['gpu_busy_ms']:.2f} ms "
          f"({prof['gpu_busy_frac']:.0%}), {prof['kernels']} kernels, {prof['scalar_reads']} scalar reads; "
          "syncs / copies: "
          + ", ".join(f"{k} {v}" for k, v in prof["sync_calls"].items()))  # fmt: skip
    if prof["launch_calls"]:
        print("  launches: " + ", ".join(f"{k} {v['count']} ({v['host_ms']:.1f} ms host)" for k, v in
                                         prof["launch_calls"].items()))  # fmt: skip
    for e in prof["top_kernels"][:10]:
        print(f"  gpu {e['self_ms']:8.3f} ms x{e['count']:<5} {e['name'][:90]}")
    for e in prof["top_cpu_ops"][:10]:
        print(f"  cpu {e['self_ms']:8.3f} ms x{e['count']:<5} {e['name'][:90]}")


def flop_bound(rows: list[dict], level: int) -> dict:
    """What counted FLOPs allow: the frozen path for the student (forward + backward to the embedding) against
    the student's own fwd+bwd, and the cached FT step's floor if the frozen path ran as fast per FLOP as the
    best measured frozen-student row: stage-1 time + frozen GFLOP / best frozen TFLOP/s."""
    by = {(r["part"], r.get("level"), r.get("frozen"), r.get("frozen_dtype")): r for r in rows}
    student = by[("student_fwd_bwd", None, None, None)]
    frozen = [r for r in rows if r["part"] == "frozen_student" and r["level"] == level]
    if not frozen:
        return {}
    best = max(frozen, key=lambda r: r["tflop_per_s"])
    out = {"student_gflop_per_img": student["gflop_per_img"], "frozen_student_gflop_per_img": best["gflop_per_img"],
           "frozen_student_flop_x_student": best["gflop_per_img"] / student["gflop_per_img"],
           "frozen_student_best_tflop_per_s": best["tflop_per_s"], "frozen_student_best_ms": best["ms"]}  # fmt: skip
    out["frozen_student_x_stage1_at_best"] = best["ms"] / rows[0]["ms"]
    return out


def print_ft_table(rows: list[dict], summary: dict) -> None:
    print(f"{'part':<18} {'frozen':>6} {'mode':>8} {'level':>5} {'ms':>9} {'img/s':>9} {'x stage-1':>9} "
          f"{'frozen calls':>12} {'GFLOP/img':>9} {'TFLOP/s':>8} {'peak GiB':>8}")  # fmt: skip
    for r in rows:
        print(f"{r['part']:<18} {r.get('frozen_dtype', '-'):>6} {r.get('frozen', '-'):>8} {r.get('level', '-'):>5} "
              f"{r['ms']:9.2f} {r['img_per_s']:9.2f} {r['x_stage1']:9.2f} {r.get('frozen_calls', '-'):>12} "
              f"{r['gflop_per_img']:9.1f} {r['tflop_per_s']:8.2f} {r.get('peak_gib', float('nan')):8.2f}")  # fmt: skip
    print(f"target FT step <= 1.5x stage-1: cached {summary['target_met']}, uncached "
          f"{summary['target_met_uncached']} ({summary['seconds']:.0f} s)")  # fmt: skip
    b = summary.get("best_cached")
    if b:
        print(f"best cached FT step: {b['part']} ({b['frozen']}, {b['frozen_dtype']}) {b['ms']:.2f} ms = "
              f"{b['x_stage1']:.2f}x the stage-1 step, {b['x_stage1_nosync']:.2f}x the stage-1 step without its "
              f"loss-part reads")  # fmt: skip
    if "frozen_student_flop_x_student" in summary:
        print(f"FLOP bound: frozen path for the student {summary['frozen_student_gflop_per_img']:.0f} GFLOP/img = "
              f"{summary['frozen_student_flop_x_student']:.2f}x the student's fwd+bwd "
              f"({summary['student_gflop_per_img']:.0f}); at its best {summary['frozen_student_best_tflop_per_s']:.0f} "
              f"TFLOP/s it alone is {summary['frozen_student_x_stage1_at_best']:.2f}x a stage-1 step")  # fmt: skip


def _read_pass(reader: ParallelReader, keys: list[str]) -> float:
    """MB/s of reading every key once through `reader`, in chunks of 4 records per thread into one buffer."""
    chunk = min(4 * reader.threads, len(keys))
    buf = reader.buffer(chunk)
    t0 = time.perf_counter()
    for i in range(0, len(keys), chunk):
        group = keys[i : i + chunk]
        reader.read(group, buf[: len(group)])
    return len(keys) * reader.store.item / (time.perf_counter() - t0) / 1e6


def _memmap_pass(store: EmbeddingStore, keys: list[str]) -> float:
    """MB/s of the old path: one thread copying each record out of the memory map."""
    t0 = time.perf_counter()
    for k in keys:
        np.array(store.view(k))
    return len(keys) * store.item / (time.perf_counter() - t0) / 1e6


def bench_store(args) -> list[dict]:
    """Read MB/s per reader count, cold (fsync'd store, POSIX_FADV_DONTNEED before the pass: the kernel drops
    clean cached pages, no root needed) and warm (the pass right after), random record order, vs training."""
    work = Path(args.workdir or tempfile.mkdtemp(prefix="es3store_"))
    store_dir = work / "store_read_bench"
    c, s = args.embed_dim, args.embed_size
    try:
        t0 = time.perf_counter()
        emb = torch.randn(c, s, s)
        with StoreWriter(store_dir, 0, c, s) as w:
            n = max(int(args.store_gb * 1e9) // w.item, 2)
            for i in range(len(w.done), n):
                w.write(f"k{i}", i, emb)
        write_s = time.perf_counter() - t0
        store = EmbeddingStore(str(store_dir))
        keys = [f"k{i}" for i in np.random.default_rng(0).permutation(n)]
        base = {"records": n, "record_bytes": store.item, "gb": n * store.item / 1e9, "dir": str(work),
                "consumed_mb_s": args.consumed_mb_s}  # fmt: skip
        rows: list[dict] = []

        def add(path: str, threads: int, cache: str, mb_s: float) -> None:
            rows.append({"path": path, "readers": threads, "cache": cache, "read_mb_s": mb_s,
                         "headroom": mb_s / args.consumed_mb_s, **base})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)

        print(json.dumps({"store_written_s": write_s, **base}), flush=True)
        store.evict()
        add("memmap", 1, "cold", _memmap_pass(store, keys))
        for threads in args.store_readers:
            with ParallelReader(store, threads) as reader:
                store.evict()
                add("pread", threads, "cold", _read_pass(reader, keys))
                add("pread", threads, "warm", _read_pass(reader, keys))
        store.close()
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'path':<7} {'readers':>7} {'cache':<5} {'MB/s':>8} {'x training':>10}")
    for r in rows:
        print(f"{r['path']:<7} {r['readers']:>7} {r['cache']:<5} {r['read_mb_s']:8.0f} {r['headroom']:10.2f}")
    print(f"training consumes {args.consumed_mb_s:.0f} MB/s; {rows[0]['gb']:.2f} GB store, random record order")
    return rows


def build_parser():
    p = OneLineArgumentParser(prog="efficientsam3-bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "--suite",
        action="append",
        choices=("students", "teacher", "distill", "train", "store", "finetune"),
        default=None,
    )
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
    p.add_argument("--merge", nargs="+", default=None, metavar="W:G",
                   help="window r : global r pairs; span mode: W may be a schedule, e.g. 288+144:0")  # fmt: skip
    p.add_argument("--merge-modes", nargs="+", default=["attn", "block"], choices=("attn", "block", "span"))
    p.add_argument("--compile", action="store_true", help="torch.compile the teacher (exact and merged)")
    p.add_argument("--time-budget", type=float, default=0.0, help="teacher suite: skip merged rows past this (s)")
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
    p.add_argument("--workdir", default=None, help="folder for the train / store suites' stores (default: temp)")
    p.add_argument("--train-readers", type=int, default=8, help="train suite: reader threads of its read row")
    p.add_argument("--store-gb", type=float, default=None, help="store suite: size of the store written (GB)")
    p.add_argument("--store-readers", type=int, nargs="+", default=[1, 4, 8, 16], help="store suite: threads")
    p.add_argument("--consumed-mb-s", type=float, default=1430.2,
                   help="store suite: MB/s training reads (H200 ES-RV-M stage-1: 134.7 img/s x 10.6 MB)")  # fmt: skip
    p.add_argument("--ft-student", default=None, help="finetune suite: student (repvit_m1_1 = ES-RV-M)")
    p.add_argument("--ft-batch", type=int, default=None, help="finetune suite: batch (4, the FT recipe's per GPU)")
    p.add_argument("--ft-prompts", type=int, default=16, help="finetune suite: boxes and points per image")
    p.add_argument("--ft-frozen-dtypes", nargs="+", default=["bf16", "fp16"], choices=("bf16", "fp16"),
                   help="finetune suite: autocast dtypes of the frozen SAM3 path (GPU)")  # fmt: skip
    p.add_argument("--ft-levels", type=int, nargs="+", default=[72, 36], choices=(72, 36),
                   help="finetune suite: FPN levels fed to the frozen path (the first is the summary's)")  # fmt: skip
    p.add_argument("--ft-modes", nargs="+", default=["eager"], choices=FT_MODES,
                   help="finetune suite: frozen path eager, torch.compile'd and/or compiled with CUDA graphs "
                        "(graphed = MODEL.COMPILE_FROZEN reduce-overhead); eager always runs first (its FLOP "
                        "counts serve the others), then compiled, then graphed")  # fmt: skip
    p.add_argument("--ft-compile-backend", default="inductor", choices=("inductor", "aot_eager", "eager"),
                   help="finetune suite: torch.compile backend of the compiled / graphed rows (CPU smoke runs: "
                        "aot_eager; CUDA graphs need inductor)")  # fmt: skip
    p.add_argument("--ft-profile", action="store_true",
                   help="finetune suite: one cached FT step per mode under torch.profiler (top kernels and CPU "
                        "ops, host syncs and copies, GPU busy vs wall) into the summary's 'profile'")  # fmt: skip
    p.add_argument("--ft-profile-top", type=int, default=25, help="finetune suite: kernels / ops kept per profile")
    p.add_argument("--ft-edgesam-compiled", action="store_true", help="finetune suite: EdgeSAM row compiled too")
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
        "store_gb": (0.02, 4.0),
        "warmup": (1, 5), "iters": (2, 20),
        "ft_student": ("efficientvit_b0", "repvit_m1_1"), "ft_batch": (2, 4),
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
    parser = build_parser()
    args = parser.parse_args(argv)
    _defaults(args)
    for spec in args.merge:
        try:
            parse_merge_spec(spec)
        except ValueError as e:
            parser.error(str(e))
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

        def save(rows: list[dict]) -> None:  # partial results survive a killed run
            if args.out:
                write_json_atomic(args.out, {**result, "teacher": rows})

        result["teacher"] = bench_teacher(args, device, tdtype, save)
    if "distill" in suites:
        result["distill"] = bench_distill(args, device, dtype)
    if "train" in suites:
        result["train"] = bench_train(args, device, dtype)
    if "store" in suites:
        result["store"] = bench_store(args)
    if "finetune" in suites:

        def save_ft(part: dict) -> None:
            if args.out:
                write_json_atomic(args.out, {**result, "finetune": part})

        result["finetune"] = bench_finetune(args, device, save_ft)
    if args.out:
        write_json_atomic(args.out, result)
    return result


if __name__ == "__main__":
    main()
