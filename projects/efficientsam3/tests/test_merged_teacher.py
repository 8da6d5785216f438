"""The merged teacher: merge-core's conformance suite, plus behaviour checked against hand-built cases."""

import pytest
import torch

from efficientsam3.bench import main as bench_main
from efficientsam3.bench import parse_merge_spec
from efficientsam3.config import ConfigError
from efficientsam3.engine.common import base_parser, config_from_args, teacher_on
from efficientsam3.model.merged_teacher import (
    apply_merging,
    attended_tokens,
    block_runs,
    check_span_schedule,
    remove_merging,
    span_tokens,
    window_global_schedule,
)
from efficientsam3.model.sam3_vit import TINY_VIT, SAM3ViT, ViTConfig, to_window_major
from efficientsam3.store.compact import embedding_error
from merge_core import bipartite_soft_matching
from merge_core.adapter import state_of
from merge_core.merge import merge_source
from merge_core.testing.conformance import AdapterCase, AdapterConformance


def _build() -> SAM3ViT:
    """The reference path: a merged trunk always runs it, so r = 0 must equal it bit for bit (the fast
    path equals it to rounding, tested in test_teacher.py)."""
    torch.manual_seed(0)
    m = SAM3ViT(TINY_VIT).eval()
    m.fast = False
    return m


def _inputs() -> torch.Tensor:
    return torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(1))


_SCHEDULE = window_global_schedule(_build(), 3, 8)  # 16-token windows lose 3, the 64-token grid loses 8


class TestSam3TrunkConformance(AdapterConformance):
    cases = [
        AdapterCase(
            name="sam3_tiny",
            build=_build,
            inputs=_inputs,
            patch=lambda m: apply_merging(m, 0, 0),
            num_tokens=64,
            r=_SCHEDULE,
            expected_tokens=lambda schedule: attended_tokens(_build(), schedule),
            atol=1e-4,
        ),
        AdapterCase(
            name="sam3_tiny_block",
            build=_build,
            inputs=_inputs,
            patch=lambda m: apply_merging(m, 0, 0, mode="block"),
            num_tokens=64,
            r=_SCHEDULE,
            expected_tokens=lambda schedule: attended_tokens(_build(), schedule),
            atol=1e-4,
            run_compile=False,  # same ops as sam3_tiny; compile is the slowest check on CPU
            dtypes=(torch.bfloat16,),
        ),
    ]


def test_schedule_and_counts():
    m = apply_merging(_build(), 3, 8)
    assert m.r == [3, 8, 3, 8]  # TINY_VIT: blocks 1 and 3 are global
    with torch.no_grad():
        y = m(_inputs())
    assert y.shape == (1, 32, 8, 8)
    assert state_of(m).tokens == [13, 56, 13, 56]


def _sharp() -> SAM3ViT:
    """Random weights large enough that attention, not the residual, dominates the output."""
    m = _build()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.mul_(15)
    return m


def test_duplicate_tokens_merge_exactly():
    """Every token has an exact twin (adjacent columns) and RoPE is the identity: merging each twin pair
    (r = N/2) and attending with log(size) on the keys equals full attention (softmax algebra)."""
    m = _sharp()
    blk = m.blocks[1]  # global block, 8x8 grid
    blk.attn.freqs_cis = torch.ones_like(blk.attn.freqs_cis)
    x = torch.randn(1, 8, 4, 32).repeat_interleave(2, dim=2)  # columns 2j and 2j+1 identical
    with torch.no_grad():
        exact = blk.attn(blk.norm1(x))
    apply_merging(m, 0, 32)
    m._merge_info.begin(len(m.blocks), m.r)
    with torch.no_grad():
        merged = blk.attn(blk.norm1(x))
    torch.testing.assert_close(merged, exact, atol=1e-5, rtol=1e-4)


