"""The ShapesWorld scorer: a clip's attributes measured from its pixels, scored against a prompt.

Implements the scorer of /work/shared/specs/shapesworld.md; the world it measures (colours,
shapes, speeds, captions) is `kvideo.data.shapesworld`.

Scoring (``score_clip``), the details the spec leaves open:

- background: per-channel median of the outermost rows and columns of all frames.
- mask: the largest 8-connected region of pixels whose RGB distance from that background
  exceeds ``max(40, d/2)``, ``d`` being the distance from the background to the median colour
  of all pixels more than 40 away (the object colour): for an anti-aliased edge, coverage
  above 1/2. Colour = per-channel median of the mask pixels of all frames.
- shape: the fill ratio is measured on soft coverage (each pixel's position between the
  background and object colours, clipped to [0, 1], within 2 px of the mask): area = sum of
  coverage, bounding-box sides = the longest row and column. This stays near the ideal for
  any sub-pixel position and through 4:2:0 chroma subsampling (at S=64 after H.264: circle
  0.78-0.80, square 0.99-1.0, triangle 0.52-0.62); the median over frames picks the nearest
  of pi/4, 1 and 1/2.
- temporal consistency: ``area_cv`` (std / mean of the per-frame soft area), ``color_drift``
  (mean RGB distance of each frame's median mask colour from the clip's), ``detected_frac``
  and ``track_rmse_px`` (residual of the straight-line fit), and ``background_flicker``: the
  mean absolute change (0-255, averaged over RGB) from each frame to the next of the pixels
  that are background in both (away from the object's mask dilated by 2 px). ShapesWorld's
  backgrounds are flat, so it needs no ground truth: a rendered clip's is its video coding
  noise, and a generated clip's adds its frame-to-frame noise and flicker.
- motion: the coverage-weighted centroid of each frame, fitted by least squares against
  ``t = i / fps``. Speeds are in fractions of the frame width per second, so the scorer works
  at any frame rate and size: still below 0.05, slow below 0.2, else fast; the direction is
  the dominant axis of the fitted velocity.
- a banded object (``band_rows``, the v2 characters of ``kvideo.data.characters_scorer``): the
  band rows of a frame are those whose centre lies within ``band_rows * r`` of the vertical
  centre of the mask's bounding box (r = half its height); the band colour is the per-channel
  median of the mask pixels in those rows of all frames, the body colour that of the rest, and
  ``color`` names the body colour. When the two are more than ``BAND_NONE_DISTANCE`` apart, a
  pixel's coverage is ``a + b`` of its least-squares fit ``pixel - bg = a (body - bg) + b (band -
  bg)``, so the band counts as fully inside the object (as does a body/band edge pixel).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import cv2
import numpy as np

from kvideo.data.shapesworld import (ATTRIBUTES, BACKGROUNDS, COLORS, FILL_RATIOS, HELD_OUT_PAIRS, NO_SPEED, SPEEDS,
                                     UNKNOWN, attributes_of, parse_caption)

BACKGROUND_MAX_DISTANCE = 60.0
MASK_MIN_DISTANCE = 40.0
BAND_NONE_DISTANCE = 60.0  # body and band colours this close: no band


def nearest(table: Mapping[str, tuple], rgb: np.ndarray) -> tuple[str, float]:
    """The name of the ``table`` colour nearest to ``rgb`` and its (Euclidean RGB) distance."""
    names = list(table)
    dist = np.linalg.norm(np.asarray([table[n] for n in names], np.float64) - rgb[None], axis=1)
    return names[int(np.argmin(dist))], float(dist.min())


def _longest_run(alpha: np.ndarray, axis: int) -> float:
    """Longest row (axis=1) or column (axis=0) of a soft mask, in pixels.

    A line's length is its coverage sum divided by its peak coverage, so a row that the
    shape covers only partly in the other direction (the base row of a triangle) still
    counts at full length; lines peaking below 1/2 coverage are ignored (edge noise).
    """
    sums, peaks = alpha.sum(axis=axis), alpha.max(axis=axis)
    keep = peaks >= 0.5
    return float((sums[keep] / peaks[keep]).max()) if keep.any() else float(sums.max())


def border_pixels(frames: np.ndarray) -> np.ndarray:
    """The outermost rows and columns of every frame, float32 ``(f, n, 3)``."""
    x = np.asarray(frames, dtype=np.float32)  # (f, h, w, 3)
    return np.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)


def _largest_region(binary: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a boolean (h, w) image (all False if there is none)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    if n < 2:
        return np.zeros(binary.shape, bool)
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def _near(mask: np.ndarray) -> np.ndarray:
    """(f, h, w) bool: each frame's object mask dilated by 2 px (the object and its rim)."""
    kernel = np.ones((3, 3), np.uint8)
    return np.stack([cv2.dilate(m.astype(np.uint8), kernel, iterations=2).astype(bool) for m in mask])


