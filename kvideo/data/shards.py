"""Training data: webdataset tar shards read by index, so resume and rank splits are exact.

A sample is a pair of tar members `KEY.mp4` + `KEY.json` (the webdataset convention; the JSON
holds caption, fps, num_frames, width, height, motion_score and any other metadata). The shards
are the ones `tools/make_shapesworld.py` and `tools/prepare_videos.py` write.

Why an index rather than a streaming pipeline: scanning the tar headers once gives every sample
a number, so a seeded permutation decides the order of an epoch, every rank takes its own
stride of it (no duplicates across ranks, and the DataLoader hands whole batches to its workers,
so none across workers either), and the data position saved in a checkpoint is one integer:
the number of batches this rank has consumed. All randomness of a sample (clip start, crop)
comes from a generator seeded by (seed, epoch, sample index), so it does not depend on which
worker decodes it or on whether the run was resumed.

A sample that fails to decode is logged, counted and dropped from its batch; it never stops
training.
"""

from __future__ import annotations

import glob
import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

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

    def read(self, i: int, ext: str) -> bytes:
        m = self.members[i][ext]
        with open(self.shards[m.shard], "rb") as f:
            f.seek(m.offset)
            return f.read(m.size)

    def metadata(self, i: int) -> dict:
        return json.loads(self.read(i, "json"))


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


class ClipDataset(Dataset):
    """Map-style dataset over a ShardIndex; items are addressed as (epoch, index).

    Returns {"video": float (c, f, h, w) in [-1, 1], "caption", "motion_score", "key", "meta"}
    or, when the sample cannot be decoded, {"failed": key, "reason": message}.
    """

    def __init__(self, index: ShardIndex, *, num_frames: int, fps: float, size: Sequence[int], seed: int,
                 train: bool = True, random_crop: bool = True, window_s: Optional[float] = None):
        if num_frames < 1:
            raise ValueError(f"data.num_frames must be >= 1, got {num_frames}")
        if window_s is not None and window_s < (num_frames - 1) / fps:
            raise ValueError(f"data.window_s={window_s} is shorter than the clip itself "
                             f"({num_frames} frames at {fps} fps span {(num_frames - 1) / fps:.3f} s)")
        if len(size) != 2:
            raise ValueError(f"data.size must be [height, width], got {list(size)}")
        self.index = index
        self.num_frames = num_frames
        self.fps = float(fps)
        self.size = (int(size[0]), int(size[1]))
        self.seed = seed
        self.train = train  # random clip start (and crop); eval: the first frames, centre crop
        self.random_crop = random_crop
        self.window_s = window_s

    def __len__(self) -> int:
        return len(self.index)

    def _window(self, meta: dict, gen: Optional[torch.Generator]) -> float:
        """Start time (s) of the clip: uniform over the positions where it (or `window_s`) fits."""
        duration = float(meta["num_frames"]) / float(meta["fps"]) if "num_frames" in meta and "fps" in meta else None
        span = (self.num_frames - 1) / self.fps if self.window_s is None else self.window_s
        if duration is None or gen is None:
            return 0.0
        room = max(0.0, duration - span - 1e-6 if span > 0 else duration - 1.0 / float(meta["fps"]))
        return float(torch.rand((), generator=gen, dtype=torch.float64)) * room

    def __getitem__(self, item: Tuple[int, int]) -> dict:
        epoch, i = item
        key = self.index.keys[i]
        try:
            meta = self.index.metadata(i)
            gen = _sample_generator(self.seed, epoch, i) if self.train else None
            start = self._window(meta, gen)
            end = start + (self.num_frames - 1) / self.fps + 2.0 / self.fps
            content = self.load(i, start, end, gen)
        except Exception as e:  # a broken sample is skipped, never fatal
            log.warning("skipping sample '%s' (%s): %s", key, self.index.shards[self.index.members[i]['mp4'].shard], e)
            return {"failed": key, "reason": f"{type(e).__name__}: {e}"}
        return {
            **content,
            "caption": str(meta.get("caption", "")),
            "motion_score": float(meta.get("motion_score", 0.0)),
            "key": key,
            "meta": meta,
        }

    def load(self, i: int, start: float, end: float, gen: Optional[torch.Generator]) -> dict:
        """{"video": (c, f, h, w) in [-1, 1]}: the frames of sample `i` in [start, end) picked at
        data.fps, resized and cropped. Subclasses read other representations of the same frames."""
        frames, times = read_video(self.index.read(i, "mp4"), start_s=start, end_s=end)
        picks = pick_frames_by_time(times, self.fps, self.num_frames, start)
        clip = torch.from_numpy(frames[picks])  # (f, h, w, 3) uint8
        clip = rearrange(clip, "f h w c -> f c h w")
        clip = resize_and_crop(clip, self.size, gen if self.random_crop else None)
        return {"video": rearrange(clip.float() / 127.5 - 1.0, "f c h w -> c f h w").contiguous()}


