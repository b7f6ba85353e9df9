"""One source video to clips and rejects: what a worker process does with a file.

    probe ─ no video / unreadable ─────────────────────────────────── decode_error
      │ ─ frame too small ────────────────────────────────────────── too_small
      │ ─ source below filters.min_fps ──────────────────────────── low_fps
      │ ─ no caption source and no captioner ────────────────────── no_caption
    pass 1 (scan.py): timestamps, scene cuts, border profiles ─ no frame ─ decode_error
    plan (clips.py): scenes -> clips ─ too_short / too_small (after the border crop)
    pass 2 (clips.py): cropped, resized, 24 fps frames of each clip
      caption (file / sidecar / captioner) ─ none ─ no_caption
      H.264 (video_io.encode_video_bytes), motion score (motion.motion_score, as training uses)

Checks that need no decoding come first, so files that cannot give a clip cost a probe. The
result holds the encoded clips with their shard metadata; the main process writes them.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import List, Optional

from kvideo.data.motion import motion_score
from kvideo.data.prepare.captions import Captioner, ClipContext
from kvideo.data.prepare.clips import Reject, clip_frames, plan_clips
from kvideo.data.prepare.scan import scan_source, upright_size
from kvideo.data.video_io import VideoDecodeError, encode_video_bytes, probe

__all__ = ["Clip", "SourceResult", "process_source", "clip_key", "REASONS"]

REASONS = ("decode_error", "too_short", "too_small", "low_fps", "no_caption", "timeout")


@dataclass
class Clip:
    key: str
    mp4: bytes
    meta: dict  # the shard's KEY.json; the manifest row is this plus key and shard


@dataclass
class SourceResult:
    source: str
    duration_s: float = 0.0  # seconds of source video (0 when it could not be read)
    candidates: int = 0  # clips in: scenes (or parts of long scenes) found
    clips: List[Clip] = field(default_factory=list)
    rejects: List[dict] = field(default_factory=list)
    process_s: float = 0.0

    def reject(self, reason: str, detail: str) -> "SourceResult":
        self.rejects.append(Reject(reason, detail).record(self.source))
        return self


def clip_key(source: str, index: int) -> str:
    """A key fixed by the source path and the clip's number, so re-runs name clips identically."""
    return f"{hashlib.sha1(source.encode()).hexdigest()[:16]}_{index:04d}"


def process_source(source: str, cfg, caption: Optional[str], captioner: Optional[Captioner]) -> SourceResult:
    """Clips and rejects of one source. `caption` is its file/sidecar caption if any.

    Raises only on bugs: every problem of the input becomes a reject.
    """
    t0 = time.perf_counter()
    result = SourceResult(source)
    try:
        _process(result, cfg, caption, captioner)
    except VideoDecodeError as e:
        result.clips.clear()
        result.rejects.clear()
        result.reject("decode_error", e.reason)
    result.process_s = time.perf_counter() - t0
    return result


def _process(result: SourceResult, cfg, caption: Optional[str], captioner: Optional[Captioner]) -> None:
    f = cfg.filters
    info = probe(result.source)
    if not info["has_video"]:
        what = "audio-only file" if info["has_audio"] else "no audio either"
        result.reject("decode_error", f"no video stream ({what})")
        return
    result.duration_s = float(info["duration_s"])
    width, height = upright_size(info["width"], info["height"], info["rotation"])
    if width * height < f.min_area or min(width, height) < f.min_side:
        result.reject("too_small", f"frames are {width}x{height}, below filters.min_area={f.min_area} "
                                   f"or filters.min_side={f.min_side}")
        return
    if 0 < info["fps"] < f.min_fps:
        result.reject("low_fps", f"source runs at {info['fps']:.3f} fps, below filters.min_fps={f.min_fps}")
        return
    if caption is None and captioner is None and not cfg.captions.allow_empty:
        result.reject("no_caption", "no entry in captions.file, no sidecar .txt, and no captions.captioner")
        return

    estimate = max(info["num_frames"], 1) * width * height * 3
    keep = cfg.run.keep_decoded_mb * 2**20
    scan = scan_source(result.source, info, cfg, keep_bytes=keep if estimate <= keep else 0)
    result.duration_s = scan.duration_s
    if info["fps"] <= 0 and scan.measured_fps < f.min_fps:
        result.reject("low_fps", f"source runs at {scan.measured_fps:.3f} fps (measured), below filters.min_fps={f.min_fps}")
        return
    plans, rejects = plan_clips(scan, cfg)
    result.candidates = len(plans) + len(rejects)
    result.rejects += [r.record(result.source) for r in rejects]

    v = cfg.video
    for plan, frames in clip_frames(result.source, scan, plans, rotation=info["rotation"], threads=cfg.run.decode_threads):
        text = caption
        if text is None and captioner is not None:
            text = captioner.caption(ClipContext(result.source, plan.start_s, plan.end_s, frames, v.fps))
        if text is None and cfg.captions.allow_empty:
            text = ""
        if text is None:
            result.rejects.append(Reject("no_caption", f"captions.captioner '{cfg.captions.captioner}' gave no caption",
                                         plan.start_s, plan.end_s).record(result.source))
            continue
        mp4 = encode_video_bytes(frames, v.fps, crf=v.crf, preset=v.preset, pix_fmt=v.pix_fmt)
        meta = {
            "caption": text, "fps": float(v.fps), "num_frames": int(len(frames)),
            "width": int(frames.shape[2]), "height": int(frames.shape[1]),
            "motion_score": motion_score(frames, v.fps, method=cfg.motion.method, raft_weights=cfg.motion.raft_weights),
            "source": result.source, "start_s": round(plan.start_s, 6), "end_s": round(plan.end_s, 6),
            "crop": list(plan.crop) if plan.crop is not None else None, "source_fps": round(float(info["fps"]), 6),
        }
        result.clips.append(Clip(clip_key(result.source, plan.index), mp4, meta))
    if scan.decode_error:
        if not result.clips:
            raise VideoDecodeError(result.source, scan.decode_error)
        end = max(float(info["duration_s"]), scan.end_s)
        result.rejects.append(Reject("decode_error", scan.decode_error, scan.end_s, end).record(result.source))
