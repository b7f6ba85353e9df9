"""Scenes to clips: the filters, the black-border crop, and pass 2 (the clip frames).

`plan_clips` turns a `Scan` into `ClipPlan`s and rejects: each scene (split into equal parts
when longer than `scenes.max_clip_s`) must last `filters.min_duration_s` (else `too_short`) and,
once its black borders are cropped, keep `filters.min_area` pixels and `filters.min_side` on each
side (else `too_small`). A clip spans the frames `[first, last)` of its scene and nothing else:
its output frames are picked by timestamp (`video_io.pick_frames_by_time`, nearest frame) among
those frames only, so no frame of the next scene can bleed in.

The border crop of a clip is the union of the content boxes of up to `borders.frames_per_clip`
profiled frames spread through it (`scan.py` keeps the profiles), so a dark first frame does not
crop away picture that is there later. A 4:2:0 output needs even sides: an odd side loses its
last row or column, and that is part of the crop, which is therefore exactly the source pixels
the clip shows (`[x, y, w, h]`, upright source pixels; `None` when it is the whole frame).

`clip_frames` is pass 2: it yields each plan with its frames, cropped and resized (never up) to
at most `video.max_short_side` on the short side, from the frames pass 1 kept or from a second
sequential decode that converts only the frames a clip picks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import cv2
import numpy as np

from kvideo.data.prepare.scan import FrameReader, Scan, upright
from kvideo.data.video_io import VideoDecodeError, pick_frames_by_time

__all__ = ["ClipPlan", "Reject", "content_box", "plan_clips", "output_size", "clip_frames"]

Box = Tuple[int, int, int, int]  # x, y, w, h


@dataclass
class Reject:
    """A dropped file (no times) or scene; `reason` is one of the documented reasons."""

    reason: str
    detail: str
    start_s: Optional[float] = None
    end_s: Optional[float] = None

    def record(self, source: str) -> dict:
        out = {"source": source}
        if self.start_s is not None:
            out.update(start_s=round(self.start_s, 6), end_s=round(self.end_s, 6))
        out.update(reason=self.reason, detail=self.detail)
        return out


@dataclass
class ClipPlan:
    index: int  # clip number within its source (part of its key)
    first: int  # its frames are [first, last) of the scan
    last: int
    start_s: float
    end_s: float
    crop: Optional[Box]  # upright source pixels; None: the whole frame
    size: Tuple[int, int]  # output (width, height)
    picks: np.ndarray  # (f,) scan frame index of every output frame


# ----------------------------------------------------------------------------------------------
# Borders
# ----------------------------------------------------------------------------------------------


def content_box(rows: np.ndarray, cols: np.ndarray) -> Optional[Box]:
    """The box around the content of some profiled frames (their union), or None if all black.

    `rows` (m, h) and `cols` (m, w) say which rows and columns of each frame hold content.
    """
    any_rows, any_cols = rows.any(axis=0), cols.any(axis=0)
    if not any_rows.any() or not any_cols.any():
        return None
    y0, y1 = int(np.argmax(any_rows)), len(any_rows) - int(np.argmax(any_rows[::-1]))
    x0, x1 = int(np.argmax(any_cols)), len(any_cols) - int(np.argmax(any_cols[::-1]))
    return x0, y0, x1 - x0, y1 - y0


def _clip_box(scan: Scan, first: int, last: int, frames_per_clip: int) -> Box:
    """The content box of a clip from profiles spread through it (the whole frame without)."""
    full = (0, 0, scan.width, scan.height)
    inside = np.flatnonzero((scan.profile_frames >= first) & (scan.profile_frames < last))
    if len(inside) == 0:
        return full
    take = inside[np.unique(np.linspace(0, len(inside) - 1, min(frames_per_clip, len(inside))).round().astype(int))]
    return content_box(scan.row_content[take], scan.col_content[take]) or full  # all black: no crop


def output_size(width: int, height: int, max_short_side: int) -> Tuple[int, int]:
    """(width, height) scaled down so the short side is at most `max_short_side`, sides even."""
    scale = min(1.0, max_short_side / min(width, height))
    if scale == 1.0:
        return width, height
    return max(2, 2 * round(width * scale / 2)), max(2, 2 * round(height * scale / 2))


# ----------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------


def _scenes(scan: Scan, max_clip_s: float) -> List[Tuple[int, int]]:
    """Frame ranges [first, last) of the scenes, long ones split into equal parts."""
    bounds = [0, *scan.cuts, scan.num_frames]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        start = scan.times[a]
        end = scan.times[b] if b < scan.num_frames else scan.end_s
        parts = max(1, math.ceil((end - start) / max_clip_s - 1e-9))
        edges = [a] + [int(np.searchsorted(scan.times, start + (end - start) * k / parts)) for k in range(1, parts)] + [b]
        out += [(p, q) for p, q in zip(edges[:-1], edges[1:]) if q > p]
    return out


def plan_clips(scan: Scan, cfg) -> Tuple[List[ClipPlan], List[Reject]]:
    """The clips of a scanned source that pass the filters, and the scenes that do not."""
    plans: List[ClipPlan] = []
    rejects: List[Reject] = []
    even = cfg.video.pix_fmt.startswith(("yuv420", "nv12", "yuv422"))
    for first, last in _scenes(scan, cfg.scenes.max_clip_s):
        start = float(scan.times[first])
        end = float(scan.times[last]) if last < scan.num_frames else scan.end_s
        if end - start < cfg.filters.min_duration_s - 1e-6:
            rejects.append(Reject("too_short", f"scene lasts {end - start:.3f} s, below filters.min_duration_s="
                                  f"{cfg.filters.min_duration_s}", start, end))
            continue
        x, y, w, h = (_clip_box(scan, first, last, cfg.borders.frames_per_clip) if cfg.borders.enabled
                      else (0, 0, scan.width, scan.height))
        if w * h < cfg.filters.min_area or min(w, h) < cfg.filters.min_side:
            where = "" if (w, h) == (scan.width, scan.height) else \
                f" after cropping black borders from {scan.width}x{scan.height}"
            rejects.append(Reject("too_small", f"picture is {w}x{h}{where}, below filters.min_area="
                                  f"{cfg.filters.min_area} or filters.min_side={cfg.filters.min_side}", start, end))
            continue
        size = output_size(w, h, cfg.video.max_short_side)
        if even and size == (w, h):  # no resize: drop an odd last row / column
            w, h = w - w % 2, h - h % 2
            size = (w, h)
        crop = None if (x, y, w, h) == (0, 0, scan.width, scan.height) else (x, y, w, h)
        picks = first + pick_frames_by_time(scan.times[first:last], cfg.video.fps)
        plans.append(ClipPlan(len(plans) + len(rejects), first, last, start, end, crop, size, picks))
    return plans, rejects


# ----------------------------------------------------------------------------------------------
# Pass 2
# ----------------------------------------------------------------------------------------------


def _transform(rgb: np.ndarray, plan: ClipPlan) -> np.ndarray:
    """Crop an upright RGB frame to the plan's box and resize it to the plan's output size."""
    if plan.crop is not None:
        x, y, w, h = plan.crop
        rgb = rgb[y : y + h, x : x + w]
    if (rgb.shape[1], rgb.shape[0]) != plan.size:
        rgb = cv2.resize(rgb, plan.size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb)


def clip_frames(path: str, scan: Scan, plans: List[ClipPlan], *, rotation: int, threads: int = 1
                ) -> Iterator[Tuple[ClipPlan, np.ndarray]]:
    """Each plan with its uint8 (f, h, w, 3) RGB output frames, in order."""
    if not plans:
        return
    if scan.frames is not None:
        for plan in plans:
            done = {i: _transform(scan.frames[i], plan) for i in np.unique(plan.picks)}
            yield plan, np.stack([done[i] for i in plan.picks])
        return
    pending = list(plans)
    wanted = set(pending[0].picks.tolist()) if pending else set()
    done: dict = {}
    for i, t, frame in FrameReader(path, threads):
        while pending and i >= pending[0].last:  # past a clip: emit it
            yield _finish(path, pending.pop(0), done)
            wanted = set(pending[0].picks.tolist()) if pending else set()
        if not pending:
            return
        if i not in wanted:
            continue
        if abs(t - scan.times[i]) > 1e-6:
            raise VideoDecodeError(path, f"frame {i} is at {t:.6f} s in pass 2 but was at {scan.times[i]:.6f} s in pass 1")
        done[i] = _transform(upright(frame.to_ndarray(format="rgb24"), rotation), pending[0])
    while pending:
        yield _finish(path, pending.pop(0), done)


def _finish(path: str, plan: ClipPlan, done: dict) -> Tuple[ClipPlan, np.ndarray]:
    """The plan's frames from the decoded ones (and forget those)."""
    missing = sorted(set(plan.picks.tolist()) - set(done))
    if missing:
        raise VideoDecodeError(path, f"pass 2 did not decode frames {missing[:5]} of clip {plan.index}")
    frames = np.stack([done[i] for i in plan.picks.tolist()])  # (f, h, w, 3)
    done.clear()
    return plan, frames