def _background_flicker(x: np.ndarray, near: np.ndarray) -> float | None:
    """``background_flicker`` of frames ``x`` (f, h, w, 3) float away from ``near`` (``_near``
    of the object's mask); None for one frame or no background in two frames."""
    if len(x) < 2:
        return None
    away = ~near
    both = away[1:] & away[:-1]
    return float(np.abs(x[1:] - x[:-1]).mean(-1)[both].mean()) if both.any() else None


def _band_colors(x: np.ndarray, mask: np.ndarray, band_rows: float) -> tuple[np.ndarray, np.ndarray]:
    """(body, band) median colours of the masked pixels outside / inside each frame's band rows
    (rows within ``band_rows * r`` of the vertical centre of the mask's bounding box)."""
    centres = np.arange(x.shape[1]) + 0.5  # row centres
    body, band = [], []
    for i in np.flatnonzero(mask.any(axis=(1, 2))):
        rows = np.flatnonzero(mask[i].any(axis=1))
        top, bottom = rows[0], rows[-1] + 1
        in_band = np.abs(centres - 0.5 * (top + bottom)) <= band_rows * 0.5 * (bottom - top)  # (h,)
        band.append(x[i][mask[i] & in_band[:, None]])
        body.append(x[i][mask[i] & ~in_band[:, None]])
    body, band = np.concatenate(body), np.concatenate(band)
    body_rgb = np.median(body if len(body) else band, axis=0)
    return body_rgb, (np.median(band, axis=0) if len(band) else body_rgb)


