import pytest

import merge_core as mc


def test_parse_r_forms_match_tome():
    assert mc.parse_r(4, 8) == [8, 8, 8, 8]
    assert mc.parse_r(4, [1, 2]) == [1, 2, 0, 0]
    # ToMe's linear ramp: inflect -0.5 merges more early
    assert mc.parse_r(3, (8, -0.5)) == [12, 8, 4]
    assert mc.parse_r(3, (8, 0.5)) == [4, 8, 12]
    assert mc.parse_r(12, (16, 0.0)) == [16] * 12


def test_parse_r_errors():
    with pytest.raises(ValueError, match="r schedule has 5 entries but the model has 4 layers"):
        mc.parse_r(4, [1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="r must be >= 0"):
        mc.parse_r(4, -3)
    with pytest.raises(TypeError, match="r must be a non-negative int"):
        mc.parse_r(4, 2.5)
    with pytest.raises(TypeError, match=r"r\[1\] must be a non-negative int"):
        mc.parse_r(4, [1, 0.5])
    with pytest.raises(ValueError, match="a tuple r must be"):
        mc.parse_r(4, (1, 2, 3))


def test_keep_rate_schedule_token_counts():
    schedule = mc.keep_rate_schedule(12, 197, 0.7, [4, 6, 8, 10], protected=1)
    assert schedule == [0, 0, 0, 0, 59, 0, 41, 0, 29, 0, 20, 0]
    counts = mc.tokens_per_layer(197, schedule, protected=1)
    assert [counts[i] for i in (4, 6, 8, 10)] == [138, 97, 68, 48]


def test_keep_rate_clamped_to_half():
    schedule = mc.keep_rate_schedule(2, 197, 0.2, [0], protected=1)
    assert schedule[0] == 98


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(keep_rate=0.0), "keep_rate must be in"),
        (dict(keep_rate=1.5), "keep_rate must be in"),
        (dict(layers=[12]), r"merge layers must be in \[0, 12\)"),
    ],
)
def test_keep_rate_errors(kwargs, message):
    args = dict(num_layers=12, num_tokens=197, keep_rate=0.7, layers=[4])
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        mc.keep_rate_schedule(**args)


def test_tome_module_layout_is_available():
    from merge_core.merge import bipartite_soft_matching, merge_source, merge_wavg
    from merge_core.utils import parse_r
    from merge_core.vis import make_visualization

    assert parse_r is mc.parse_r and bipartite_soft_matching is mc.bipartite_soft_matching
    assert merge_wavg is mc.merge_wavg and merge_source is mc.merge_source
    assert make_visualization is mc.make_visualization
