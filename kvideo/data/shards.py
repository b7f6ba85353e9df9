"""Training data: webdataset tar shards read by index, so resume and rank splits are exact.

A sample is a pair of tar members `KEY.mp4` + `KEY.json` (the webdataset convention; the JSON
holds caption, fps, num_frames, width, height, motion_score and any other metadata). The shards
are the ones `tools/make_shapesworld.py` and `tools/prepare_videos.py` write. A stage that reads
the field "references" also gets each clip's reference images (`KEY.ref.png` and
`data.references`: kvideo/data/references.py).

Why an index rather than a streaming pipeline: scanning the tar headers once gives every sample
a number, so a seeded permutation decides the order of an epoch, every rank takes its own
stride of it (no duplicates across ranks, and the DataLoader hands whole batches to its workers,
so none across workers either), and the data position saved in a checkpoint is one integer:
the number of batches this rank has consumed. All randomness of a sample (clip start, crop)
comes from a generator seeded by (seed, epoch, sample index), so it does not depend on which
worker decodes it or on whether the run was resumed.

A bad sample (metadata that is not a JSON object, a field the stage reads that is missing,
wrong-typed, NaN or out of range, an empty caption, a member over `data.max_sample_mb`, a video
or a reference image that does not decode, a decode that hangs past `data.timeout_s`) is logged
with its shard and key, counted by reason (`SKIP_REASONS`) and dropped from its batch; it never
stops training. Only a whole epoch without one good sample stops the run (`NoGoodSampleError`,
naming the first failures): that is a wrong dataset or a wrong setting, not a bad sample.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import DataLoader, Dataset, Sampler

from kvideo.data.video_io import pick_frames_by_time, read_video

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Shard index
# ----------------------------------------------------------------------------------------------


def expand_shards(spec: str, key: str = "data.shards") -> List[Path]:
    """Tar files named by `spec`: a directory (its *.tar, recursively), a glob, or a
    comma-separated list of either. Sorted, so every rank sees the same list."""
    paths: List[Path] = []
    for part in [p.strip() for p in str(spec).split(",") if p.strip()]:
        p = Path(part)
        if p.is_dir():
            paths.extend(sorted(p.rglob("*.tar")))
        elif any(ch in part for ch in "*?["):
            paths.extend(Path(x) for x in sorted(glob.glob(part, recursive=True)))
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"{key}: '{part}' is neither a directory, a tar file nor a glob that matches")
    paths = sorted(set(paths))
    if not paths:
        raise FileNotFoundError(f"{key}: no .tar shards found in '{spec}'")
    return paths


@dataclass(frozen=True)
class Member:
    shard: int  # index into ShardIndex.shards
    offset: int  # byte offset of the member's data in the tar
    size: int


class ShardIndex:
    """Every complete sample (one .mp4 and one .json under the same key) in a set of shards."""

    def __init__(self, spec: str, required: Sequence[str] = ("mp4", "json"), key: str = "data.shards"):
        self.shards = expand_shards(spec, key)
        self.keys: List[str] = []
        self.members: List[Dict[str, Member]] = []
        self.incomplete = 0
        for si, path in enumerate(self.shards):
            groups: Dict[str, Dict[str, Member]] = {}
            try:
                with tarfile.open(path, "r:") as tar:
                    for info in tar:
                        if not info.isfile():
                            continue
                        name = info.name.rsplit("/", 1)[-1]
                        key, _, ext = name.partition(".")
                        prefix = info.name[: len(info.name) - len(name)]
                        groups.setdefault(prefix + key, {})[ext] = Member(si, info.offset_data, info.size)
            except (tarfile.TarError, OSError) as e:
                raise RuntimeError(f"cannot read shard '{path}': {e}") from e
            for key, exts in groups.items():
                if all(r in exts for r in required):
                    self.keys.append(key)
                    self.members.append(exts)
                else:
                    self.incomplete += 1
        if not self.keys:
            raise RuntimeError(f"{key}: the shards in '{spec}' hold no complete sample ({'+'.join(required)})")
        if self.incomplete:
            log.warning("%d incomplete samples (missing %s) ignored in '%s'", self.incomplete, "/".join(required), spec)

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, i: int, ext: str, max_bytes: Optional[int] = None) -> bytes:
        """The bytes of member `ext` of sample `i`; a member over `max_bytes` raises BadSample
        ("oversized") before anything is read."""
        m = self.members[i][ext]
        if max_bytes is not None and m.size > max_bytes:
            raise BadSample("oversized", f"{self.keys[i]}.{ext} is {m.size / 2**20:.1f} MB, over data.max_sample_mb "
                                         f"({max_bytes / 2**20:g} MB)")
        with open(self.shards[m.shard], "rb") as f:
            f.seek(m.offset)
            return f.read(m.size)

    def metadata(self, i: int) -> dict:
        return json.loads(self.read(i, "json"))

    def fingerprint(self) -> dict:
        """What identifies the data independently of where it is mounted: each shard's name and
        size, and the sample count (a resume compares it)."""
        names = "\n".join(f"{p.name}:{p.stat().st_size}" for p in self.shards)
        return {"samples": len(self), "shards": hashlib.sha256(names.encode()).hexdigest()[:16]}

    def shard_of(self, i: int) -> Path:
        return self.shards[next(iter(self.members[i].values())).shard]


# ----------------------------------------------------------------------------------------------
# Bad samples
# ----------------------------------------------------------------------------------------------

# Why a sample is skipped; the counts by reason go to metrics.jsonl as data/skipped/<reason>.
SKIP_REASONS = ("metadata", "caption", "motion_score", "timing", "oversized", "undecodable", "not_cached", "timeout",
                "reference")


class BadSample(ValueError):
    """A sample that training skips: `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str):
        assert reason in SKIP_REASONS, reason
        super().__init__(message)
        self.reason = reason


class NoGoodSampleError(RuntimeError):
    """A whole epoch of one rank's samples failed: the data or the data settings are wrong."""


def _number(meta: dict, name: str, reason: str, *, positive: bool) -> Optional[float]:
    """meta[name] as a finite float (None when absent); BadSample(reason) for anything else."""
    if name not in meta:
        return None
    v = meta[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise BadSample(reason, f"metadata '{name}' is {v!r}: expected a finite number "
                                f"{'> 0' if positive else '>= 0'}")
    return float(v)


def parse_metadata(raw: bytes, fields: Sequence[str]) -> Tuple[dict, str, float]:
    """(metadata, caption, motion score) of one sample's JSON, checked.

    `fields` are the ones the stage reads ("caption", "motion_score"): each must be present and
    valid (a caption a non-blank string, a motion score a finite number >= 0). The others are
    passed on when valid and replaced by "" / 0.0 when not, since no one reads them. `fps` and
    `num_frames`, which place the clip, must be finite and > 0 when present.
    """
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadSample("metadata", f"metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise BadSample("metadata", f"metadata is a JSON {type(meta).__name__}, not an object")
    _number(meta, "fps", "timing", positive=True)
    _number(meta, "num_frames", "timing", positive=True)
    caption = meta.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        if "caption" in fields:
            raise BadSample("caption", f"caption is {caption!r}: the stage needs a non-empty string")
        caption = ""
    if "motion_score" in fields:
        score = _number(meta, "motion_score", "motion_score", positive=False)
        if score is None:
            raise BadSample("motion_score", "metadata has no 'motion_score': the stage needs one")
    else:
        try:
            score = _number(meta, "motion_score", "motion_score", positive=False) or 0.0
        except BadSample:
            score = 0.0
    return meta, caption, score


# ----------------------------------------------------------------------------------------------
# Dataset: one clip (or frame) per sample
# ----------------------------------------------------------------------------------------------


def _sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_000_007 + index)


def resize_and_crop(frames: torch.Tensor, size: Tuple[int, int], gen: Optional[torch.Generator]) -> torch.Tensor:
    """Resize (f, c, h, w) frames (uint8 or float) so they cover `size` = (H, W), then crop to
    it: randomly when `gen` is given, else centred. Never distorts the aspect ratio."""
    H, W = size
    h, w = frames.shape[-2:]
    scale = max(H / h, W / w)
    nh, nw = max(H, round(h * scale)), max(W, round(w * scale))
    if (nh, nw) != (h, w):
        frames = F.interpolate(frames.float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    if gen is not None:
        top = int(torch.randint(0, nh - H + 1, (1,), generator=gen))
        left = int(torch.randint(0, nw - W + 1, (1,), generator=gen))
    else:
        top, left = (nh - H) // 2, (nw - W) // 2
    return frames[..., top : top + H, left : left + W]


@dataclass(frozen=True)
class ClipFormat:
    """What one sample is: `num_frames` frames picked at `fps` (by timestamp), resized to cover
    `size` (height, width) and cropped (at random in training when `random_crop`, else centred).
    `window_s`: training draws the clip's start where a window of this many seconds fits (None:
    the clip's own span). The `data` config section's keys of the same names."""

    num_frames: int
    fps: float
    size: Tuple[int, int]
    window_s: Optional[float] = None
    random_crop: bool = True

    def __post_init__(self):
        if not (self.fps > 0 and math.isfinite(self.fps)):
            raise ValueError(f"data.fps must be > 0, got {self.fps}")
        if self.num_frames < 1:
            raise ValueError(f"data.num_frames must be >= 1, got {self.num_frames}")
        if self.window_s is not None and self.window_s < (self.num_frames - 1) / self.fps:
            raise ValueError(f"data.window_s={self.window_s} is shorter than the clip itself ({self.num_frames} frames "
                             f"at {self.fps} fps span {(self.num_frames - 1) / self.fps:.3f} s)")
        if len(self.size) != 2:
            raise ValueError(f"data.size must be [height, width], got {list(self.size)}")
        object.__setattr__(self, "fps", float(self.fps))
        object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))

    @classmethod
    def from_config(cls, data_cfg) -> "ClipFormat":
        return cls(int(data_cfg.num_frames), float(data_cfg.fps), tuple(data_cfg.size), data_cfg.get("window_s"),
                   bool(data_cfg.get("random_crop", True)))


# What a dataset reads beside a sample's frames: (index, sample number, metadata, max bytes) -> dict
Extras = Callable[["ShardIndex", int, dict, Optional[int]], dict]


class ClipDataset(Dataset):
    """Map-style dataset over a ShardIndex; items are addressed as (epoch, index).

    Returns {"video": float (c, f, h, w) in [-1, 1], "caption", "motion_score", "key", "meta"}
    or, for a bad sample, {"failed": {"key", "shard", "reason" (one of SKIP_REASONS), "message"}}.
    `train`: a random clip start (and crop); otherwise the first frames, centre-cropped.
    `fields` are the metadata fields the stage reads (see `parse_metadata`); a tar member over
    `max_sample_mb` is skipped unread. `extras(index, i, metadata, max_bytes) -> dict`: more of
    each item, read beside its frames (a BadSample skips the item), e.g. the clip's reference
    images ("references", "reference_present", "reference_names": `ReferenceReader.read` of
    kvideo/data/references.py).
    """

    def __init__(self, index: ShardIndex, clip: ClipFormat, *, seed: int, train: bool = True,
                 fields: Sequence[str] = (), max_sample_mb: Optional[float] = None,
                 extras: Optional[Extras] = None):
        self.index = index
        self.clip = clip
        self.seed = seed
        self.train = train
        self.fields = tuple(fields)
        self.max_bytes = None if max_sample_mb is None else int(max_sample_mb * 2**20)
        self.extras = extras

    def __len__(self) -> int:
        return len(self.index)

    def _window(self, meta: dict, gen: Optional[torch.Generator]) -> float:
        """Start time (s) of the clip: uniform over the positions where it (or `window_s`) fits."""
        duration = float(meta["num_frames"]) / float(meta["fps"]) if "num_frames" in meta and "fps" in meta else None
        c = self.clip
        span = (c.num_frames - 1) / c.fps if c.window_s is None else c.window_s
        if duration is None or gen is None:
            return 0.0
        room = max(0.0, duration - span - 1e-6 if span > 0 else duration - 1.0 / float(meta["fps"]))
        return float(torch.rand((), generator=gen, dtype=torch.float64)) * room

    def __getitem__(self, item: Tuple[int, int]) -> dict:
        epoch, i = item
        key = self.index.keys[i]
        try:
            meta, caption, score = parse_metadata(self.index.read(i, "json", self.max_bytes), self.fields)
            gen = _sample_generator(self.seed, epoch, i) if self.train else None
            start = self._window(meta, gen)
            end = start + (self.clip.num_frames - 1) / self.clip.fps + 2.0 / self.clip.fps
            extra = {} if self.extras is None else self.extras(self.index, i, meta, self.max_bytes)
            content = {**self.load(i, start, end, gen), **extra}
        except Exception as e:  # a bad sample is skipped, never fatal
            reason = e.reason if isinstance(e, BadSample) else "undecodable"
            message = str(e) if isinstance(e, BadSample) else f"{type(e).__name__}: {e}"
            shard = str(self.index.shard_of(i))
            log.warning("skipping sample '%s' in '%s' (%s): %s", key, shard, reason, message)
            return {"failed": {"key": key, "shard": shard, "reason": reason, "message": message}}
        return {**content, "caption": caption, "motion_score": score, "key": key, "meta": meta}

    def load(self, i: int, start: float, end: float, gen: Optional[torch.Generator]) -> dict:
        """{"video": (c, f, h, w) in [-1, 1]}: the frames of sample `i` in [start, end) picked at
        data.fps, resized and cropped. Subclasses read other representations of the same frames."""
        frames, times = read_video(self.index.read(i, "mp4", self.max_bytes), start_s=start, end_s=end)
        picks = pick_frames_by_time(times, self.clip.fps, self.clip.num_frames, start)
        clip = torch.from_numpy(frames[picks])  # (f, h, w, 3) uint8
        clip = rearrange(clip, "f h w c -> f c h w")
        clip = resize_and_crop(clip, self.clip.size, gen if self.clip.random_crop else None)
        return {"video": rearrange(clip.float() / 127.5 - 1.0, "f c h w -> c f h w").contiguous()}


def collate(samples: List[dict]) -> dict:
    """Stack the decoded samples; report the bad ones under `failed` (their dicts)."""
    good = [s for s in samples if "failed" not in s]
    failed = [s["failed"] for s in samples if "failed" in s]
    batch = {"failed": failed, "size": len(good)}
    if good:
        for name in ("video", "latents"):  # frames (b, 3, f, H, W) or cached latents (b, c, f, h, w)
            if name in good[0]:
                batch[name] = torch.stack([s[name] for s in good])
        batch["caption"] = [s["caption"] for s in good]
        batch["motion_score"] = torch.tensor([s["motion_score"] for s in good], dtype=torch.float32)
        batch["key"] = [s["key"] for s in good]
        batch["meta"] = [s["meta"] for s in good]
        if "references" in good[0]:  # (b, R, 3, H, W) float, (b, R) bool, b lists of R names ("" when absent)
            batch["references"] = torch.stack([s["references"] for s in good])
            batch["reference_present"] = torch.stack([s["reference_present"] for s in good])
            batch["reference_names"] = [s["reference_names"] for s in good]
    return batch


# ----------------------------------------------------------------------------------------------
# Sampling: epochs, ranks, resume
# ----------------------------------------------------------------------------------------------


class ResumableBatchSampler(Sampler):
    """Endless batches of (epoch, index) for one rank, starting after `start_batch` batches.

    Each epoch is a permutation seeded by (seed, epoch); rank r takes items r, r + W, r + 2W...
    (the permutation is padded by wrapping so every rank gets the same count) and drops the
    last incomplete batch. Batch b of the run is therefore a pure function of (seed, rank, b).
    The W ranks' first j batches of an epoch are its first j * batch_size * W items together,
    which is what makes a data position exact at the sample level (`sample_position`).

    `origin` (epoch, offset): the sampler's batch 0 starts at item `offset` of that epoch's
    permutation (a run resumed on another number of ranks continues where the old ranks stopped:
    the rest of that epoch is dealt over the new ranks, then whole epochs as usual).
    """

    def __init__(self, n: int, batch_size: int, *, rank: int, world_size: int, seed: int, shuffle: bool,
                 start_batch: int = 0, origin: Tuple[int, int] = (0, 0)):
        per_rank = -(-n // world_size)
        self.batches_per_epoch = per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"only {n} samples for {world_size} rank(s) at train.batch_size={batch_size}: "
                             f"not one full batch per rank; lower the batch size or add data")
        self.n, self.batch_size = n, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.start_batch = start_batch
        self.origin = (int(origin[0]), int(origin[1]))
        self.first_epoch_batches = (-(-(n - self.origin[1]) // world_size)) // batch_size

    def permutation(self, epoch: int) -> List[int]:
        if self.shuffle:
            return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch)).tolist()
        return list(range(self.n))

    def epoch_order(self, epoch: int) -> List[int]:
        """This rank's items of `epoch` (from the origin's offset in the origin's epoch)."""
        perm = self.permutation(epoch)
        items = perm[self.origin[1]:] if epoch == self.origin[0] else perm
        total = -(-len(items) // self.world_size) * self.world_size
        items = (items + perm * (total // self.n + 1))[:total]  # padded by wrapping to the epoch's start
        return items[self.rank :: self.world_size]

    def locate(self, b: int) -> Tuple[int, int]:
        """(epoch, batch within that epoch's order) of the run's batch `b`."""
        if b < self.first_epoch_batches:
            return self.origin[0], b
        epoch, j = divmod(b - self.first_epoch_batches, self.batches_per_epoch)
        return self.origin[0] + 1 + epoch, j

    def batch(self, b: int) -> List[Tuple[int, int]]:
        """The items of batch `b` of the run."""
        epoch, j = self.locate(b)
        return [(epoch, i) for i in self.epoch_order(epoch)[j * self.batch_size : (j + 1) * self.batch_size]]

    def sample_position(self, batches_done: int) -> Tuple[int, int]:
        """(epoch, offset into its permutation) of the next item once every rank has read
        `batches_done` batches: where a run on any number of ranks continues."""
        epoch, j = self.locate(batches_done)
        offset = (self.origin[1] if epoch == self.origin[0] else 0) + j * self.batch_size * self.world_size
        return (epoch + 1, 0) if offset >= self.n else (epoch, offset)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        b = self.start_batch
        while True:
            epoch, within = self.locate(b)
            order = self.epoch_order(epoch)
            for j in range(within, len(order) // self.batch_size):
                yield [(epoch, i) for i in order[j * self.batch_size : (j + 1) * self.batch_size]]
                b += 1

    def __len__(self) -> int:  # endless; DataLoader only needs this for its own bookkeeping
        return 2**62


class TrainData:
    """The training batches of one rank, with a data position that checkpoints can restore.

    Bad samples are dropped from their batches and counted by reason (`skipped`); a batch in
    which nothing decodes is skipped whole. With worker processes, a batch that takes longer
    than `timeout_s` (a decoder that hangs) is given up: its workers are stopped, its samples
    counted as "timeout", and reading goes on from the next batch. In-process loading
    (num_workers = 0) cannot be timed out.
    """

    def __init__(self, dataset: ClipDataset, sampler: ResumableBatchSampler, *, num_workers: int,
                 timeout_s: float = 0.0, skipped: Optional[Dict[str, int]] = None):
        self.dataset, self.sampler = dataset, sampler
        self.batches_done = sampler.start_batch
        self.skipped: Counter = Counter({r: int(n) for r, n in (skipped or {}).items() if r in SKIP_REASONS})
        self.first_failures: List[dict] = []  # the first few of the current run of failures
        self.failed_in_row = 0  # samples since the last good one
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s) if num_workers > 0 else 0.0
        self.batches_per_epoch = sampler.batches_per_epoch
        self.samples_per_epoch = self.batches_per_epoch * sampler.batch_size
        self._open(sampler.start_batch)

    def _open(self, start_batch: int) -> None:
        self.sampler.start_batch = start_batch
        self.loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=self.num_workers,
                                 collate_fn=collate, persistent_workers=self.num_workers > 0,
                                 generator=torch.Generator(), timeout=self.timeout_s,
                                 prefetch_factor=2 if self.num_workers > 0 else None)
        self._it = iter(self.loader)

    def _close(self) -> None:
        shutdown = getattr(self._it, "_shutdown_workers", None)  # stops (and if need be kills) hung workers
        if shutdown is not None:
            shutdown()
        self._it = None
        self.loader = None

    def _fetch(self) -> dict:
        """The next batch off the loader; a batch past the timeout becomes a batch of failures."""
        try:
            return next(self._it)
        except RuntimeError as e:
            if not (self.timeout_s > 0 and "timed out" in str(e)):
                raise
        items = self.sampler.batch(self.batches_done)
        log.warning("a batch took longer than data.timeout_s=%gs (a hanging decoder?): its %d samples are skipped "
                    "and the data workers restarted", self.timeout_s, len(items))
        self._close()
        self._open(self.batches_done + 1)
        failed = [{"key": self.dataset.index.keys[i], "shard": str(self.dataset.index.shard_of(i)), "reason": "timeout",
                   "message": f"no batch within data.timeout_s={self.timeout_s:g}s"} for _, i in items]
        return {"failed": failed, "size": 0}

    def next(self) -> dict:
        """The next batch with at least one good sample."""
        while True:
            batch = self._fetch()
            self.batches_done += 1
            for f in batch["failed"]:
                self.skipped[f["reason"]] += 1
                if len(self.first_failures) < 5:
                    self.first_failures.append(f)
            if batch["size"] > 0:
                self.failed_in_row = 0
                self.first_failures = []
                return batch
            self.failed_in_row += len(batch["failed"])
            if self.failed_in_row >= self.samples_per_epoch:
                first = "; ".join(f"'{f['key']}' in '{f['shard']}' ({f['reason']}): {f['message']}"
                                  for f in self.first_failures)
                raise NoGoodSampleError(
                    f"{self.failed_in_row} samples in a row, a whole epoch of this rank's data, were bad: check "
                    f"data.shards and the data settings (data.fps, data.size, data.max_sample_mb, data.timeout_s). "
                    f"First failures: {first}")

    @property
    def epoch(self) -> float:
        return self.batches_done / self.batches_per_epoch

    @property
    def failed_total(self) -> int:
        return sum(self.skipped.values())

    def state(self) -> dict:
        return {"batches_done": self.batches_done, "skipped": dict(self.skipped), "origin": list(self.sampler.origin)}


def reshard_positions(states: List[dict], n: int, batch_size: int, *, seed: int, shuffle: bool,
                      world_size: int) -> Optional[List[dict]]:
    """The data positions of `world_size` new ranks that continue exactly where the old ranks'
    `states` stopped (the rest of the epoch dealt over the new ranks), or None when no position
    is exact: the old ranks had read different numbers of batches (one skipped a batch whose every
    sample was bad)."""
    done = {int(st.get("batches_done", 0)) for st in states}
    if len(done) != 1:
        return None
    origin = tuple(states[0].get("origin", (0, 0)))
    old = ResumableBatchSampler(n, batch_size, rank=0, world_size=len(states), seed=seed, shuffle=shuffle,
                                origin=origin)
    position = list(old.sample_position(done.pop()))
    skipped = Counter()
    for st in states:
        skipped.update(st.get("skipped", {}))
    return [{"batches_done": 0, "origin": position, "skipped": dict(skipped) if r == 0 else {}}
            for r in range(world_size)]


def eval_batches(dataset: ClipDataset, batch_size: int, max_batches: int) -> Iterator[dict]:
    """The first `max_batches` batches of a dataset in order, centre-cropped (deterministic)."""
    n = min(len(dataset), batch_size * max_batches)
    items = [(0, i) for i in range(n)]
    for j in range(0, n, batch_size):
        batch = collate([dataset[it] for it in items[j : j + batch_size]])
        if batch["size"] > 0:
            yield batch