def analyze_clip(frames: np.ndarray, fps: float, *, band_rows: float | None = None) -> dict:
    """Measure a clip's attributes without a prompt (see the module docstring and the spec).

    Returns predicted ``background, color, shape, direction, speed`` (``'unknown'`` where a
    value cannot be measured: a background farther than 60 from every BACKGROUNDS entry, no
    object found, or fewer than two frames with an object for the motion) and the
    measurements behind them, ``area_px`` the median soft area of the object. ``band_rows``
    measures a banded object (module docstring): ``body_rgb``, ``band_rgb`` and their
    distance ``band_distance`` are added, and ``color`` is the body colour.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) < 1:
        raise ValueError(f"frames must be uint8 (f, h, w, 3), got {frames.dtype} {frames.shape}")
    x = frames.astype(np.float32)  # (f, h, w, 3)
    num, _, width, _ = x.shape
    bg_rgb = np.median(border_pixels(x).reshape(-1, 3), axis=0)
    bg_name, bg_dist = nearest(BACKGROUNDS, bg_rgb)
    out = dict(background=bg_name if bg_dist <= BACKGROUND_MAX_DISTANCE else UNKNOWN,
               color=UNKNOWN, shape=UNKNOWN, direction=UNKNOWN, speed=UNKNOWN,
               background_rgb=bg_rgb.tolist(), background_distance=bg_dist, color_rgb=None,
               fill_ratio=None, speed_measured=None, speed_px_per_second=None,
               velocity_px_per_second=None, detected_frac=0.0, area_cv=None, area_px=None,
               color_drift=None, track_rmse_px=None, first_box_px=None, background_flicker=None)
    if band_rows is not None:
        out.update(body_rgb=None, band_rgb=None, band_distance=None)

    dist = np.linalg.norm(x - bg_rgb, axis=-1)  # (f, h, w)
    coarse = dist > MASK_MIN_DISTANCE
    if not coarse.any():
        out["background_flicker"] = _background_flicker(x, np.zeros(x.shape[:3], dtype=bool))
        return out
    contrast = np.median(x[coarse], axis=0) - bg_rgb  # object colour minus background
    threshold = max(MASK_MIN_DISTANCE, 0.5 * float(np.linalg.norm(contrast)))
    mask = np.stack([_largest_region(d > threshold) for d in dist])  # (f, h, w)
    near_all = _near(mask)
    out["background_flicker"] = _background_flicker(x, near_all)
    # Soft coverage: where each pixel lies between the background (0) and the object (1).
    coverage = np.clip((x - bg_rgb) @ contrast / float(contrast @ contrast), 0.0, 1.0)  # (f, h, w)
    if band_rows is not None and mask.any():
        body_rgb, band_rgb = _band_colors(x, mask, band_rows)
        band_distance = float(np.linalg.norm(band_rgb - body_rgb))
        out.update(body_rgb=body_rgb.tolist(), band_rgb=band_rgb.tolist(), band_distance=band_distance)
        palette = [body_rgb - bg_rgb] + ([band_rgb - bg_rgb] if band_distance > BAND_NONE_DISTANCE else [])
        weights = np.linalg.pinv(np.stack(palette, axis=1).astype(np.float64)).sum(axis=0)  # (3,): pixel - bg -> a + b
        coverage = np.clip((x - bg_rgb) @ weights.astype(np.float32), 0.0, 1.0)
    rows, cols = np.mgrid[0 : x.shape[1], 0 : x.shape[2]] + 0.5  # pixel centres (y, x)
    areas, fills, centroids, colors, times = [], [], [], [], []
    first_box = None
    for i in np.flatnonzero(mask.any(axis=(1, 2))):
        alpha = np.where(near_all[i], coverage[i], 0.0)  # the region plus its anti-aliased rim
        area = float(alpha.sum())
        if area <= 0:
            continue
        # Bounding-box sides = longest row and column of the soft mask: exact for any
        # sub-pixel position, and unchanged by the 2x2 chroma averaging of yuv420p video.
        box_w, box_h = _longest_run(alpha, axis=1), _longest_run(alpha, axis=0)
        areas.append(area)
        fills.append(area / (box_w * box_h))
        centroids.append(((alpha * cols).sum() / area, (alpha * rows).sum() / area))
        first_box = first_box or _box(alpha)
        colors.append(np.median(x[i][mask[i]], axis=0))
        times.append(i / fps)
    if not areas:
        return out
    areas, centroids, colors = np.asarray(areas), np.asarray(centroids), np.asarray(colors)
    color_rgb = np.median(x[mask], axis=0)
    fill = float(np.median(fills))
    named = color_rgb if band_rows is None else np.asarray(out["body_rgb"])
    out.update(color=nearest(COLORS, named)[0], color_rgb=color_rgb.tolist(), fill_ratio=fill,
               shape=min(FILL_RATIOS, key=lambda s: abs(FILL_RATIOS[s] - fill)),
               detected_frac=len(areas) / num, area_cv=float(areas.std() / areas.mean()), first_box_px=first_box,
               area_px=float(np.median(areas)), color_drift=float(np.linalg.norm(colors - color_rgb, axis=1).mean()))
    if len(areas) < 2:
        return out
    t = np.asarray(times)
    design = np.stack([np.ones_like(t), t], axis=1)  # least squares: c(t) = c0 + v t
    coef, *_ = np.linalg.lstsq(design, centroids, rcond=None)  # (2, 2): rows c0, v
    vx, vy = coef[1]
    residual = centroids - design @ coef
    speed = float(np.hypot(vx, vy)) / width  # fractions of S per second
    if speed < 0.5 * SPEEDS["slow"]:
        direction, speed_name = "still", NO_SPEED
    else:
        speed_name = "slow" if speed < 0.5 * (SPEEDS["slow"] + SPEEDS["fast"]) else "fast"
        direction = ("right" if vx > 0 else "left") if abs(vx) >= abs(vy) else ("down" if vy > 0 else "up")
    out.update(direction=direction, speed=speed_name, speed_measured=speed,
               speed_px_per_second=speed * width, velocity_px_per_second=[float(vx), float(vy)],
               track_rmse_px=float(np.sqrt((residual ** 2).sum(1).mean())))
    return out


def _box(alpha: np.ndarray) -> list:
    """[x0, y0, x1, y1] (px) of the soft mask: the columns and rows it covers by at least 1/2."""
    cols, rows = np.nonzero(alpha.sum(0) >= 0.5)[0], np.nonzero(alpha.sum(1) >= 0.5)[0]
    if not len(cols) or not len(rows):
        return [0.0, 0.0, 0.0, 0.0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def motion_room(frame: np.ndarray, prompt_or_attrs, *, fps: float, num_frames: int) -> dict | None:
    """Does an image leave room for the motion a caption asks for over `num_frames` at `fps`?

    ``{"room_px": free pixels between the object and the edge it moves toward, "travel_px": how
    far the caption's speed carries it, "fits": room >= travel}``; None for a still caption or
    an image with no object. A ShapesWorld clip always fits (its start point is drawn so), so a
    generated first frame that does not is a conditioning no video of that caption starts from.
    """
    target = _target_attributes(prompt_or_attrs)
    if target["direction"] == "still":
        return None
    box = analyze_clip(np.asarray(frame)[None], fps)["first_box_px"]
    if box is None:
        return None
    size_y, size_x = np.asarray(frame).shape[:2]
    x0, y0, x1, y1 = box
    room = {"left": x0, "right": size_x - x1, "up": y0, "down": size_y - y1}[target["direction"]]
    travel = SPEEDS[target["speed"]] * size_x * (num_frames - 1) / fps
    return {"room_px": float(room), "travel_px": float(travel), "fits": bool(room >= travel)}


def _target_attributes(prompt_or_attrs) -> dict:
    if isinstance(prompt_or_attrs, str):
        return parse_caption(prompt_or_attrs)
    a = attributes_of(prompt_or_attrs)
    missing = [k for k in ATTRIBUTES if k not in a]
    if missing:
        raise ValueError(f"prompt attributes miss {missing}: {a}")
    target = {k: a[k] for k in ATTRIBUTES}
    if target["direction"] == "still" or target["speed"] in (None, "still"):
        target["speed"] = NO_SPEED
    return target


def score_clip(frames: np.ndarray, fps: float, prompt_or_attrs, *, band_rows: float | None = None) -> dict:
    """Score a clip against a prompt (caption string, attribute dict or ClipSpec).

    Returns a JSON-serialisable dict: ``pred``, ``target`` and ``correct`` (per attribute),
    ``all_correct``, ``speed_measured`` / ``speed_requested`` (fractions of the frame width
    per second), ``speed_measured_px_per_frame``, and the measurements of
    :func:`analyze_clip` including the temporal-consistency numbers ``area_cv`` (coefficient
    of variation of the mask area), ``color_drift`` (mean RGB distance of each frame's
    median object colour from the clip's), ``background_flicker``, ``detected_frac`` and
    ``track_rmse_px``.
    ``band_rows``: a banded object, as in :func:`analyze_clip`.
    """
    target = _target_attributes(prompt_or_attrs)
    measured = analyze_clip(frames, fps, band_rows=band_rows)
    pred = {k: measured.pop(k) for k in ATTRIBUTES}
    correct = {k: pred[k] == target[k] for k in ATTRIBUTES}
    requested = SPEEDS.get(target["speed"], 0.0)
    speed_pf = None if measured["speed_px_per_second"] is None else measured["speed_px_per_second"] / fps
    return dict(pred=pred, target=target, correct=correct, all_correct=all(correct.values()),
                speed_requested=requested, speed_measured_px_per_frame=speed_pf, **measured)


CONSISTENCY = ("area_cv", "color_drift", "background_flicker")  # a clip's temporal-consistency numbers


def aggregate_scores(results: Iterable[dict]) -> dict:
    """Per-attribute accuracy and all-correct rate, overall and for seen / held-out pairs."""
    results = list(results)

    def summarise(rs):
        if not rs:
            return {"n": 0}
        acc = {k: float(np.mean([r["correct"][k] for r in rs])) for k in ATTRIBUTES}
        out = {"n": len(rs), "accuracy": acc, "all_correct": float(np.mean([r["all_correct"] for r in rs]))}
        for key in CONSISTENCY:
            values = [r[key] for r in rs if r.get(key) is not None]
            out[f"mean_{key}"] = float(np.mean(values)) if values else None
        return out

    def held_out(r):
        return (r["target"]["color"], r["target"]["shape"]) in HELD_OUT_PAIRS

    out = summarise(results)
    out["by_split"] = {"seen": summarise([r for r in results if not held_out(r)]),
                       "held_out": summarise([r for r in results if held_out(r)])}
    return out
