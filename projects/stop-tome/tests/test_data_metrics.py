"""Video decoding of the shared clips, MSR-VTT files, bad-video handling and retrieval metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stop_tome.data import collate_skip_bad, msrvtt_test, msrvtt_train, read_csv
from stop_tome.metrics import rank_metrics, ranks_blocked, retrieval_metrics
from stop_tome.tokenizer import ClipTokenizer
from stop_tome.video import VideoError, load_frames, normalize, segment_indices, slice_indices


@pytest.mark.parametrize("name", ["part_0.mp4", "test.avi", "demo_spatiotemporal_det.mp4", "test.mp4"])
def test_every_shared_clip_decodes(shared_video_dir, name):
    path = shared_video_dir / name
    frames, valid = load_frames(path, 6, sampling="segments", size=48)
    assert frames.shape == (6, 48, 48, 3) and frames.dtype == np.uint8 and valid == 6
    assert frames.std() > 1.0  # real picture content, not zeros
    frames, valid = load_frames(path, 12, sampling="fps", feature_framerate=1.0, size=48)
    assert frames.shape == (12, 48, 48, 3) and 1 <= valid <= 12
    assert not frames[valid:].any()  # CLIP4Clip-style zero padding after the real frames


def test_sampling_rules():
    assert segment_indices(10, 5, train=False) == [1, 3, 5, 7, 9]  # segment centres
    assert segment_indices(2, 4, train=False) == [0, 0, 1, 1]  # short video: repeats
    assert slice_indices(5, 3, 0) == [0, 1, 2] and slice_indices(5, 3, 1) == [2, 3, 4]
    assert slice_indices(5, 3, 2) == [0, 2, 4] and slice_indices(2, 3, 2) == [0, 1]


def test_normalize_is_clip_mean_std():
    frames = np.full((1, 2, 2, 3), 255, dtype=np.uint8)
    x = normalize(frames)
    assert x.shape == (1, 3, 2, 2)
    assert torch.allclose(
        x[0, :, 0, 0],
        torch.tensor([(1 - 0.48145466) / 0.26862954, (1 - 0.4578275) / 0.26130258, (1 - 0.40821073) / 0.27577711]),
    )


def test_real_msrvtt_csvs(shared_msrvtt_dir):
    MSRVTT_DIR = shared_msrvtt_dir  # noqa: N806
    nine = set(read_csv(MSRVTT_DIR / "MSRVTT_train.9k.csv", "train_csv")["video_id"])
    seven = set(read_csv(MSRVTT_DIR / "MSRVTT_train.7k.csv", "train_csv")["video_id"])
    test = read_csv(MSRVTT_DIR / "MSRVTT_JSFUSION_test.csv", "val_csv")
    assert len(nine) == 9000 and len(seven) == 7010 and seven <= nine
    assert len(test) == 1000 and {"key", "vid_key", "video_id", "sentence"} <= set(test.columns)
    assert not nine & set(test["video_id"])


def test_bad_videos_are_skipped_and_counted(msrvtt_dir, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for p in (msrvtt_dir / "videos").iterdir():
        (videos / p.name).symlink_to(p)
    (videos / "video7002.avi").unlink()
    (videos / "video7002.mp4").write_bytes(b"\x00\x01garbage" * 100)  # corrupt
    (videos / "video7004.mp4").unlink()  # missing
    ds = msrvtt_test(
        msrvtt_dir / "MSRVTT_JSFUSION_test.csv",
        features_path=videos,
        tokenizer=ClipTokenizer(),
        max_words=16,
        max_frames=3,
        image_size=32,
    )
    with pytest.raises(VideoError):
        load_frames(videos / "video7002.mp4", 3)
    batch = collate_skip_bad([ds[i] for i in range(len(ds))])
    assert batch["video_id"] == ["video7001", "video7003"]
    assert [v for v, _ in batch["bad"]] == ["video7002", "video7004"]
    assert batch["video"].shape == (2, 3, 3, 32, 32) and batch["input_ids"].shape == (2, 16)


def test_train_pairs(msrvtt_dir):
    kw = {"features_path": msrvtt_dir / "videos", "tokenizer": ClipTokenizer(), "max_frames": 2, "image_size": 32}
    expanded = msrvtt_train(msrvtt_dir / "MSRVTT_data.json", msrvtt_dir / "MSRVTT_train.9k.csv", True, **kw)
    single = msrvtt_train(msrvtt_dir / "MSRVTT_data.json", msrvtt_dir / "MSRVTT_train.9k.csv", False, **kw)
    assert len(expanded) == 8 and len(single) == 4
    with pytest.raises(FileNotFoundError, match="--data_path"):
        msrvtt_train(msrvtt_dir / "nope.json", msrvtt_dir / "MSRVTT_train.9k.csv", False, **kw)


def test_metrics_hand_computed():
    # t2v similarity (rows: texts, cols: videos); true video of text i is column i
    sim = torch.tensor([[0.9, 0.1, 0.2], [0.8, 0.5, 0.1], [0.3, 0.7, 0.6]])
    text, video = torch.eye(3), sim.t().contiguous()  # text_i . video_j = sim[i, j]
    ranks = ranks_blocked(text, video, block=2)
    assert ranks.tolist() == [1, 2, 2]
    m = rank_metrics(ranks)
    assert m["R1"] == pytest.approx(100 / 3) and m["R5"] == 100 and m["MdR"] == 2 and m["MnR"] == pytest.approx(5 / 3)
    assert rank_metrics(torch.tensor([1, 2, 3, 10]))["MdR"] == 2.5  # even count: mean of the middle two
    both = retrieval_metrics(text, video, block=1)
    assert ranks_blocked(video, text, block=2).tolist() == [1, 2, 1]  # columns of sim: 0.9 top, 0.5 < 0.7, 0.6 top
    assert both["v2t"]["R1"] == pytest.approx(200 / 3) and both["t2v"]["MnR"] == pytest.approx(5 / 3)


def test_blocked_equals_full_matrix():
    torch.manual_seed(0)  # small integers: every product is exact, so blocking cannot change a score
    a = torch.randint(-3, 4, (50, 8)).float()
    b = a + torch.randint(-2, 3, (50, 8)).float()
    sim = a @ b.t()
    full = (sim > sim.diag()[:, None]).sum(1) + 1  # the whole matrix at once
    assert torch.equal(ranks_blocked(a, b, block=7), full)
