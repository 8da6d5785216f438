"""Video decoding for retrieval: PyAV first (its wheels bundle FFmpeg), OpenCV as a fallback when installed.

Two frame samplings: ``segments`` (STOP: T equal segments over all frames, their centres at eval and a random frame of
each segment in training) and ``fps`` (CLIP4Clip: ``feature_framerate`` frames per second, then head / tail / uniform
slicing to T; short videos are zero-padded and masked). Frames are resized (short side, bicubic), centre-cropped and
CLIP-normalised, so raw MSR-VTT videos work as well as STOP's 224-px compressed copies.
"""

from __future__ import annotations

import random
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
SAMPLINGS = ("segments", "fps")


class VideoError(RuntimeError):
    """A video could not be opened or decoded (missing, corrupt, no frames)."""


def _to_array(img: Image.Image, size: int) -> np.ndarray:
    w, h = img.size
    scale = size / min(w, h)
    img = img.convert("RGB").resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def segment_indices(total: int, num: int, train: bool, rng: random.Random | None = None) -> list[int]:
    """T segment picks over ``total`` frames (repeats when the video is shorter than T)."""
    bounds = np.linspace(0, total, num + 1)
    out = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=False):
        if train and rng is not None and b - a >= 1:
            idx = int(a + rng.random() * (b - a))
        else:
            idx = int((a + b) / 2)
        out.append(min(max(idx, 0), total - 1))
    return out


def slice_indices(count: int, num: int, slice_framepos: int) -> list[int]:
    """CLIP4Clip's slicing of ``count`` sampled frames to at most ``num``: 0 head, 1 tail, 2 uniform."""
    if count <= num:
        return list(range(count))
    if slice_framepos == 0:
        return list(range(num))
    if slice_framepos == 1:
        return list(range(count - num, count))
    return [int(round(v)) for v in np.linspace(0, count - 1, num)]


def _frame_times(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate else 25.0


def _decode_pyav(
    path: Path, wanted: set[int] | None, fps: float | None, size: int
) -> tuple[dict[int, np.ndarray], int]:
    """Decode frames; keep those in ``wanted`` (indices) or one every 1/fps seconds. Returns (kept, frame count)."""
    kept: dict[int, np.ndarray] = {}
    count = 0
    next_t = 0.0
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = _frame_times(stream)
        for frame in container.decode(stream):
            if wanted is not None:
                if count in wanted:
                    kept[count] = _to_array(frame.to_image(), size)
            else:
                t = float(frame.time) if frame.time is not None else count / rate
                if t + 1e-6 >= next_t:
                    kept[len(kept)] = _to_array(frame.to_image(), size)
                    next_t += 1.0 / fps
            count += 1
    return kept, count


def _nearest(kept: dict[int, np.ndarray], i: int) -> np.ndarray:
    """The decoded frame closest before ``i`` (container frame counts can overestimate)."""
    lower = [k for k in kept if k <= i]
    return kept[max(lower)] if lower else kept[min(kept)]


def _count_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoError(f"{path}: no video stream")
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for _ in container.decode(stream))


def _decode_cv2(path: Path, num: int, size: int) -> list[np.ndarray]:
    import cv2  # optional fallback

    cap = cv2.VideoCapture(str(path))
    frames = []
    ok, frame = cap.read()
    while ok:
        frames.append(frame[:, :, ::-1])
        ok, frame = cap.read()
    cap.release()
    if not frames:
        raise VideoError(f"{path}: OpenCV decoded no frames")
    idx = segment_indices(len(frames), num, False)
    return [_to_array(Image.fromarray(np.ascontiguousarray(frames[i])), size) for i in idx]


def load_frames(
    path: str | Path,
    num_frames: int,
    *,
    sampling: str = "segments",
    train: bool = False,
    feature_framerate: float = 1.0,
    slice_framepos: int = 2,
    size: int = 224,
    rng: random.Random | None = None,
) -> tuple[np.ndarray, int]:
    """Decode ``num_frames`` RGB frames (T, size, size, 3) uint8 and the number of real frames (rest zero)."""
    path = Path(path)
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    try:
        if sampling == "segments":
            total = _count_frames(path)
            if total <= 0:
                raise VideoError(f"{path}: no frames")
            idx = segment_indices(total, num_frames, train, rng)
            kept, count = _decode_pyav(path, set(idx), None, size)
            if not kept:
                raise VideoError(f"{path}: no decodable frames")
            frames = [kept[i] if i in kept else _nearest(kept, i) for i in idx]
            return np.stack(frames), num_frames
        kept, _ = _decode_pyav(path, None, feature_framerate, size)
        if not kept:
            raise VideoError(f"{path}: no decodable frames")
        sel = slice_indices(len(kept), num_frames, slice_framepos)
        out = np.zeros((num_frames, size, size, 3), dtype=np.uint8)
        for j, i in enumerate(sel):
            out[j] = kept[i]
        return out, len(sel)
    except VideoError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as exc:
        try:
            frames = _decode_cv2(path, num_frames, size)
        except ImportError:
            raise VideoError(f"{path}: {type(exc).__name__}: {exc}") from exc
        except Exception as exc2:  # noqa: BLE001 - any decoder failure means "bad video"
            raise VideoError(f"{path}: {type(exc2).__name__}: {exc2}") from exc2
        return np.stack(frames), num_frames


def normalize(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float, CLIP mean/std."""
    x = (frames.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def frame_count_hint(path: str | Path) -> int:
    """Frames in a video (for reports)."""
    return _count_frames(Path(path))