def collate(samples: List[dict]) -> dict:
    """Stack the decoded samples; report the ones that failed under `failed`."""
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
    return batch


# ----------------------------------------------------------------------------------------------
# Sampling: epochs, ranks, resume
# ----------------------------------------------------------------------------------------------


class ResumableBatchSampler(Sampler):
    """Endless batches of (epoch, index) for one rank, starting after `start_batch` batches.

    Each epoch is a permutation seeded by (seed, epoch); rank r takes items r, r + W, r + 2W...
    (the permutation is padded by wrapping so every rank gets the same count) and drops the
    last incomplete batch. Batch b of the run is therefore a pure function of (seed, rank, b).
    """

    def __init__(self, n: int, batch_size: int, *, rank: int, world_size: int, seed: int, shuffle: bool,
                 start_batch: int = 0):
        per_rank = -(-n // world_size)
        self.batches_per_epoch = per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"only {n} samples for {world_size} rank(s) at train.batch_size={batch_size}: "
                             f"not one full batch per rank; lower the batch size or add data")
        self.n, self.batch_size = n, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.start_batch = start_batch

    def epoch_order(self, epoch: int) -> List[int]:
        if self.shuffle:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch)).tolist()
        else:
            perm = list(range(self.n))
        total = -(-self.n // self.world_size) * self.world_size
        perm = (perm * (total // self.n + 1))[:total]
        return perm[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        b = self.start_batch
        while True:
            epoch, within = divmod(b, self.batches_per_epoch)
            order = self.epoch_order(epoch)
            for j in range(within, self.batches_per_epoch):
                yield [(epoch, i) for i in order[j * self.batch_size : (j + 1) * self.batch_size]]
                b += 1

    def __len__(self) -> int:  # endless; DataLoader only needs this for its own bookkeeping
        return 2**62


class TrainData:
    """The training batches of one rank, with a data position that checkpoints can restore."""

    def __init__(self, dataset: ClipDataset, batch_size: int, *, rank: int, world_size: int, seed: int,
                 shuffle: bool, num_workers: int, start_batch: int = 0):
        self.dataset = dataset
        self.batches_done = start_batch
        self.failed_total = 0
        sampler = ResumableBatchSampler(len(dataset), batch_size, rank=rank, world_size=world_size, seed=seed,
                                        shuffle=shuffle, start_batch=start_batch)
        self.batches_per_epoch = sampler.batches_per_epoch
        self.loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                                 persistent_workers=num_workers > 0, generator=torch.Generator(),
                                 prefetch_factor=2 if num_workers > 0 else None)
        self._it = iter(self.loader)

    def next(self) -> dict:
        """The next batch with at least one decodable sample (all-failed batches are skipped)."""
        while True:
            batch = next(self._it)
            self.batches_done += 1
            self.failed_total += len(batch["failed"])
            if batch["size"] > 0:
                return batch

    @property
    def epoch(self) -> float:
        return self.batches_done / self.batches_per_epoch

    def state(self) -> dict:
        return {"batches_done": self.batches_done, "failed_total": self.failed_total}


def eval_batches(dataset: ClipDataset, batch_size: int, max_batches: int) -> Iterator[dict]:
    """The first `max_batches` batches of a dataset in order, centre-cropped (deterministic)."""
    n = min(len(dataset), batch_size * max_batches)
    items = [(0, i) for i in range(n)]
    for j in range(0, n, batch_size):
        batch = collate([dataset[it] for it in items[j : j + batch_size]])
        if batch["size"] > 0:
            yield batch

