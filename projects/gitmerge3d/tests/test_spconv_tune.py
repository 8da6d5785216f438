"""spconv-triton autotune narrowing (``spconv_tune``): which configs each mode keeps, checked on CPU.

spconv-triton's kernels cannot run without a GPU, but its autotuners (config lists, prune hooks) import on
any machine with triton; where spconv-triton is not installed, the wheel in ``.whl/`` is imported directly.
"""

import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from gitmerge3d.models import spconv_tune as st  # noqa: E402

WHEELS = sorted((Path(__file__).resolve().parents[3] / ".whl").glob("spconv_triton-*.whl"))


def _cfg(bm, bn, br, w, s, g=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_R": br, "GROUP_SIZE_M": g}, num_warps=w, num_stages=s)


# a hand-made GEMM list: two configs of the 48-64 band, one of the >128 band, one unrelated
CONFIGS = [_cfg(64, 64, 32, 4, 3), _cfg(128, 128, 32, 8, 3), _cfg(32, 32, 32, 2, 5), _cfg(128, 64, 32, 4, 3)]
GEMM = st.RULES[0]


@pytest.fixture
def mode():
    """Restore the process-wide mode after a test changes it."""
    before = st.get_tune_mode()
    yield st.set_tune_mode
    st.set_tune_mode(before)
    if "spconv_triton" in sys.modules:
        st.install()


def _blocks(configs):
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_R"], c.num_warps) for c in configs]


def test_narrow_keeps_the_band_configs_best_first():
    got = st.select_configs(CONFIGS, GEMM, {"N_dim": 48, "R_dim": 48}, "narrow")
    # band <= 64 lists 128x64x32 (4 warps) before 64x64x32; the others are not in that band
    assert _blocks(got) == [(128, 64, 32, 4), (64, 64, 32, 4)]


def test_band_follows_the_wider_of_the_two_channel_counts():
    got = st.select_configs(CONFIGS, GEMM, {"N_dim": 48, "R_dim": 384}, "narrow")
    assert _blocks(got) == [(128, 128, 32, 8)]


def test_fixed_keeps_one_and_full_keeps_all():
    assert _blocks(st.select_configs(CONFIGS, GEMM, {"N_dim": 64, "R_dim": 64}, "fixed")) == [(128, 64, 32, 4)]
    assert st.select_configs(CONFIGS, GEMM, {"N_dim": 64, "R_dim": 64}, "full") == CONFIGS


def test_group_size_is_part_of_the_match():
    swizzled = [_cfg(128, 64, 32, 4, 3, g=4)]  # same tile, GROUP_SIZE_M 4: not in the band list
    assert st.select_configs(swizzled, GEMM, {"N_dim": 64, "R_dim": 64}, "narrow") == swizzled  # fallback


def test_unmatched_lists_fall_back_to_all_configs():
    other = [_cfg(16, 16, 16, 1, 1), _cfg(32, 16, 16, 1, 2)]
    assert st.select_configs(other, GEMM, {"N_dim": 512, "R_dim": 512}, "fixed") == other


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="N_dim"):
        st.select_configs(CONFIGS, GEMM, {"R_dim": 48}, "narrow")
    with pytest.raises(ValueError, match="mode"):
        st.select_configs(CONFIGS, GEMM, {"N_dim": 48, "R_dim": 48}, "fast")
    with pytest.raises(ValueError, match="GITMERGE3D_SPCONV_TUNE"):
        st.set_tune_mode("fast")


@pytest.fixture
def spconv_triton(monkeypatch):
    """spconv-triton's modules: installed, or imported from the wheel in .whl/ (pure python)."""
    try:
        import spconv_triton  # noqa: F401
    except ImportError:
        if not WHEELS:
            pytest.skip("spconv-triton neither installed nor in .whl/")
        monkeypatch.syspath_prepend(str(WHEELS[-1]))
    return pytest.importorskip("spconv_triton.pytorch._impl.gemm")


def test_every_listed_spec_is_a_config_spconv_triton_ships(spconv_triton):
    for rule, tuner in st.kernels():
        shipped = {st.signature(c, rule.params) for c in tuner.configs}
        for _, specs in rule.bands:
            for spec in specs:
                assert any(s[: len(spec)] == spec for s in shipped), (rule.kernels, spec)
    assert len(st.kernels()) == 11


def _pruned(tuner, **args):
    tuner.nargs = args  # what Autotuner.run sets before it prunes
    try:
        return tuner.prune_configs({})
    finally:
        tuner.nargs = None


def test_install_narrows_the_real_autotuners(spconv_triton, mode):
    from spconv_triton.pytorch._impl import pair_kernels

    gemm = spconv_triton._gather_gemm_kernel
    mode("narrow")
    st.install()
    for width in (48, 64, 96, 192, 384, 512):
        kept = _pruned(gemm, N_dim=width, R_dim=width, kv=27)
        assert 1 <= len(kept) <= 4 and all(c in gemm.configs for c in kept)
        assert all(c.kwargs["BLOCK_N"] <= max(64, 2 * width) for c in kept)
    flat = _pruned(pair_kernels._candidates_kernel, KV=27, NDIM=3)
    assert [(c.kwargs["BLOCK"], c.num_warps) for c in flat] == [(1024, 4)]
    mode("fixed")
    st.install()
    assert len(_pruned(gemm, N_dim=96, R_dim=96, kv=27)) == 1
    mode("full")
    st.install()
    assert gemm.early_config_prune is None
    assert len(_pruned(gemm, N_dim=96, R_dim=96, kv=27)) == 37


def test_install_drops_tuned_choices_on_a_mode_change(spconv_triton, mode):
    gemm = spconv_triton._gather_gemm_kernel
    mode("narrow")
    st.install()
    gemm.cache[("stale",)] = gemm.configs[0]
    st.install()  # same mode: choices kept
    assert ("stale",) in gemm.cache
    mode("fixed")
    st.install()
    assert ("stale",) not in gemm.cache