def test_fidelity_falls_with_r():
    """Cosine to the exact embedding falls as r grows (r=0 is exact)."""
    x = _inputs()
    with torch.no_grad():
        exact = _sharp()(x)
    cos = []
    for r in (0, 2, 6):
        m = apply_merging(_sharp(), r, 4 * r)
        with torch.no_grad():
            y = m(x)
        e = embedding_error(exact, y)
        cos.append(e["cos_sum"] / e["cos_n"])
    assert abs(cos[0] - 1.0) < 1e-6
    assert cos[0] > cos[1] > cos[2]


def test_block_mode_duplicates_exact():
    """mode="block": with exact twins and identity RoPE, attention, projection and MLP on the merged set and
    unmerged equal the full block."""
    m = _sharp()
    blk = m.blocks[1]
    blk.attn.freqs_cis = torch.ones_like(blk.attn.freqs_cis)
    x = torch.randn(1, 8, 4, 32).repeat_interleave(2, dim=2)
    with torch.no_grad():
        exact = blk(x)
    apply_merging(m, 0, 32, mode="block")
    m._merge_info.begin(len(m.blocks), m.r)
    with torch.no_grad():
        merged = blk(x)
    assert m._merge_info.tokens == [] and m.r[1] == 32
    torch.testing.assert_close(merged, exact, atol=1e-4, rtol=1e-4)


def test_block_mode_differs_from_attn_mode():
    x = _inputs()
    with torch.no_grad():
        a = apply_merging(_sharp(), 4, 16, mode="attn")(x)
        b = apply_merging(_sharp(), 4, 16, mode="block")(x)
    assert not torch.allclose(a, b)


# ---------------------------------------------------------------------------------------------- mode="span"
# Consecutive windowed blocks (0-1) so a run spans more than one block; blocks 2 and 4 are global.
SPAN_VIT = ViTConfig(
    img_size=112, pretrain_img_size=56, embed_dim=32, depth=5, num_heads=2, window_size=4, global_att_blocks=(2, 4)
)


def _build_span() -> SAM3ViT:
    torch.manual_seed(0)
    m = SAM3ViT(SPAN_VIT).eval()
    m.fast = False  # the unpatched model the conformance suite compares r = 0 against
    return m


def _span_counts(schedule: list[int]) -> list[int]:
    return attended_tokens(_build_span(), schedule)


class TestSam3TrunkSpanConformance(AdapterConformance):
    cases = [
        AdapterCase(
            name="sam3_tiny_span",
            build=_build_span,
            inputs=_inputs,
            patch=lambda m: apply_merging(m, 0, 0, mode="span"),
            num_tokens=64,
            r=window_global_schedule(_build_span(), 3, 8),
            expected_tokens=_span_counts,
            atol=1e-4,
            compile_marks=("slow",),
        )
    ]


def test_span_runs_and_counts():
    m = apply_merging(_build_span(), 5, 0, mode="span")
    assert block_runs(m) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    with torch.no_grad():
        y = m(_inputs())
    assert y.shape == (1, 32, 8, 8)
    assert state_of(m).tokens == [11, 11, 64, 11, 64]  # 16-token windows keep 11; global blocks exact
    apply_merging(m, 100, 100, mode="span")  # ToMe's clamp: at most half of each window / of the grid
    with torch.no_grad():
        m(_inputs())
    assert state_of(m).tokens == [8, 8, 32, 8, 32]


def test_span_r0_is_the_fast_path_bit_for_bit():
    m = SAM3ViT(SPAN_VIT).eval()
    x = _inputs()
    with torch.no_grad():
        exact = m(x)  # fast path
        apply_merging(m, 0, 0, mode="span")
        assert torch.equal(m(x), exact)


