import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from freqmerge.models import FreqMergeMatcher, build_model, lfgm_scores, merge_schedule, token_counts
from merge_core.matching import bipartite_soft_matching
from merge_core.merge import merge_source_index, merge_wavg, pool_by_source, unmerge_to_source
from merge_core.patch import timm as patch_timm
from merge_core.penalty import TokenPairPenalty

EXPECTED_TOKENS = [197] * 4 + [138] * 2 + [97] * 2 + [68] * 2 + [48] * 2


def _block_tokens(model, x):
    seen = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: seen.append(out.shape[1])) for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_vit_small_schedule_gives_guide_token_counts():
    model = timm.create_model("vit_small_patch16_224", pretrained=False)
    schedule = merge_schedule(model, 0.7, [4, 6, 8, 10])
    assert schedule == [0, 0, 0, 0, 59, 0, 41, 0, 29, 0, 20, 0]
    assert token_counts(model, schedule) == EXPECTED_TOKENS


@pytest.mark.parametrize(
    "changes",
    [
        {"scorer": "lfgm"},
        {"scorer": "attention"},
        {"scorer": "random"},
        {"scorer": "none"},
        {"penalty_mode": "guide", "phi_pool": "amax", "prop_attn": True},
        {"scorer": "attention", "prop_attn": True},
    ],
    ids=["lfgm", "attention", "random", "none", "guide-amax-prop", "attention-prop"],
)
def test_forward_runs_the_keep_rate_budget(tiny_config, changes):
    torch.manual_seed(0)
    model = build_model(tiny_config(**changes)).eval()
    assert _block_tokens(model, torch.randn(2, 3, 112, 112)) == EXPECTED_TOKENS


def test_train_step_with_merging(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config()).train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 112, 112)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_pretrained_path_loads_a_local_timm_checkpoint(tiny_config, tmp_path):
    """A 1000-class timm checkpoint on a 12 x 12 grid: body loaded, pos-embed resampled to 14 x 14, head new."""
    from freqmerge.models import create_backbone
    from freqmerge.models.vit_freqmerge import PretrainedWeightsError

    cfg = tiny_config(freqmerge=False)
    torch.manual_seed(1)
    source = timm.create_model(cfg.backbone, pretrained=False, img_size=96, **cfg.model_kwargs)
    path = tmp_path / "vit.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    model = create_backbone(cfg.replace(pretrained_path=str(path)))
    assert torch.equal(model.blocks[3].mlp.fc1.weight, source.blocks[3].mlp.fc1.weight)
    assert model.pos_embed.shape == (1, 197, 32) and model.head.weight.shape == (100, 32)
    with pytest.raises(PretrainedWeightsError, match="--pretrained_path"):
        create_backbone(cfg.replace(pretrained_path=str(tmp_path / "missing.pth")))


def test_no_freqmerge_is_plain_timm(tiny_config):
    cfg = tiny_config(freqmerge=False)
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    torch.manual_seed(0)
    plain = timm.create_model(cfg.backbone, pretrained=False, num_classes=100, img_size=112, **cfg.model_kwargs).eval()
    assert type(ours) is VisionTransformer and not hasattr(ours, "_merge_info")
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(ours(x), plain(x))
    assert _block_tokens(ours, x) == [197] * 12


def test_keep_rate_one_equals_plain_model(tiny_config):
    torch.manual_seed(0)
    merged = build_model(tiny_config(keep_rate=1.0)).eval()
    plain = build_model(tiny_config(freqmerge=False)).eval()
    plain.load_state_dict(merged.state_dict())
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), plain(x))


def test_alpha_zero_equals_tome(tiny_config):
    torch.manual_seed(0)
    ours = build_model(tiny_config(alpha=0.0)).eval()
    tome = build_model(tiny_config(freqmerge=False)).eval()
    tome.load_state_dict(ours.state_dict())
    patch_timm(tome, prop_attn=False)
    tome.r = list(ours.r)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tome(x))


def test_penalty_changes_the_merge(tiny_config):
    torch.manual_seed(0)
    ours = build_model(tiny_config(alpha=1.0)).eval()
    tome = build_model(tiny_config(alpha=0.0)).eval()
    tome.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert not torch.allclose(ours(x), tome(x))


def _info(protected=1, source_index=None):
    return {"protected": protected, "source_index": source_index, "size": None, "prop_attn": False}


def test_high_frequency_tokens_are_not_merged():
    """All tokens equally similar; a few patches carry a spike (high LFGM): they must survive unmerged."""
    torch.manual_seed(0)
    x = torch.zeros(1, 197, 8)
    spikes = [1 + 3 * 14 + 4, 1 + 9 * 14 + 10, 1 + 6 * 14 + 7, 1 + 11 * 14 + 2]  # even and odd positions
    x[0, spikes] = 5.0
    metric = torch.ones(1, 197, 8) + 1e-3 * torch.randn(1, 197, 8)
    matcher = FreqMergeMatcher(alpha=0.7)
    merge, unmerge = matcher(block=None, layer=4, x=x, attn_input=None, metric=metric, r=59, info=_info())
    merged, size = merge_wavg(merge, x)
    assert merged.shape[1] == 138
    index = merge_source_index(unmerge, merged)
    for s in spikes:
        assert size[0, index[0, s], 0] == 1, f"spike patch {s} was merged"
    plain_merge, plain_unmerge = bipartite_soft_matching(metric, 59, protected=1)
    plain_merged, plain_size = merge_wavg(plain_merge, x)
    plain_index = merge_source_index(plain_unmerge, plain_merged)
    assert any(plain_size[0, plain_index[0, s], 0] > 1 for s in spikes)  # ToMe merges some of them


