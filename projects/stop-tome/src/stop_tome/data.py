"""MSR-VTT for retrieval: ``MSRVTT_data.json`` captions, the 9k/7k train CSVs and the JSFUSION 1k-A test CSV.

A missing or corrupt video never stops an epoch: the sample is marked bad, dropped by ``collate_skip_bad`` and
counted (with a warning naming the video) by the engine.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.data import Dataset

from .tokenizer import ClipTokenizer
from .video import VideoError, load_frames, normalize

VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mkv", ".mov")


def find_video(root: str | Path, video_id: str) -> Path:
    """``<root>/<video_id>.<ext>`` for the usual extensions (CLIP4Clip falls back from .mp4 to .webm)."""
    root = Path(root)
    for ext in VIDEO_EXTS:
        p = root / f"{video_id}{ext}"
        if p.is_file():
            return p
    return root / f"{video_id}.mp4"


def read_captions(json_path: str | Path) -> dict[str, list[str]]:
    """video_id -> captions from the official ``MSRVTT_data.json`` layout."""
    path = Path(json_path)
    if not path.is_file():
        raise FileNotFoundError(f"--data_path: expected MSRVTT_data.json, {path} does not exist")
    with path.open() as fh:
        data = json.load(fh)
    if "sentences" not in data:
        raise ValueError(f"--data_path {path}: no 'sentences' list (not MSRVTT_data.json)")
    captions: dict[str, list[str]] = defaultdict(list)
    for s in data["sentences"]:
        captions[str(s["video_id"])].append(str(s["caption"]))
    return dict(captions)


def read_csv(path: str | Path, name: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--{name}: {path} does not exist")
    df = pd.read_csv(path)
    if "video_id" not in df.columns:
        raise ValueError(f"--{name} {path}: no 'video_id' column")
    return df


class RetrievalDataset(Dataset):
    """(caption, video) pairs; each item is a dict the collate function stacks."""

    def __init__(
        self,
        pairs: list[tuple[str, str | None]],
        captions: dict[str, list[str]] | None,
        features_path: str | Path,
        tokenizer: ClipTokenizer,
        *,
        max_words: int = 32,
        max_frames: int = 12,
        train: bool = False,
        sampling: str = "segments",
        feature_framerate: float = 1.0,
        slice_framepos: int = 2,
        image_size: int = 224,
        seed: int = 0,
    ) -> None:
        self.pairs, self.captions = pairs, captions
        self.features_path = Path(features_path)
        self.tokenizer = tokenizer
        self.max_words, self.max_frames, self.train = max_words, max_frames, train
        self.sampling, self.feature_framerate, self.slice_framepos = sampling, feature_framerate, slice_framepos
        self.image_size, self.seed, self.epoch = image_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        video_id, caption = self.pairs[index]
        rng = random.Random(hash((self.seed, self.epoch, index)) & 0xFFFFFFFF)
        if caption is None:  # one random caption per video per epoch (CLIP4Clip without expanded sentences)
            caption = rng.choice(self.captions[video_id])
        ids, mask = self.tokenizer.encode_padded(caption, self.max_words)
        item: dict[str, Any] = {
            "input_ids": torch.tensor(ids),
            "attention_mask": torch.tensor(mask),
            "video_id": video_id,
            "index": index,
            "ok": True,
            "error": "",
        }
        try:
            frames, valid = load_frames(
                find_video(self.features_path, video_id),
                self.max_frames,
                sampling=self.sampling,
                train=self.train,
                feature_framerate=self.feature_framerate,
                slice_framepos=self.slice_framepos,
                size=self.image_size,
                rng=rng,
            )
        except VideoError as exc:
            item.update(ok=False, error=str(exc))
            return item
        item["video"] = normalize(frames)
        item["video_mask"] = (torch.arange(self.max_frames) < valid).long()
        return item


def collate_skip_bad(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the good samples; bad ones are reported in ``bad`` as (video_id, error)."""
    good = [b for b in batch if b["ok"]]
    out: dict[str, Any] = {"bad": [(b["video_id"], b["error"]) for b in batch if not b["ok"]]}
    out["video_id"] = [b["video_id"] for b in good]
    out["index"] = torch.tensor([b["index"] for b in good], dtype=torch.long)
    if good:
        for key in ("input_ids", "attention_mask", "video", "video_mask"):
            out[key] = torch.stack([b[key] for b in good])
    return out


def msrvtt_train(
    data_path: str | Path, train_csv: str | Path, expand_sentences: bool, **kwargs: Any
) -> RetrievalDataset:
    captions = read_captions(data_path)
    ids = [str(v) for v in read_csv(train_csv, "train_csv")["video_id"]]
    missing = [v for v in ids if v not in captions]
    if missing:
        raise ValueError(f"--train_csv: video {missing[0]} has no caption in --data_path ({len(missing)} such)")
    pairs: list[tuple[str, str | None]]
    pairs = [(v, c) for v in ids for c in captions[v]] if expand_sentences else [(v, None) for v in ids]
    return RetrievalDataset(pairs, captions, train=True, **kwargs)


def msrvtt_test(val_csv: str | Path, **kwargs: Any) -> RetrievalDataset:
    """JSFUSION 1k-A: one (video, sentence) pair per row."""
    df = read_csv(val_csv, "val_csv")
    if "sentence" not in df.columns:
        raise ValueError(f"--val_csv {val_csv}: no 'sentence' column (expected MSRVTT_JSFUSION_test.csv)")
    pairs = [(str(v), str(s)) for v, s in zip(df["video_id"], df["sentence"], strict=False)]
    return RetrievalDataset(pairs, None, train=False, **kwargs)