def _rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Channel pairs as complex numbers times the (complex) rotation: RoPE from its definition."""
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * freqs).flatten(-2)


def _ref_block(blk, x: torch.Tensor, freqs: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """One block over (m, C) tokens with per-token complex rotations and key sizes, explicit softmax."""
    a = blk.attn
    h, d = a.num_heads, a.head_dim
    q, k, v = a.qkv(blk.norm1(x)).reshape(-1, 3, h, d).permute(1, 2, 0, 3)
    q, k = _rope(q, freqs), _rope(k, freqs)
    logits = q @ k.transpose(-1, -2) / d**0.5 + size.log()
    out = (logits.softmax(-1) @ v).transpose(0, 1).reshape(-1, h * d)
    x = x + a.proj(out)
    return x + blk.mlp(blk.norm2(x))


def _ref_span_trunk(m: SAM3ViT, img: torch.Tensor, steps: tuple[int, ...], global_r: int) -> torch.Tensor:
    """Span merging written from the math, one image, one group (window or grid) at a time, float64. Windowed
    runs merge steps[j] more tokens at their j-th block, global blocks global_r. Each merge is a 0/1 source map S
    from merge-core's matching (never re-implemented) over the current tokens; sizes add (S @ size) and the
    merge is the size-weighted average A = S diag(size) / (S @ size); a merged token's rotation is A @ rotations;
    the exit undoes the steps last to first: every pre-merge token gets its own value plus S^T of its merged
    token's change."""
    cfg = m.cfg
    g, ws = cfg.grid, cfg.window_size
    x = m.ln_pre(m.patch_embed(img) + m.abs_pos(g, g))[0]  # (g, g, C)
    windows = [
        [(wy * ws + i) * g + wx * ws + j for i in range(ws) for j in range(ws)]
        for wy in range(g // ws)
        for wx in range(g // ws)
    ]
    flat = x.reshape(g * g, -1)
    i = 0
    while i < len(m.blocks):
        blk = m.blocks[i]
        stop = i + 1
        if blk.window_size:
            while stop < len(m.blocks) and m.blocks[stop].window_size:
                stop += 1
        groups = windows if blk.window_size else [list(range(g * g))]
        run_steps = steps if blk.window_size else (global_r,)
        if not run_steps[0]:
            run_steps = ()
        new = flat.clone()
        for idx in groups:
            xm = flat[idx]
            fm = blk.attn.freqs_cis.to(torch.complex128)
            size = torch.ones(len(idx), dtype=xm.dtype)
            undo = []
            for j, b in enumerate(m.blocks[i:stop]):
                a = b.attn
                h, d = a.num_heads, a.head_dim
                q, k, v = a.qkv(b.norm1(xm)).reshape(-1, 3, h, d).permute(1, 2, 0, 3)
                q, k = _rope(q, fm), _rope(k, fm)
                r = run_steps[j] if j < len(run_steps) else 0
                if r:
                    metric = k.mean(0)
                    merge, _ = bipartite_soft_matching(metric[None], r, protected=0)
                    src = merge_source(merge, metric[None])[0]  # (m', m) 0/1
                    new_size = src @ size
                    avg = src * size[None] / new_size[:, None]
                    undo.append((xm, src, avg @ xm))
                    xm = avg @ xm
                    q, k, v = (avg @ t for t in (q, k, v))
                    fm = avg.to(torch.complex128) @ fm  # mean rotation of each merged token
                    size = new_size
                logits = q @ k.transpose(-1, -2) / d**0.5 + size.log()
                out = (logits.softmax(-1) @ v).transpose(0, 1).reshape(len(size), -1)
                xm = xm + a.proj(out)
                xm = xm + b.mlp(b.norm2(xm))
            for pre, src, xm0 in reversed(undo):
                xm = pre + src.T @ (xm - xm0)
            new[idx] = xm
        flat = new
        i = stop
    return flat.reshape(g, g, -1).permute(2, 0, 1)[None]


def test_span_matches_independent_reference():
    m = _sharp_span().double()
    img = _inputs().double()
    for window_r, global_r in ((5, 0), (3, 12)):
        apply_merging(m, window_r, global_r, mode="span")
        with torch.no_grad():
            got = m(img)
            want = _ref_span_trunk(m, img, (window_r,), global_r)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        remove_merging(m)


def _sharp_span() -> SAM3ViT:
    m = SAM3ViT(SPAN_VIT).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.mul_(15)
    return m


def test_span_duplicates_exact():
    """Every token has an exact twin in the next column and RoPE is the identity: merging each pair (r = half
    a window) and running the whole span on the merged set equals the exact blocks (proportional attention)."""
    m = _sharp_span()
    for blk in m.blocks:
        blk.attn.freqs_cis = torch.ones_like(blk.attn.freqs_cis)
        blk.attn.refresh_rope()
    x = torch.randn(1, 8, 4, 32).repeat_interleave(2, dim=2)  # columns 2j and 2j+1 identical
    t = to_window_major(x, 4)
    with torch.no_grad():
        exact = t
        for blk in m.blocks:
            exact = blk.forward_tokens(exact, 4)
        apply_merging(m, 8, 0, mode="span")
        state = state_of(m)
        state.begin(len(m.blocks), m.r)
        merged = span_tokens(m, t, 4, state)
    assert state.tokens == [8, 8, 64, 8, 64]
    torch.testing.assert_close(merged, exact, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((-1, 0, "span"), "MERGE_R / MERGE_GLOBAL_R: expected >= 0"),
        ((2.5, 0, "span"), "TEACHER.MERGE_R: expected an int >= 0"),
        ((2, True, "span"), "TEACHER.MERGE_GLOBAL_R: expected an int"),
        ((2, 0, "tokens"), "TEACHER.MERGE_MODE: expected one of attn, block, span"),
    ],
)
def test_bad_merge_arguments_one_line(args, match):
    with pytest.raises(ValueError, match=match) as err:
        apply_merging(_build_span(), args[0], args[1], mode=args[2])
    assert "\n" not in str(err.value)


def test_span_errors_one_line():
    cfg = ViTConfig(img_size=84, pretrain_img_size=42, embed_dim=32, depth=2, num_heads=2, window_size=4,
                    global_att_blocks=(1,))  # fmt: skip
    with pytest.raises(ValueError, match="span needs windows tiling the grid, got grid 6, window 4") as err:
        apply_merging(SAM3ViT(cfg), 2, 0, mode="span")
    assert "\n" not in str(err.value)
    m = apply_merging(_build_span(), 2, 0, mode="span")
    m.r = [2, 3, 0, 2, 0]  # blocks 0-1 share a run: one r
    with pytest.raises(ValueError, match=r"blocks 0-1 need one r, got \[2, 3\]") as err, torch.no_grad():
        m(_inputs())
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------ span mode, progressive schedule
# Two runs of three windowed blocks (0-2, 4-6) so a schedule can merge at up to three blocks; 3 and 7 are global.
SCHED_VIT = ViTConfig(
    img_size=112, pretrain_img_size=56, embed_dim=32, depth=8, num_heads=2, window_size=4, global_att_blocks=(3, 7)
)


def _build_sched() -> SAM3ViT:
    torch.manual_seed(0)
    m = SAM3ViT(SCHED_VIT).eval()
    m.fast = False
    return m


def _sharp_sched() -> SAM3ViT:
    m = _build_sched()
    m.fast = True
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.mul_(15)
    return m


_STEPS = (3, 2, 1)  # 16-token windows: 13, then 11, then 10


class TestSam3TrunkSpanScheduleConformance(AdapterConformance):
    cases = [
        AdapterCase(
            name="sam3_tiny_span_schedule",
            build=_build_sched,
            inputs=_inputs,
            patch=lambda m: apply_merging(m, 0, 0, mode="span", span_schedule=list(_STEPS)),
            num_tokens=64,
            r=window_global_schedule(_build_sched(), 3, 8),
            expected_tokens=lambda schedule: attended_tokens(_build_sched(), schedule, _STEPS),
            atol=1e-4,
            compile_marks=("slow",),
        )
    ]


def test_span_schedule_zero_is_exact_bit_for_bit():
    m = _sharp_sched()
    x = _inputs()
    with torch.no_grad():
        exact = m(x)
        apply_merging(m, 0, 0, mode="span", span_schedule=[0, 0, 0])
        assert m.r == [0] * 8 and state_of(m).extra["span_schedule"] == ()
        assert torch.equal(m(x), exact)


@pytest.mark.parametrize(
    ("steps", "global_r", "tokens"),
    [
        ([5, 2], 0, [11, 9, 9, 64, 11, 9, 9, 64]),
        ([8, 4, 2], 0, [8, 4, 2, 64, 8, 4, 2, 64]),
        ([6, 0, 3], 16, [10, 10, 7, 48, 10, 10, 7, 48]),
    ],
)
def test_span_schedule_token_counts(steps, global_r, tokens):
    m = apply_merging(_build_sched(), 0, global_r, mode="span", span_schedule=steps)
    with torch.no_grad():
        y = m(_inputs())
    assert y.shape == (1, 32, 8, 8)
    assert state_of(m).tokens == tokens
    assert attended_tokens(m, m.r, steps) == tokens


def test_span_schedule_matches_independent_reference():
    m = _sharp_sched().double()
    img = _inputs().double()
    for steps, global_r in (((5, 3), 0), ((4, 0, 2), 12)):
        apply_merging(m, 0, global_r, mode="span", span_schedule=list(steps))
        with torch.no_grad():
            got = m(img)
            want = _ref_span_trunk(m, img, steps, global_r)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        remove_merging(m)


def test_span_schedule_twins_merge_exactly_in_two_steps():
    """Columns 4j..4j+3 identical and RoPE the identity: step 1 (r = 8) merges each window's 16 tokens into
    8 pairs, step 2 (r = 4) the pairs into 4 quads; proportional attention keeps every block exact, and the
    composed unmerge restores all 64 tokens."""
    m = _sharp_sched()
    for blk in m.blocks:
        blk.attn.freqs_cis = torch.ones_like(blk.attn.freqs_cis)
        blk.attn.refresh_rope()
    x = torch.randn(1, 8, 2, 32).repeat_interleave(4, dim=2)
    t = to_window_major(x, 4)
    with torch.no_grad():
        exact = t
        for blk in m.blocks:
            exact = blk.forward_tokens(exact, 4)
        apply_merging(m, 8, 0, mode="span", span_schedule=[8, 4])
        state = state_of(m)
        state.begin(len(m.blocks), m.r)
        merged = span_tokens(m, t, 4, state)
    assert state.tokens == [8, 4, 4, 64, 8, 4, 4, 64]
    torch.testing.assert_close(merged, exact, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"span_schedule": [9]}, r"step 0 merges 9 of the 16 tokens left per window, at most half \(8\)"),
        ({"span_schedule": [8, 5]}, r"step 1 merges 5 of the 8 tokens left per window, at most half \(4\)"),
        ({"span_schedule": [4, 2.5]}, "expected a list of ints >= 0"),
        ({"span_schedule": [4, True]}, "expected a list of ints >= 0"),
        ({"span_schedule": "4+2"}, "expected a list of ints >= 0"),
        ({"span_schedule": [4, -1]}, r"expected ints >= 0, got \[4, -1\]"),
        ({"span_schedule": [2, 1, 1, 1, 0]}, r"4 steps, longer than the shortest run of windowed blocks \(3\)"),
        ({"span_schedule": [2, 1, 1, 1]}, r"4 steps, longer than the shortest run of windowed blocks \(3\)"),
        ({"span_schedule": [0, 4]}, "the first entry is the merge at each run's first block, expected > 0"),
        ({"span_schedule": [4, 2], "mode": "block"}, "needs TEACHER.MERGE_MODE span, got 'block'"),
        ({"span_schedule": [4, 2], "window_r": 3}, r"TEACHER.MERGE_R: .* expected 0 or 4, got 3"),
    ],
)
def test_bad_span_schedule_one_line(kwargs, match):
    kw = {"window_r": 0, "global_r": 0, "mode": "span", **kwargs}
    with pytest.raises(ValueError, match=match) as err:
        apply_merging(_build_sched(), kw.pop("window_r"), kw.pop("global_r"), **kw)
    assert "\n" not in str(err.value)