def test_later_layers_score_on_the_grid_through_the_source_map():
    """After a merge: phi = pool_by_source(LFGM(unmerge_to_source(tokens))), the documented choice."""
    torch.manual_seed(0)
    x0 = torch.randn(2, 197, 6)
    merge, unmerge = bipartite_soft_matching(x0, 40, protected=1)
    x1, _ = merge_wavg(merge, x0)
    index = merge_source_index(unmerge, x1)
    for pool in ("mean", "amax"):
        matcher = FreqMergeMatcher(phi_pool=pool)
        phi, phi_grid = matcher.lfgm_token_scores(x1, _info(source_index=index))
        grid_tokens = unmerge_to_source(x1, index)[:, 1:]
        expected_grid = lfgm_scores(grid_tokens, (14, 14), 2.0)
        torch.testing.assert_close(phi_grid, expected_grid)
        full = torch.cat([torch.zeros(2, 1), expected_grid], 1)
        torch.testing.assert_close(phi, pool_by_source(full, index, x1.shape[1], pool))
        assert phi.shape == (2, 157) and bool((phi[:, 0] == 0).all())


def test_border_option_reaches_the_matcher_and_the_model(tiny_config):
    """--lfgm_border reflect: the matcher scores with the mirrored-grid LFGM (checked against the numpy reference
    in test_lfgm) and the model built from the config carries it."""
    torch.manual_seed(1)
    x = torch.randn(2, 197, 6)
    phi_wrap, grid_wrap = FreqMergeMatcher().lfgm_token_scores(x, _info())
    phi_refl, grid_refl = FreqMergeMatcher(border="reflect").lfgm_token_scores(x, _info())
    torch.testing.assert_close(grid_refl, lfgm_scores(x[:, 1:], (14, 14), 2.0, border="reflect"))
    assert not torch.allclose(grid_wrap, grid_refl)
    model = build_model(tiny_config(lfgm_border="reflect"))
    assert model.freqmerge_matcher.border == "reflect"


def test_missing_source_map_is_reported():
    matcher = FreqMergeMatcher()
    with pytest.raises(ValueError, match="trace_source='index'"):
        matcher.lfgm_token_scores(torch.randn(1, 150, 4), _info())


def test_attention_scores(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config(freqmerge=False)).eval()
    block = model.blocks[4]
    attn_input = torch.randn(2, 197, 32)
    phi = FreqMergeMatcher.attention_token_scores(block, attn_input, _info())
    assert phi.shape == (2, 197) and bool((phi[:, 0] == 0).all())
    torch.testing.assert_close(phi[:, 1:].amax(1), torch.ones(2), atol=1e-4, rtol=0)
    # equals the class-token row of timm's own attention weights, min-max normalised
    attn = block.attn
    qkv = attn.qkv(attn_input).reshape(2, 197, 3, 2, 16).permute(2, 0, 3, 1, 4)
    weights = ((qkv[0] * attn.scale) @ qkv[1].transpose(-2, -1)).softmax(-1).mean(1)[:, 0, 1:]
    lo, hi = weights.amin(1, keepdim=True), weights.amax(1, keepdim=True)
    torch.testing.assert_close(phi[:, 1:], (weights - lo) / (hi - lo), atol=1e-4, rtol=1e-4)


def test_random_pruning_drops_tokens(tiny_config):
    matcher = FreqMergeMatcher(scorer="random", seed=0)
    x = torch.randn(2, 197, 8)
    merge, _ = matcher(block=None, layer=4, x=x, attn_input=None, metric=x, r=59, info=_info())
    out, size = merge_wavg(merge, x)
    assert out.shape == (2, 138, 8) and bool((size == 1).all())
    torch.testing.assert_close(out[:, 0], x[:, 0])


def test_guide_formula_defect_and_shifted_fix():
    """cos * (1 - a*max(phi)) lifts a negative similarity; the shifted form always lowers it."""
    scores = torch.tensor([[[-0.5]]])
    phi = torch.tensor([[0.0, 1.0]])  # one source, one destination; the destination is high-frequency
    guide = TokenPairPenalty(phi, 0.7, "guide")(scores.clone())
    shifted = TokenPairPenalty(phi, 0.7, "shifted")(scores.clone())
    unpenalised = TokenPairPenalty(torch.zeros(1, 2), 0.7, "shifted")(scores.clone())
    assert guide.item() > -0.5  # raised: the pair became more attractive
    assert shifted.item() < unpenalised.item()


def test_matcher_rejects_bad_settings():
    with pytest.raises(ValueError, match="alpha"):
        FreqMergeMatcher(alpha=1.5)
    with pytest.raises(ValueError, match="scorer"):
        FreqMergeMatcher(scorer="dct")
    with pytest.raises(ValueError, match="mode"):
        FreqMergeMatcher(mode="other")


def test_freqmerge_forces_its_schedule_under_merge_cores_policy(tiny_config):
    """merge-core's default policy may run small GPU batches unmerged; FreqMerge's accuracy must be the method's."""
    from merge_core.kernels.policy import get_policy

    model = build_model(tiny_config())
    assert get_policy(model) == "force"
