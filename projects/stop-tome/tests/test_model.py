"""STOP's visual path: token layout and attention pattern against a reference written from the paper's description."""

from __future__ import annotations

import pytest
import torch

from merge_core.kernels.policy import get_policy
from stop_tome.clip_model import ResidualAttentionBlock, to_stop_order
from stop_tome.model import CLIP4Clip, task_config


def _stop_mask(num_global: int, frames: int, per: int) -> torch.Tensor:
    """Allowed (query, key) pairs in STOP's token-major order: frame tokens see the globals and their own frame;
    globals see everything."""
    length = num_global + frames * per
    frame_of = torch.full((length,), -1)
    frame_of[num_global:] = (torch.arange(frames * per)) % frames  # frame index varies fastest
    allowed = (frame_of[:, None] == frame_of[None, :]) | (frame_of[None, :] < 0) | (frame_of[:, None] < 0)
    return allowed


@pytest.mark.parametrize("num_global", [0, 4])
def test_block_attention_pattern_matches_stop_reference(num_global):
    torch.manual_seed(0)
    blk = ResidualAttentionBlock(32, 2, lora=bool(num_global)).eval()
    b, t, per = 2, 3, 6
    x = torch.randn(b, num_global + t * per, 32)
    with torch.no_grad():
        ours = to_stop_order(blk.forward_visual(x, num_global, t), num_global, t)
        xs = to_stop_order(x, num_global, t).transpose(0, 1)  # LND, STOP's order
        h = blk.ln_1(xs)
        mask = ~_stop_mask(num_global, t, per)
        ref = xs + blk.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        ref = ref + blk.mlp(blk.ln_2(ref)) + (0.1 * blk.LoRA(ref) if blk.LoRA is not None else 0)
    torch.testing.assert_close(ours, ref.transpose(0, 1), atol=1e-5, rtol=1e-4)


def test_stop_token_layout(clip_sd):
    """4 globals + T * (CLS + 4 local prompts + patches): 4 + 4 * (1 + 4 + 16) tokens for the tiny model."""
    model = CLIP4Clip.from_pretrained(clip_sd, task_config(temporal_prompt="group2-2", max_frames=4)).eval()
    video = torch.randn(2, 4, 3, 64, 64)
    with torch.no_grad():
        tokens, groups = model.visual_tokens(video)
        _, local = model.encode_prompts()
    assert tokens.shape == (2, 4 + 4 * 21, 32) and groups == 4
    # the prompts written into slots 1..4 of a frame before the last block come from the last layer's prompts:
    # re-run the blocks by hand and check the slot contents
    vis = model.clip.visual
    with torch.no_grad():
        prompted, region = vis.TemporalPrompt(video)
        frames = vis.embed(prompted)
        inter = vis.TemporalPrompt.inter_frame_prompt(frames, region)
        lp = local[:, None] + inter[None]
        x = torch.cat([frames[:, :, :1], lp[0], frames[:, :, 1:]], 2).flatten(1, 2)
        x = torch.cat([vis.prompt_embeddings.expand(2, -1, -1), x], 1)
        for i, blk in enumerate(vis.transformer.resblocks):
            if i:
                f = x[:, 4:].view(2, 4, 21, -1).clone()
                f[:, :, 1:5] = lp[i]
                x = torch.cat([x[:, :4], f.flatten(1, 2)], 1)
            x = blk.forward_visual(x, 4, 4)
        torch.testing.assert_close(vis.ln_post(x) @ vis.proj, tokens)


@pytest.mark.parametrize("mode", ["group2-2", "DGL", "none"])
def test_modes_forward_and_freeze(clip_sd, mode):
    cfg = task_config(temporal_prompt=mode, max_frames=4, freeze_clip=1)
    model = CLIP4Clip.from_pretrained(clip_sd, cfg)
    ids = torch.randint(1, 400, (2, 8))
    ids[:, -1] = 49407
    out = model(ids, torch.randn(2, 4, 3, 64, 64))
    assert torch.isfinite(out["loss"])
    if mode != "none":
        out["loss"].backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if mode == "none":
        assert not trainable  # plain CLIP4Clip with a frozen CLIP has nothing to train
    else:
        assert all(any(k in n for k in ("prompts.", "prompt_embeddings", "TemporalPrompt", "LoRA")) for n in trainable)
        assert any("TemporalPrompt" in n for n in trainable) == (mode == "group2-2")
        # every trainable parameter gets a finite gradient (STOP's Cal_Net feeds only a hard top-k mask: frozen)
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert not any(".Cal_Net." in n for n in grads)
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert model.train() is model and model.eval() is model  # STOP's train() returned None


def test_loads_clip_weights_and_names_bad_keys(clip_sd):
    model = CLIP4Clip.from_pretrained(clip_sd, task_config(temporal_prompt="DGL", max_frames=2))
    assert torch.equal(model.clip.visual.conv1.weight, clip_sd["visual.conv1.weight"])
    bad = dict(clip_sd)
    bad["visual.proj"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="visual.proj has shape"):
        model.load_clip_weights(bad)
    with pytest.raises(ValueError, match="--temporal_prompt must be one of"):
        CLIP4Clip(None, clip_sd, task_config(temporal_prompt="group9"))


def test_guide_programmatic_use_from_project_root(weights_dir, monkeypatch, capsys):
    """The guide's snippet and ``python main.py`` as a user runs them from projects/stop-tome (``modules/`` there)."""
    import importlib
    import runpy
    from pathlib import Path
    from types import SimpleNamespace

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root))
    CLIP4Clip = importlib.import_module("modules.clip4clip").CLIP4Clip  # noqa: N806
    apply_tome_patch = importlib.import_module("modules.tome_patch").apply_tome_patch
    load_clip_state_dict = importlib.import_module("modules.clip").load_clip_state_dict
    clip_state_dict = load_clip_state_dict(weights_dir / "ViT-B-32.pt")
    task_config = SimpleNamespace(temporal_prompt="DGL", max_frames=2)
    task_config.tome_r = 2
    task_config.tome_trace_source = False
    task_config.tome_prop_attn = True
    model = CLIP4Clip(None, clip_state_dict, task_config)
    assert model.r == 2 and model.clip.visual._merge_info.prop_attn is True
    with torch.no_grad():
        assert model.eval().get_video_features(torch.randn(1, 2, 3, 64, 64)).shape == (1, 32)
    apply_tome_patch(model, r=1)
    assert model.r == 1
    monkeypatch.setattr("sys.argv", ["main.py", "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(root / "main.py"), run_name="__main__")
    assert exc.value.code == 0 and "--tome_prop_attn" in capsys.readouterr().out


def test_main_models_force_the_requested_tome_r(clip_sd):
    """Retrieval metrics must be the merged model's: merge-core's auto policy may skip merging on small GPU batches."""
    merged = CLIP4Clip.from_pretrained(clip_sd, task_config(temporal_prompt="group2-2", max_frames=2, tome_r=1))
    assert get_policy(merged) == "force"
    plain = CLIP4Clip.from_pretrained(clip_sd, task_config(temporal_prompt="group2-2", max_frames=2))
    assert get_policy(plain) == "auto"  # nothing patched: merge-core's default, irrelevant without merging