def test_span_schedule_checked_against_each_trunk():
    assert check_span_schedule(_build_sched(), [8, 4, 2]) == (8, 4, 2)
    assert check_span_schedule(_build_sched(), []) == ()
    assert check_span_schedule(_build_sched(), [0, 0]) == ()
    assert check_span_schedule(_build_sched(), [8, 4, 0]) == (8, 4)
    with pytest.raises(ValueError, match=r"2 steps, longer than the shortest run of windowed blocks \(1\)"):
        check_span_schedule(_build_span(), [4, 2])  # SPAN_VIT: windowed runs 0-1 and 3


# ------------------------------------------------------------------------- config key, CLI flag, bench --merge
def _cfg(tiny_cfg, *argv: str, opts: tuple[str, ...] = ()):
    args = base_parser("t", "t").parse_args(
        ["--cfg", str(tiny_cfg), "--teacher-type", "sam3_tiny", "--merge-mode", "span", *argv,
         "--opts", "DISTILL.EMBED_DIM", "32", "DATA.IMG_SIZE", "112", *opts]
    )  # fmt: skip
    return config_from_args(args)[0]


def test_span_schedule_config_key_and_flag(tiny_cfg):
    t = teacher_on(_cfg(tiny_cfg, "--merge-span-schedule", "4"), torch.device("cpu"))
    assert t.r == [4, 0, 4, 0] and state_of(t).extra["span_schedule"] == (4,)  # TINY_VIT: runs of one block
    cfg = _cfg(tiny_cfg, opts=("TEACHER.MERGE_SPAN_SCHEDULE", "[0, 0]"))
    assert list(cfg.TEACHER.MERGE_SPAN_SCHEDULE) == [0, 0]
    assert not hasattr(teacher_on(cfg, torch.device("cpu")), "_merge_info")  # all zero: the exact teacher


