"""Resolution and duration buckets (`data.buckets`): training batches of several shapes in one run.

The release pretrained at 256, 512 and 1024 px; a run that mixes shapes draws, for every
micro-batch, one bucket (frame size, clip length, batch size) with probability proportional to its
weight. The draw is a pure function of (run seed, draw number), so every rank draws the same
bucket at the same step (their batches stack and their collectives match) and a resumed run draws
what the straight run would have. Each bucket reads the shards through its own dataset and its
own `ResumableBatchSampler`, whose position is checkpointed, so resume is exact per bucket too.

    data:
      buckets:
        - {size: [256, 256], frames: 16, batch_size: 8, weight: 3}
        - {size: [512, 512], frames: 8, batch_size: 2, weight: 1}
        - {size: [288, 512], frames: 8, batch_size: 2, weight: 1}   # aspect-ratio bucket

A bucket's size, frames and batch size replace data.size, data.num_frames and train.batch_size
for its batches; a latent cache is kept per frame size (data.latent_cache/HxW).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from kvideo.data.shards import SKIP_REASONS, TrainData, reshard_positions


@dataclass(frozen=True)
class BucketShape:
    """One bucket as the data pipeline reads it: the data section it stands for, its batch size, weight."""

    data: DictConfig  # data.size, data.num_frames (and data.latent_cache) of the bucket
    batch_size: int
    weight: float

    @property
    def name(self) -> str:
        h, w = self.data.size
        return f"{h}x{w}x{self.data.num_frames}"


def bucket_shapes(data_cfg: DictConfig, batch_size: int) -> List[BucketShape]:
    """The run's buckets: `data.buckets`, or the one shape of data.size, data.num_frames and
    `batch_size` (train.batch_size) when there are none."""
    if not data_cfg.buckets:
        return [BucketShape(data_cfg, int(batch_size), 1.0)]
    shapes = []
    for b in data_cfg.buckets:
        cache = latent_cache_dir(data_cfg.latent_cache, b.size) if data_cfg.latent_cache else None
        data = OmegaConf.merge(data_cfg, {"size": list(b.size), "num_frames": int(b.frames), "buckets": [],
                                          "latent_cache": cache})
        shapes.append(BucketShape(data, int(b.batch_size), float(b.weight)))
    names = [s.name for s in shapes]
    if len(set(names)) != len(names):
        raise ValueError(f"data.buckets: two buckets have the same size and frames ({', '.join(names)})")
    return shapes


def latent_cache_dir(root: str, size) -> str:
    """The latent cache of one frame size under data.latent_cache."""
    return f"{root}/{int(size[0])}x{int(size[1])}"


def draw_bucket(weights: List[float], seed: int, draw: int) -> int:
    """The bucket of micro-batch number `draw`: the same on every rank and on every resume."""
    if len(weights) == 1:
        return 0
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(draw))
    return int(torch.multinomial(torch.tensor(weights, dtype=torch.float64), 1, generator=g))


class BucketedTrainData:
    """The training batches of one rank over several buckets, with `TrainData`'s interface
    (`next`, `state`, `skipped`, `epoch`, `batches_per_epoch`)."""

    def __init__(self, buckets: List[TrainData], weights: List[float], seed: int, *, draws: int = 0):
        if len(buckets) != len(weights) or not buckets:
            raise ValueError("BucketedTrainData needs one weight per bucket")
        self.buckets, self.weights, self.seed = buckets, list(weights), int(seed)
        self.draws = draws
        # an epoch: as many batches as the buckets' epochs take, in the proportions they are drawn
        total = sum(weights)
        self.batches_per_epoch = max(1, round(sum(b.batches_per_epoch * w / total for b, w in zip(buckets, weights))))

    def next(self) -> dict:
        i = draw_bucket(self.weights, self.seed, self.draws)
        self.draws += 1
        return self.buckets[i].next()

    @property
    def skipped(self) -> Dict[str, int]:
        return {r: sum(b.skipped.get(r, 0) for b in self.buckets) for r in SKIP_REASONS}

    @property
    def epoch(self) -> float:
        return self.draws / self.batches_per_epoch

    def state(self) -> dict:
        return {"draws": self.draws, "buckets": [b.state() for b in self.buckets], "skipped": self.skipped}


def bucket_states(state: Optional[dict], n: int) -> List[dict]:
    """Each bucket's saved data position (empty dicts for a fresh run)."""
    if not state:
        return [{} for _ in range(n)]
    saved = state.get("buckets")
    if saved is None or len(saved) != n:
        raise ValueError(f"the checkpoint's data position has {len(saved or [])} bucket(s), this run has {n}: "
                         f"data.buckets changed")
    return saved


def reshard_data_state(states: List[dict], shapes: List[BucketShape], n: int, *, seed: int, shuffle: bool,
                       world_size: int) -> Optional[List[dict]]:
    """`reshard_positions` for a run with or without buckets: the new ranks' data positions that
    continue the old ranks' `states` exactly, or None when none does."""
    def move(positions: List[dict], shape: BucketShape) -> Optional[List[dict]]:
        return reshard_positions(positions, n, shape.batch_size, seed=seed, shuffle=shuffle, world_size=world_size)

    if "buckets" not in states[0]:
        return move(states, shapes[0])
    if len({st["draws"] for st in states}) != 1 or len(states[0]["buckets"]) != len(shapes):
        return None
    moved = [move([st["buckets"][i] for st in states], shape) for i, shape in enumerate(shapes)]
    if any(m is None for m in moved):
        return None
    return [{"draws": states[0]["draws"], "buckets": [m[r] for m in moved]} for r in range(world_size)]
