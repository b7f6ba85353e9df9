"""The motion score: how much a clip moves, as one number.

Kandinsky Video 1.1 conditions its keyframe and interpolation models on a motion score
computed from optical flow. In kvideo it is defined as follows, and this definition is
what the data pipeline writes into every shard's metadata (``motion_score``) and what
training conditions on:

1. Resample the clip to **24 fps by timestamp** (:func:`~kvideo.data.video_io.pick_frames_by_time`,
   nearest frame), so the score does not depend on the source frame rate.
2. Resize every frame so its **short side is 256 pixels** (``analysis_short_side``;
   aspect ratio kept) and convert to grayscale.
3. Compute dense optical flow between each pair of consecutive frames (OpenCV Farneback by
   default, optionally RAFT from local weights).
4. Average the flow magnitude over all pixels of all pairs.

**Units: pixels per frame at 24 fps, measured at the analysis size** (short side 256). A
score of 1.0 means the average pixel moves one analysis-size pixel between 24 fps frames,
i.e. 24/256 = 9.4% of the short side per second. Background pixels that do not move count
with zero, so a small moving object gives a smaller score than a full-frame pan at the same
speed. Changing ``analysis_short_side`` changes the scale; keep the default for anything that
is written to metadata or used for conditioning.
"""

from __future__ import annotations

import os
from functools import lru_cache

import cv2
import numpy as np
import torch
from einops import rearrange

from kvideo.data.video_io import pick_frames_by_time

__all__ = ["ANALYSIS_FPS", "motion_score", "prepare_motion_frames", "flow_magnitudes"]

ANALYSIS_FPS = 24.0

# Farneback parameters (OpenCV's commonly used defaults).
_FARNEBACK = dict(
    pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0
)


def prepare_motion_frames(
    frames: np.ndarray, fps: float, *, analysis_short_side: int = 256
) -> np.ndarray:
    """Resample to 24 fps by timestamp and resize to the analysis size.

    Args:
        frames: uint8 ``(f, h, w, 3)`` RGB, evenly spaced at ``fps``.
        fps: frame rate of ``frames``.

    Returns:
        uint8 ``(f', h', w', 3)`` RGB with ``min(h', w') == analysis_short_side``.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (f, h, w, 3), got {frames.dtype} {frames.shape}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    times = np.arange(len(frames), dtype=np.float64) / float(fps)
    frames = frames[pick_frames_by_time(times, ANALYSIS_FPS)]
    _, h, w, _ = frames.shape
    scale = analysis_short_side / min(h, w)
    size = (max(int(round(w * scale)), 1), max(int(round(h * scale)), 1))  # cv2: (w, h)
    if size == (w, h):
        return frames
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f, size, interpolation=interp) for f in frames])


def _farneback_magnitudes(frames: np.ndarray) -> np.ndarray:
    """Mean flow magnitude of each consecutive pair; ``frames`` uint8 (f, h, w, 3) RGB."""
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    mags = []
    for prev, nxt in zip(gray[:-1], gray[1:]):
        flow = cv2.calcOpticalFlowFarneback(prev, nxt, None, **_FARNEBACK)  # (h, w, 2)
        mags.append(float(np.linalg.norm(flow, axis=-1).mean()))
    return np.asarray(mags, dtype=np.float64)


@lru_cache(maxsize=2)
def _load_raft(path: str, mtime: float) -> torch.nn.Module:
    """Build torchvision RAFT (small or large, whichever the state dict fits) offline."""
    from torchvision.models.optical_flow import raft_large, raft_small

    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    errors = []
    for build in (raft_small, raft_large):
        model = build(weights=None, progress=False)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            errors.append(f"{build.__name__}: {str(e).splitlines()[0]}")
            continue
        return model.eval()
    raise ValueError(f"{path} is not a torchvision RAFT state dict ({'; '.join(errors)})")


def _raft_magnitudes(frames: np.ndarray, weights_path: str, batch_size: int = 8) -> np.ndarray:
    """Mean RAFT flow magnitude per consecutive pair; ``frames`` uint8 (f, h, w, 3) RGB."""
    if not os.path.isfile(weights_path):
        raise ValueError(f"raft_weights file not found: {weights_path}")
    model = _load_raft(os.path.abspath(weights_path), os.path.getmtime(weights_path))
    _, h, w, _ = frames.shape
    # RAFT needs sides divisible by 8 and at least 128 (its correlation pyramid): resize
    # to the nearest such size and rescale the flow back to analysis-size pixels.
    h8, w8 = max(128, int(round(h / 8)) * 8), max(128, int(round(w / 8)) * 8)
    video = torch.from_numpy(np.ascontiguousarray(frames)).float() / 127.5 - 1.0
    video = rearrange(video, "f h w c -> f c h w")  # (f, 3, h, w) in [-1, 1]
    if (h8, w8) != (h, w):
        video = torch.nn.functional.interpolate(
            video, size=(h8, w8), mode="bilinear", align_corners=False
        )
    scale = torch.tensor([w / w8, h / h8]).view(1, 2, 1, 1)  # flow (dx, dy) back to (h, w) px
    mags = []
    with torch.inference_mode():
        for i in range(0, len(video) - 1, batch_size):
            j = min(i + batch_size, len(video) - 1)
            flow = model(video[i:j], video[i + 1 : j + 1])[-1] * scale  # (b, 2, h8, w8)
            mags.append(flow.norm(dim=1).mean(dim=(1, 2)).double().numpy())
    return np.concatenate(mags)


def flow_magnitudes(
    frames: np.ndarray,
    fps: float,
    *,
    analysis_short_side: int = 256,
    method: str = "farneback",
    raft_weights: str | os.PathLike | None = None,
) -> np.ndarray:
    """Mean flow magnitude of each consecutive 24 fps pair (see the module docstring)."""
    if method not in ("farneback", "raft"):
        raise ValueError(f"unknown motion method {method!r}; use 'farneback' or 'raft'")
    if method == "raft" and raft_weights is None:
        raise ValueError(
            "method='raft' needs raft_weights: a local torchvision RAFT state dict "
            "(kvideo never downloads weights)"
        )
    frames = prepare_motion_frames(frames, fps, analysis_short_side=analysis_short_side)
    if len(frames) < 2:
        return np.zeros(0, dtype=np.float64)
    if method == "raft":
        return _raft_magnitudes(frames, os.fspath(raft_weights))
    return _farneback_magnitudes(frames)


def motion_score(
    frames: np.ndarray,
    fps: float,
    *,
    analysis_short_side: int = 256,
    method: str = "farneback",
    raft_weights: str | os.PathLike | None = None,
) -> float:
    """The clip's motion score: mean flow magnitude, px per 24 fps frame at analysis size.

    Args:
        frames: uint8 ``(f, h, w, 3)`` RGB frames, evenly spaced at ``fps``.
        fps: frame rate of ``frames`` (any; the clip is resampled to 24 fps by timestamp).
        analysis_short_side: short side of the analysis resolution (256 for metadata).
        method: ``'farneback'`` (OpenCV) or ``'raft'`` (torchvision RAFT, local weights).
        raft_weights: path to a torchvision ``raft_small``/``raft_large`` state dict saved
            with ``torch.save``; required for ``method='raft'``.

    Returns:
        A non-negative float; 0.0 for a clip shorter than two 24 fps frames.
    """
    mags = flow_magnitudes(
        frames,
        fps,
        analysis_short_side=analysis_short_side,
        method=method,
        raft_weights=raft_weights,
    )
    return float(mags.mean()) if len(mags) else 0.0
