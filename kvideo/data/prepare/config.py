"""The typed schema of `tools/prepare_videos.py` and how it is loaded.

`load_prepare_config(files, overrides)` merges `configs/prepare/default.yaml`-style YAML files
left to right, then `key=value` overrides, over `PrepareConfig`. An unknown key or a wrong type
stops start-up with a `ConfigError` naming the dotted key (the same rules as the training
configs, `kvideo/config.py`); `validate` then checks values no type can express (a detector
name, a captioner name, a positive limit) and names the key too. Defaults live here only.

The filter defaults are the Kandinsky Video 1.1 data recipe: scenes of at least 2 s, frames of
at least 256x256 pixels in area and 128 px on each side, sources of at least 23 fps; clips are
stored at 24 fps with the short side at most 1080 px.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kvideo.config import ConfigError, _merge

__all__ = ["PrepareConfig", "load_prepare_config", "validate", "ConfigError"]


@dataclass
class InputsConfig:
    # Files with these extensions are videos when a directory is searched. A file named on the
    # command line is always an input, except `.txt`/`.lst`/`.list` files, which list inputs.
    extensions: List[str] = field(default_factory=lambda: [
        "mp4", "mov", "m4v", "mkv", "webm", "avi", "mpg", "mpeg", "ts", "flv", "wmv", "3gp"])


@dataclass
class ScenesConfig:
    detector: str = "adaptive"  # adaptive | content (PySceneDetect AdaptiveDetector / ContentDetector)
    threshold: float = 27.0  # content: the frame score (HSV difference) that makes a cut
    adaptive_threshold: float = 3.0  # adaptive: score / mean score of the neighbours that makes a cut
    min_content_val: float = 15.0  # adaptive: and the score must be at least this
    window_width: int = 2  # adaptive: neighbours on each side
    min_scene_len_s: float = 0.5  # no two cuts closer than this
    analysis_width: int = 256  # frames are downscaled to this width for detection (PySceneDetect's default)
    max_clip_s: float = 10.0  # longer scenes are split into equal clips no longer than this (bounds memory)


@dataclass
class FiltersConfig:
    min_duration_s: float = 2.0  # shorter scenes: too_short
    min_area: int = 256 * 256  # smaller frames (width * height, after border crop): too_small
    min_side: int = 128  # a side below this: too_small
    min_fps: float = 23.0  # sources running slower: low_fps


@dataclass
class BordersConfig:
    enabled: bool = True
    threshold: float = 24.0  # luma (0-255) at or below which a pixel is black; a row/column with 1% brighter is picture
    samples_per_second: float = 2.0  # source frames per second whose luma profile is kept
    frames_per_clip: int = 8  # profiles spread through a clip whose content boxes are united


@dataclass
class VideoConfig:
    fps: float = 24.0  # output frame rate (frames picked by timestamp)
    max_short_side: int = 1080  # larger frames are resized down to this short side; never upscaled
    crf: int = 18
    preset: str = "fast"  # x264 speed preset
    pix_fmt: str = "yuv420p"


@dataclass
class MotionConfig:
    method: str = "farneback"  # farneback | raft (kvideo/data/motion.py, the function training uses)
    raft_weights: Optional[str] = None  # local torchvision RAFT state dict for method=raft


@dataclass
class CocaConfig:
    weights: Optional[str] = None  # local open_clip CoCa checkpoint (never downloaded)
    model: str = "coca_ViT-L-14"  # open_clip architecture name
    seq_len: int = 30  # maximum caption length in tokens (greedy decoding)
    device: str = "cpu"


@dataclass
class CaptionsConfig:
    file: Optional[str] = None  # CSV or JSONL keyed by source path (what --captions sets)
    sidecar: bool = True  # VIDEO.txt beside VIDEO.mp4 holds its caption
    captioner: Optional[str] = None  # a registered captioner for what has no caption: coca | shapesworld
    allow_empty: bool = False  # keep clips without a caption (caption "") instead of rejecting them
    coca: CocaConfig = field(default_factory=CocaConfig)


@dataclass
class WriterConfig:
    max_shard_mb: float = 256.0  # a shard closes before a clip would take it past this size
    max_shard_clips: int = 1000
    shuffle_buffer_clips: int = 2000  # finished clips held in memory and drawn at random into shards
    seed: int = 0
    fsync: bool = True  # fsync shards and the journal (off only for throwaway runs)


@dataclass
class RunConfig:
    workers: int = 1  # worker processes (the --workers flag sets this)
    time_limit_s: float = 900.0  # per source file; a worker past it is killed, the file rejected `timeout`
    memory_limit_mb: int = 8192  # address space a worker may add over its baseline while on one file; 0: none
    keep_decoded_mb: int = 1024  # a file whose decoded frames fit is decoded once, not twice
    decode_threads: int = 1  # FFmpeg decoder threads per worker


@dataclass
class PrepareConfig:
    inputs: InputsConfig = field(default_factory=InputsConfig)
    scenes: ScenesConfig = field(default_factory=ScenesConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    borders: BordersConfig = field(default_factory=BordersConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)
    captions: CaptionsConfig = field(default_factory=CaptionsConfig)
    writer: WriterConfig = field(default_factory=WriterConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ----------------------------------------------------------------------------------------------
# Loading and checking
# ----------------------------------------------------------------------------------------------


def load_prepare_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """`PrepareConfig` with YAML `files` merged left to right, then `key=value` `overrides`.

    Returns a read-only DictConfig whose values have been checked by :func:`validate`.
    """
    cfg = OmegaConf.structured(PrepareConfig)
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = OmegaConf.load(path)
        except (OmegaConfBaseException, Exception) as e:  # yaml errors are not OmegaConf's
            raise ConfigError(f"{path}: cannot parse YAML: {e}") from None
        cfg = _merge(cfg, raw, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    if overrides:
        cfg = _merge(cfg, OmegaConf.from_dotlist(list(overrides)), "command line")
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Check the values a type cannot; every error names the dotted key."""
    from kvideo.data.prepare.captions import CAPTIONERS
    from kvideo.data.prepare.scan import DETECTORS

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}': {message}")

    need(cfg.scenes.detector in DETECTORS, "scenes.detector",
         f"unknown detector '{cfg.scenes.detector}'. Valid detectors: {', '.join(DETECTORS)}")
    need(cfg.scenes.analysis_width >= 16, "scenes.analysis_width", "must be at least 16 px")
    need(cfg.scenes.max_clip_s > 0, "scenes.max_clip_s", "must be positive")
    need(cfg.scenes.window_width >= 1, "scenes.window_width", "must be at least 1")
    need(cfg.filters.min_duration_s >= 0, "filters.min_duration_s", "must be >= 0")
    need(cfg.scenes.max_clip_s >= 2 * cfg.filters.min_duration_s, "scenes.max_clip_s",
         f"must be at least twice filters.min_duration_s ({cfg.filters.min_duration_s}), so the parts of a "
         "long scene are never too short")
    need(cfg.borders.samples_per_second > 0, "borders.samples_per_second", "must be positive")
    need(cfg.borders.frames_per_clip >= 1, "borders.frames_per_clip", "must be at least 1")
    need(cfg.video.fps > 0, "video.fps", "must be positive")
    need(cfg.video.max_short_side >= 2, "video.max_short_side", "must be at least 2")
    need(cfg.motion.method in ("farneback", "raft"), "motion.method", "must be farneback or raft")
    need(cfg.motion.method != "raft" or cfg.motion.raft_weights is not None, "motion.raft_weights",
         "motion.method=raft needs a local RAFT weights file (kvideo never downloads weights)")
    need(cfg.captions.captioner is None or cfg.captions.captioner in CAPTIONERS, "captions.captioner",
         f"unknown captioner '{cfg.captions.captioner}'. Valid captioners: {', '.join(CAPTIONERS)}")
    need(cfg.writer.max_shard_mb > 0, "writer.max_shard_mb", "must be positive")
    need(cfg.writer.max_shard_clips >= 1, "writer.max_shard_clips", "must be at least 1")
    need(cfg.writer.shuffle_buffer_clips >= 0, "writer.shuffle_buffer_clips", "must be >= 0")
    need(cfg.run.workers >= 1, "run.workers", "must be at least 1")
    need(cfg.run.time_limit_s > 0, "run.time_limit_s", "must be positive")
    need(cfg.run.memory_limit_mb >= 0, "run.memory_limit_mb", "must be >= 0 (0: no limit)")
    need(cfg.run.decode_threads >= 0, "run.decode_threads", "must be >= 0 (0: FFmpeg's choice)")
