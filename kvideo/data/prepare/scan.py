"""Pass 1 over a source video: every frame's timestamp, the scene cuts, the black-border profiles.

One sequential PyAV decode feeds three things:

- the scene detector (PySceneDetect's `AdaptiveDetector` or `ContentDetector`, through its
  documented `SceneDetector.process_frame(timecode, bgr_image)` interface) with every frame,
  downscaled by FFmpeg's swscale to `scenes.analysis_width` and timed by its own presentation
  timestamp, so a cut is the exact frame where the next scene starts, on variable frame rate
  sources too;
- the border profiles: `borders.samples_per_second` times per second, which rows and columns of
  the full-resolution luma hold content (more than 1% of their pixels brighter than
  `borders.threshold`); the planner unites the content boxes of frames spread through each clip;
- optionally the decoded RGB frames themselves, when the whole file fits in
  `run.keep_decoded_mb`, so short files are decoded once rather than twice.

Frames are made upright here (the container's display rotation, see `video_io.probe`), so every
size, box and crop downstream is in upright source pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import av
import numpy as np
from scenedetect import AdaptiveDetector, ContentDetector, FrameTimecode, SceneDetector
from scenedetect.common import Timecode

from kvideo.data.video_io import VideoDecodeError, _frame_rate, _open_input

__all__ = ["DETECTORS", "FrameReader", "Scan", "scan_source", "upright", "upright_size"]

_MICROSECOND = Fraction(1, 1_000_000)
_CONTENT_FRACTION = 0.01  # a row/column holds content when more of its pixels than this are bright


def _adaptive(cfg) -> SceneDetector:
    return AdaptiveDetector(adaptive_threshold=cfg.adaptive_threshold, min_scene_len=float(cfg.min_scene_len_s),
                            window_width=cfg.window_width, min_content_val=cfg.min_content_val)


def _content(cfg) -> SceneDetector:
    return ContentDetector(threshold=cfg.threshold, min_scene_len=float(cfg.min_scene_len_s))


DETECTORS: Dict[str, Callable[[object], SceneDetector]] = {"adaptive": _adaptive, "content": _content}


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def upright_size(width: int, height: int, rotation: int) -> Tuple[int, int]:
    """(width, height) as displayed: swapped for a 90 or 270 degree display rotation."""
    return (height, width) if rotation % 180 else (width, height)


def upright(image: np.ndarray, rotation: int) -> np.ndarray:
    """Rotate a coded (h, w[, c]) image counter-clockwise by the display rotation (a view)."""
    return np.rot90(image, k=rotation // 90, axes=(0, 1)) if rotation else image


class FrameReader:
    """The frames of a file's first video stream in presentation order, with their times.

    Iterating yields `(index, t, frame)`: `t` is the presentation time in seconds from the
    stream start (as `video_io.read_video` computes it) and `index` counts the frames kept;
    frames whose time does not increase are dropped, so the same file always yields the same
    indices. A decode error after at least one frame ends the iteration and is kept in
    `self.error` (a damaged tail); before any frame it raises `VideoDecodeError`.
    """

    def __init__(self, path: str, threads: int = 1):
        self.path = path
        self.threads = threads
        self.error: Optional[str] = None

    def __iter__(self) -> Iterator[Tuple[int, float, av.VideoFrame]]:
        container = _open_input(self.path)
        try:
            if not container.streams.video:
                raise VideoDecodeError(self.path, "no video stream in the container")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if self.threads:
                stream.thread_count = self.threads
            time_base, start = stream.time_base, stream.start_time or 0
            period = 1.0 / (_frame_rate(stream) or 25.0)
            index, last_t = 0, None
            try:
                for frame in container.decode(stream):
                    if frame.pts is not None and time_base is not None:
                        t = float((frame.pts - start) * time_base)
                    elif frame.time is not None:
                        t = float(frame.time)
                    else:  # no timestamps at all: assume the nominal rate
                        t = 0.0 if last_t is None else last_t + period
                    if last_t is not None and t <= last_t + 1e-9:
                        continue
                    last_t = t
                    yield index, t, frame
                    index += 1
            except MemoryError:
                raise  # the worker's memory limit, not a broken file (av.error.MemoryError is both)
            except (av.error.FFmpegError, ValueError) as e:
                if index == 0:
                    raise VideoDecodeError(self.path, f"decoding failed ({e})") from e
                self.error = f"decoding stopped after {index} frames ({e})"
        finally:
            container.close()


# ----------------------------------------------------------------------------------------------
# Pass 1
# ----------------------------------------------------------------------------------------------


@dataclass
class Scan:
    """What pass 1 learned about a source (sizes upright, times in seconds)."""

    width: int
    height: int
    times: np.ndarray  # (n,) float64 presentation time of every frame
    cuts: List[int]  # indices of the frames that start a new scene (sorted, never 0)
    profile_frames: np.ndarray  # (m,) indices of the frames with a border profile
    row_content: np.ndarray  # (m, height) bool: the row holds content
    col_content: np.ndarray  # (m, width) bool
    frames: Optional[List[np.ndarray]] = None  # every frame, (height, width, 3) uint8 RGB, when kept
    decode_error: Optional[str] = None  # a damaged tail: the frames before it are used

    @property
    def num_frames(self) -> int:
        return len(self.times)

    @property
    def frame_duration(self) -> float:
        """The typical gap between frames (the median), used as the last frame's duration."""
        return float(np.median(np.diff(self.times))) if len(self.times) > 1 else 1.0 / 25.0

    @property
    def end_s(self) -> float:
        return float(self.times[-1]) + self.frame_duration

    @property
    def duration_s(self) -> float:
        return self.end_s - float(self.times[0])

    @property
    def measured_fps(self) -> float:
        return self.num_frames / self.duration_s if self.duration_s > 0 else 0.0


