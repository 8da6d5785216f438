"""Fixtures: a tiny random-weight CLIP in OpenAI's layout (state dict and TorchScript archive) and a small
MSR-VTT folder built from the real clips in ../shared/data/video."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from stop_tome.clip_model import CLIP
from stop_tome.fastconv import prompter_conv
from stop_tome.testing import TINY, tiny_state_dict


@pytest.fixture(autouse=True)
def _fast_cpu_prompter_conv(request):
    """CPU tests run STOP's prompter convolutions as ``fold2d`` (exact; tested against ``nn.Conv3d`` in
    test_fastconv.py): oneDNN's CPU Conv3d costs ~2 s per call on 11x11 kernels, which dominated this suite.
    GPU tests keep the process default."""
    if request.node.get_closest_marker("gpu") is not None:
        yield
        return
    with prompter_conv("fold2d"):
        yield


SHARED = Path(__file__).resolve().parents[3].parent / "shared" / "data"
VIDEO_DIR = SHARED / "video"
MSRVTT_DIR = SHARED / "msrvtt"


@pytest.fixture(scope="session")
def shared_video_dir() -> Path:
    if not VIDEO_DIR.is_dir():
        pytest.skip(f"shared clips not found at {VIDEO_DIR}")
    return VIDEO_DIR


@pytest.fixture(scope="session")
def shared_msrvtt_dir() -> Path:
    if not MSRVTT_DIR.is_dir():
        pytest.skip(f"shared MSR-VTT CSVs not found at {MSRVTT_DIR}")
    return MSRVTT_DIR


@pytest.fixture(scope="session")
def clip_sd() -> dict[str, torch.Tensor]:
    return tiny_state_dict()


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory, clip_sd) -> Path:
    """``ViT-B-32.pt`` as a plain state dict and ``ViT-B-16.pt`` as a TorchScript archive (both tiny)."""
    root = tmp_path_factory.mktemp("weights")
    torch.save(clip_sd, root / "ViT-B-32.pt")
    model = CLIP(TINY).eval()
    model.load_state_dict(clip_sd)
    image = torch.randn(1, 3, TINY.image_resolution, TINY.image_resolution)
    text = torch.randint(1, 400, (1, 8))
    text[:, -1] = 49407
    traced = torch.jit.trace(model, (image, text), check_trace=False)
    traced.save(str(root / "ViT-B-16.pt"))
    return root


CLIPS = {
    "video7001": "part_0.mp4",
    "video7002": "test.avi",
    "video7003": "demo_spatiotemporal_det.mp4",
    "video7004": "test.mp4",
}
CAPTIONS = {
    "video7001": ["a person is dancing", "someone moves in a room"],
    "video7002": ["a man plays a guitar", "music is playing"],
    "video7003": ["people walk on a street", "a crowd outside"],
    "video7004": ["a child rides a bike", "a kid on a bicycle"],
}


@pytest.fixture(scope="session")
def msrvtt_dir(tmp_path_factory) -> Path:
    """MSRVTT_data.json + train / JSFUSION-style test CSVs for the four shared clips, videos under ``videos/``."""
    if not VIDEO_DIR.is_dir():
        pytest.skip(f"shared clips not found at {VIDEO_DIR}")
    root = tmp_path_factory.mktemp("msrvtt")
    videos = root / "videos"
    videos.mkdir()
    for vid, name in CLIPS.items():
        shutil.copy(VIDEO_DIR / name, videos / f"{vid}{Path(name).suffix}")
    sentences = [
        {"video_id": v, "caption": c, "sen_id": i}
        for i, (v, c) in enumerate((v, c) for v, cs in CAPTIONS.items() for c in cs)
    ]
    data = {"videos": [{"video_id": v, "url": "", "split": "test"} for v in CLIPS], "sentences": sentences}
    (root / "MSRVTT_data.json").write_text(json.dumps(data))
    (root / "MSRVTT_train.9k.csv").write_text("video_id\n" + "\n".join(CLIPS) + "\n")
    rows = ["key,vid_key,video_id,sentence"] + [f"ret{i},msr{i},{v},{CAPTIONS[v][0]}" for i, v in enumerate(CLIPS)]
    (root / "MSRVTT_JSFUSION_test.csv").write_text("\n".join(rows) + "\n")
    return root
