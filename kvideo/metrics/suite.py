"""Every video metric over two folders of videos, with features cached per video.

    detectors = Detectors(inception=PATH, i3d=PATH, clip=("ViT-B-32", PATH), raft=PATH)
    result = evaluate_folders(generated_dir, reference_dir, detectors, metrics=("fid", "fvd", ...),
                              prompts=None, cache=OUT / "features")

`tools/evaluate_videos.py` is the command line. Per video and detector, the features are
computed once and kept under `cache/<detector>-<weights sha256[:12]>[-<settings>]/<video
sha256[:16]>.npy` (written atomically), so a second run with more metrics, or with one more
video, computes only what is new. A video that cannot be decoded is skipped and reported; one
shorter than the FVD clip is left out of the FVD only, and reported.

What each metric takes from a video: FID and KID every frame (Inception pool features of the
generated frames against the reference frames), FVD one clip of `clip_length` frames (first or
strided), CLIPSIM / CLIP-Temp every frame's CLIP embedding and the video's prompt, the flow score
and the warping error every consecutive pair.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from kvideo.data.video_io import VideoDecodeError, read_video
from kvideo.metrics.fvd import CLIP_LENGTH

METRICS = ("fid", "kid", "fvd", "clipsim", "clip_temp", "flow", "warp")
NEEDS = {"fid": "inception", "kid": "inception", "fvd": "i3d", "clipsim": "clip", "clip_temp": "clip",
         "flow": "raft", "warp": "raft"}
FLAGS = {"inception": "--inception", "i3d": "--i3d", "clip": "--clip", "raft": "--raft"}
WITH_REFERENCE = ("fid", "kid", "fvd")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi")


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Detectors:
    """The weights files, each loaded on first use. `clip` is (open_clip arch, file)."""

    inception: Optional[Path] = None
    i3d: Optional[Path] = None
    clip: Optional[Tuple[str, Path]] = None
    raft: Optional[Path] = None
    device: str = "cpu"
    _loaded: Dict[str, object] = field(default_factory=dict)
    _hashes: Dict[str, str] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"this metric needs the {name} weights: pass {FLAGS[name]}")
        return Path(value[1] if name == "clip" else value)

    def describe(self, name: str) -> dict:
        """The weights file and its sha256 (recorded in metrics.json and in the cache's name)."""
        path = self.path(name)
        if not path.is_file():
            raise FileNotFoundError(f"{FLAGS[name]}: weights file {str(path)!r} not found")
        if name not in self._hashes:
            self._hashes[name] = sha256(path)
        out = {"file": str(path), "sha256": self._hashes[name]}
        if name == "clip":
            out["arch"] = self.clip[0]
        return out

    def get(self, name: str):
        if name not in self._loaded:
            from kvideo.metrics import clip_score, flow, fvd, inception

            loaders: Dict[str, Callable] = {
                "inception": lambda: inception.load_fid_inception(self.path("inception"), self.device),
                "i3d": lambda: fvd.load_i3d(self.path("i3d"), self.device),
                "clip": lambda: clip_score.load_clip(self.clip[0], self.path("clip"), self.device),
                "raft": lambda: flow.load_raft(self.path("raft"), self.device),
            }
            self._loaded[name] = loaders[name]()
        return self._loaded[name]


def list_videos(folder: Path) -> List[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"video folder {str(folder)!r} does not exist")
    videos = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise ValueError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) in {folder}")
    return videos


def read_prompts(videos: Sequence[Path], prompts_file: Optional[Path]) -> List[str]:
    """One prompt per video: the lines of `prompts_file` in the videos' sorted order, or the
    "prompt" of the JSON beside each video (as sample.py writes it)."""
    if prompts_file is not None:
        lines = [line.strip() for line in Path(prompts_file).read_text().splitlines() if line.strip()]
        if len(lines) != len(videos):
            raise ValueError(f"--prompts {prompts_file}: {len(lines)} prompts for {len(videos)} videos "
                             f"(one line per video, in the videos' sorted order)")
        return lines
    import json

    prompts = []
    for video in videos:
        meta = video.with_suffix(".json")
        if not meta.is_file():
            raise ValueError(f"no prompt for {video.name}: pass --prompts FILE or put {meta.name} "
                             f"({{\"prompt\": ...}}) beside it")
        prompts.append(json.loads(meta.read_text())["prompt"])
    return prompts