def scan_source(path: str, info: dict, cfg, *, keep_bytes: int = 0) -> Scan:
    """Decode `path` once: timestamps, scene cuts, border profiles, and the RGB frames while
    they fit in `keep_bytes` (past it they are dropped and pass 2 decodes again).

    `info` is `video_io.probe(path)`; `cfg` the whole prepare config (`scenes`, `borders`,
    `run.decode_threads`). Raises `VideoDecodeError` when no frame decodes.
    """
    rotation = int(info["rotation"])
    width, height = upright_size(info["width"], info["height"], rotation)
    # The detector sees frames about `analysis_width` wide (PySceneDetect's auto-downscale size).
    scale = min(1.0, cfg.scenes.analysis_width / max(width, 1))
    coded_w, coded_h = info["width"], info["height"]
    small_w, small_h = max(2, round(coded_w * scale)), max(2, round(coded_h * scale))
    detector = DETECTORS[cfg.scenes.detector](cfg.scenes)
    rate = Fraction(info["fps"]).limit_denominator(1001) if info["fps"] > 0 else Fraction(25)

    reader = FrameReader(path, cfg.run.decode_threads)
    times: List[float] = []
    index_of_us: Dict[int, int] = {}
    cut_codes: List[FrameTimecode] = []
    profile_frames: List[int] = []
    rows: List[np.ndarray] = []
    cols: List[np.ndarray] = []
    kept: Optional[List[np.ndarray]] = [] if keep_bytes > 0 else None
    frame_bytes = width * height * 3
    profile_every = 1.0 / cfg.borders.samples_per_second
    next_profile = -math.inf
    timecode = None
    for i, t, frame in reader:
        times.append(t)
        us = int(round(t * 1_000_000))
        index_of_us[us] = i
        timecode = FrameTimecode(Timecode(pts=us, time_base=_MICROSECOND), fps=rate)
        small = upright(frame.reformat(width=small_w, height=small_h, format="bgr24").to_ndarray(), rotation)
        cut_codes += detector.process_frame(timecode, np.ascontiguousarray(small))
        if cfg.borders.enabled and t >= next_profile:
            luma = upright(frame.to_ndarray(format="gray"), rotation)  # (h, w) full-range luma
            bright = luma > cfg.borders.threshold
            rows.append(bright.mean(axis=1) > _CONTENT_FRACTION)
            cols.append(bright.mean(axis=0) > _CONTENT_FRACTION)
            profile_frames.append(i)
            next_profile = t + profile_every
        if kept is not None:
            if (len(kept) + 1) * frame_bytes > keep_bytes:
                kept = None  # longer than the probe said: decode again in pass 2
            else:
                kept.append(np.ascontiguousarray(upright(frame.to_ndarray(format="rgb24"), rotation)))
    if timecode is None:
        raise VideoDecodeError(path, "zero frames decoded")
    cut_codes += detector.post_process(timecode)

    cuts = sorted({index_of_us[int(c.pts)] for c in cut_codes if int(c.pts) in index_of_us} - {0})
    return Scan(
        width=width, height=height, times=np.asarray(times, dtype=np.float64), cuts=cuts,
        profile_frames=np.asarray(profile_frames, dtype=np.int64),
        row_content=np.stack(rows) if rows else np.ones((0, height), dtype=bool),
        col_content=np.stack(cols) if cols else np.ones((0, width), dtype=bool),
        frames=kept,
        decode_error=reader.error,
    )