@pytest.mark.parametrize(
    ("argv", "err", "match"),
    [
        (["--merge-span-schedule", "4", "-1"], ConfigError, r"MERGE_SPAN_SCHEDULE: expected a list of ints >= 0"),
        (["--merge-mode", "attn", "--merge-span-schedule", "4"], ConfigError, "needs TEACHER.MERGE_MODE span"),
        ([], ConfigError, "--opts TEACHER.MERGE_SPAN_SCHEDULE"),
        (["--merge-span-schedule", "4", "2"], ValueError, r"2 steps, longer than the shortest run .*\(1\)"),
    ],
)
def test_bad_span_schedule_config_one_line(tiny_cfg, argv, err, match):
    opts = () if argv else ("TEACHER.MERGE_SPAN_SCHEDULE", "4")  # an int where a list belongs
    with pytest.raises(err, match=match) as e:
        teacher_on(_cfg(tiny_cfg, *argv, opts=opts), torch.device("cpu"))
    assert "\n" not in str(e.value)


def test_bench_merge_spec():
    assert parse_merge_spec("288+144:0") == ([288, 144], 0)
    assert parse_merge_spec("288+72+72:2592") == ([288, 72, 72], 2592)
    assert parse_merge_spec("96:864") == ([96], 864)
    for bad in ("288", "288+:0", "a:0", "1:2:3"):
        with pytest.raises(ValueError, match="--merge: expected W:G or W1\\+W2"):
            parse_merge_spec(bad)
    with pytest.raises(SystemExit):
        bench_main(["--tiny", "--device", "cpu", "--suite", "teacher", "--merge", "4+x:0"])


def test_bench_teacher_reports_a_bad_schedule_row(capsys):
    """TINY_VIT's windowed runs are one block long: a two-step schedule is a one-line skipped row, the
    single merge beside it runs."""
    r = bench_main(["--tiny", "--device", "cpu", "--suite", "teacher", "--merge", "4:0", "4+2:0",
                    "--merge-modes", "span"])  # fmt: skip
    rows = {row.get("merge"): row for row in r["teacher"]}
    assert rows["4:0"]["attended"] == [12, 64, 12, 64] and rows["4:0"]["tflop_per_img"] > 0
    assert "longer than the shortest run" in rows["4+2:0"]["skipped"] and rows["4+2:0"]["window_r"] == 4