class FeatureCache:
    """<root>/<kind>/<video sha256[:16]>.npy, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, kind: str, video_hash: str) -> Path:
        return self.root / kind / f"{video_hash[:16]}.npy"

    def load(self, kind: str, video_hash: str) -> Optional[np.ndarray]:
        path = self.path(kind, video_hash)
        return np.load(path) if path.is_file() else None

    def save(self, kind: str, video_hash: str, value: np.ndarray) -> None:
        path = self.path(kind, video_hash)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(value))
        os.replace(tmp, path)


@dataclass
class VideoFeatures:
    """What the metrics read of one folder: per video, by detector."""

    videos: List[Path]
    features: Dict[str, List[Optional[np.ndarray]]]
    skipped: List[dict]


def _per_video(name: str, frames: np.ndarray, detectors: Detectors, clip_length: int, clip_mode: str) -> np.ndarray:
    from kvideo.metrics import clip_score, flow, fvd, inception

    if name == "inception":
        return inception.inception_features(detectors.get("inception"), torch.from_numpy(frames).permute(0, 3, 1, 2)).numpy()
    if name == "i3d":
        clip = torch.from_numpy(np.ascontiguousarray(fvd.take_clip(frames, clip_length, clip_mode)))
        return fvd.i3d_features(detectors.get("i3d"), clip.permute(3, 0, 1, 2)[None])[0].numpy()  # (3, t, h, w)
    if name == "clip":
        return detectors.get("clip").frame_embeddings(frames).numpy()
    raft = detectors.get("raft")
    forward, backward = flow.pair_flows(raft, frames), flow.pair_flows(raft, frames, backward=True)
    return np.array([float(forward.norm(dim=1).mean()), flow.warping_error_from_flows(frames, forward, backward)])


PER_FRAME = ("inception", "clip")  # detectors applied to every frame (FID / KID, CLIPSIM / CLIP-Temp)


def folder_features(folder: Path, kinds: Sequence[str], detectors: Detectors, cache: FeatureCache,
                    clip_length: int = CLIP_LENGTH, clip_mode: str = "first", frame_stride: int = 1) -> VideoFeatures:
    """Each detector's features of every video of `folder` (None where a video was skipped). The
    per-frame detectors see every `frame_stride`-th frame (1: all of them)."""
    if frame_stride < 1:
        raise ValueError(f"frame stride must be >= 1; got {frame_stride}")
    videos = list_videos(folder)
    cache_kinds = {}
    for name in kinds:
        label = f"clip-{detectors.clip[0]}" if name == "clip" else name
        settings = f"-{clip_mode}{clip_length}" if name == "i3d" else ""
        if name in PER_FRAME and frame_stride > 1:
            settings = f"-stride{frame_stride}"
        cache_kinds[name] = f"{label}-{detectors.describe(name)['sha256'][:12]}{settings}"
    out = VideoFeatures(videos, {name: [] for name in kinds}, [])
    for video in tqdm(videos, desc=f"features {Path(folder).name}", unit="video"):
        digest = sha256(video)
        found = {name: cache.load(cache_kinds[name], digest) for name in kinds}
        frames = None
        if any(v is None for v in found.values()):
            try:
                frames = read_video(video)[0]
            except VideoDecodeError as e:
                out.skipped.append({"video": str(video), "reason": f"cannot decode: {e}"})
                for name in kinds:
                    out.features[name].append(None)
                continue
        for name in kinds:
            value = found[name]
            if value is None:
                try:
                    seen = frames[::frame_stride] if name in PER_FRAME else frames
                    value = _per_video(name, seen, detectors, clip_length, clip_mode)
                    cache.save(cache_kinds[name], digest, value)
                except ValueError as e:  # shorter than the FVD clip, or too few frames for flow
                    out.skipped.append({"video": str(video), "metric": name, "reason": str(e)})
            out.features[name].append(value)
    return out


def _present(values: List[Optional[np.ndarray]]) -> List[np.ndarray]:
    return [v for v in values if v is not None]


def compute_metrics(generated: VideoFeatures, reference: Optional[VideoFeatures], metrics: Sequence[str],
                    detectors: Detectors, prompts: Optional[Sequence[str]] = None) -> Tuple[dict, dict]:
    """(numbers, per-video values) of `metrics` from the folders' features.

    FID: pytorch-fid's convention (covariance / (N - 1), eps-regularised sqrtm); KID: unbiased
    MMD with the cubic kernel, 100 subsets of up to 1000 frames; FVD: StyleGAN-V's; CLIPSIM,
    CLIP-Temp, flow score and warping error: means over the videos of the per-video values."""
    from kvideo.metrics import clip_score, frechet, fvd

    numbers: dict = {}
    per_video: Dict[str, dict] = {v.name: {} for v in generated.videos}
    if any(m in metrics for m in WITH_REFERENCE) and reference is None:
        raise ValueError(f"{', '.join(m for m in metrics if m in WITH_REFERENCE)} need --reference")
    if "fid" in metrics or "kid" in metrics:
        gen = np.concatenate(_present(generated.features["inception"]))
        ref = np.concatenate(_present(reference.features["inception"]))
        if "fid" in metrics:
            stats = []
            for x in (gen, ref):
                s = frechet.FeatureStats()
                s.append(x)
                stats.append(s.mean_cov(ddof=1))
            numbers["fid"] = frechet.frechet_distance(*stats[0], *stats[1])
        if "kid" in metrics:
            numbers["kid"] = frechet.kernel_distance(gen, ref)
        numbers["fid_frames"] = {"generated": len(gen), "reference": len(ref)}
    if "fvd" in metrics:
        gen, ref = _present(generated.features["i3d"]), _present(reference.features["i3d"])
        numbers["fvd"] = fvd.fvd(np.stack(gen), np.stack(ref))
        numbers["fvd_clips"] = {"generated": len(gen), "reference": len(ref)}
    if "clipsim" in metrics or "clip_temp" in metrics:
        text = detectors.get("clip").text_embeddings(prompts) if "clipsim" in metrics else None
        for i, (video, emb) in enumerate(zip(generated.videos, generated.features["clip"])):
            if emb is None:
                continue
            emb = torch.from_numpy(emb)
            if "clipsim" in metrics:
                per_video[video.name]["clipsim"] = clip_score.clipsim(emb, text[i])
            if "clip_temp" in metrics and len(emb) > 1:
                per_video[video.name]["clip_temp"] = clip_score.clip_temp(emb)
    for name, index, key in (("flow", 0, "flow_score"), ("warp", 1, "warping_error")):
        if name in metrics:
            for video, value in zip(generated.videos, generated.features["raft"]):
                if value is not None:
                    per_video[video.name][key] = float(value[index])
    for key in ("clipsim", "clip_temp", "flow_score", "warping_error"):
        values = [v[key] for v in per_video.values() if key in v]
        if values:
            numbers[key] = float(np.mean(values))
    return numbers, per_video
