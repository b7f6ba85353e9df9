"""Precomputed autoencoder latents of a shard set: decode and encode each clip once, not every step.

The diffusion stages train in the latent space of a frozen MoVQ. Encoding on the fly repeats,
every epoch, the same two costs: decoding the mp4 and running the encoder. On the ShapesWorld
t2i recipe they were a third of a training step on this CPU (docs/BENCHMARKS.md). With
`data.latent_cache: DIR` the stage encodes every frame of every clip of `data.shards` once
(centre crop at `data.size`, the stage's `recipe.movq`) and training reads the latents:

    DIR/cache.json                        the MoVQ's weight fingerprint, the frame size, the format
    DIR/NNNNN-<shard>.safetensors         per source shard: KEY -> (f, c, h, w) float16 latents,
                                          KEY:t -> (f,) float64 frame times in s

Clip selection is unchanged: the same start time (seeded by sample, epoch and run seed) and
the same frames picked by timestamp at `data.fps` as `ClipDataset`, so a run reads the same
clips from the cache as from the videos; only random crops are off (the latents are of the
centre crop). The cache is unscaled: stages multiply by their `recipe.latent_scale`.

Building is resumable and exact: each shard's file is written under a temporary name and
renamed, so a killed build re-runs only the missing shards; a shard whose tar changed (size or
mtime) is re-encoded. Under torchrun the ranks split the shards. A cache made with other MoVQ
weights or another frame size is refused with an error naming both, never silently mixed.
Clips that fail to decode are skipped, reported in the file's metadata, and dropped from their
batch in training like any undecodable sample.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import numpy as np
import torch
import torch.nn as nn
from einops import rearrange
from safetensors import safe_open
from safetensors.torch import save_file

from kvideo.data.shards import BadSample, ClipDataset, ClipFormat, ShardIndex, resize_and_crop
from kvideo.data.video_io import pick_frames_by_time, read_video

log = logging.getLogger(__name__)

FORMAT = 1
TIMES = ":t"  # suffix of a clip's frame-times tensor


def fingerprint(module: nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, shapes, dtypes, values)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _shard_file(cache: Path, i: int, shard: Path) -> Path:
    return cache / f"{i:05d}-{shard.stem}.safetensors"


def _source_signature(shard: Path) -> Dict[str, str]:
    st = shard.stat()
    return {"source": str(shard.resolve()), "bytes": str(st.st_size), "mtime_ns": str(st.st_mtime_ns)}


def _is_current(path: Path, shard: Path) -> bool:
    if not path.exists():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # a truncated or foreign file: rebuild it
        return False
    sig = _source_signature(shard)
    return all(meta.get(k) == v for k, v in sig.items())


@torch.no_grad()
def _encode_shard(index: ShardIndex, si: int, encoder: nn.Module, size, out: Path, device: torch.device,
                  chunk: int, autocast) -> Dict[str, int]:
    tensors: Dict[str, torch.Tensor] = {}
    failed = []
    for i in range(len(index)):
        if index.members[i]["mp4"].shard != si:
            continue
        key = index.keys[i]
        try:
            frames, times = read_video(index.read(i, "mp4"))
            clip = rearrange(torch.from_numpy(frames), "f h w c -> f c h w")
            clip = resize_and_crop(clip, size, None).float() / 127.5 - 1.0
            zs = []
            for j in range(0, clip.shape[0], chunk):
                with autocast:
                    zs.append(encoder(clip[j : j + chunk].to(device)).float().cpu())
            tensors[key] = torch.cat(zs).to(torch.float16).contiguous()  # (f, c, h, w)
            tensors[key + TIMES] = torch.from_numpy(np.asarray(times, dtype=np.float64)).contiguous()
        except Exception as e:  # one broken clip never stops the build
            log.warning("latent cache: skipping '%s' in '%s': %s", key, index.shards[si], e)
            failed.append(key)
    meta = {**_source_signature(index.shards[si]), "failed": json.dumps(failed)}
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, out)
    return {"clips": len(tensors) // 2, "failed": len(failed)}


@dataclass(frozen=True)
class LatentCacheSpec:
    """What a latent cache holds: the latents of every clip of `shards` (data.shards), centre
    cropped at `size` (data.size, (h, w)), encoded by the MoVQ named `movq_source` (recipe.movq,
    recorded in cache.json next to the weights' fingerprint), stored in the directory `cache`
    (data.latent_cache). `cache` becomes a Path, `movq_source` a str, `size` a tuple of two ints;
    raises ValueError naming the field when one is empty or not positive.
    """

    cache: Path
    shards: str
    movq_source: str
    size: tuple[int, int]

    def __post_init__(self):
        for name, key in (("cache", "data.latent_cache"), ("shards", "data.shards"), ("movq_source", "recipe.movq")):
            if not getattr(self, name):  # None or ""
                raise ValueError(f"LatentCacheSpec.{name} ({key}) is empty")
        try:
            size = () if isinstance(self.size, str) else tuple(int(v) for v in self.size)
        except (TypeError, ValueError):
            size = ()
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"LatentCacheSpec.size (data.size) must be two positive ints (h, w), got {self.size!r}")
        object.__setattr__(self, "cache", Path(self.cache))
        object.__setattr__(self, "movq_source", str(self.movq_source))
        object.__setattr__(self, "size", size)


def build_latent_cache(spec: LatentCacheSpec, movq: nn.Module, *, device: torch.device | str = "cpu",
                       autocast: contextlib.AbstractContextManager | None = None, chunk: int = 64, rank: int = 0,
                       world_size: int = 1) -> Path:
    """Encode every frame of every clip of `spec.shards` with `movq` (the MoVQ `spec.movq_source`,
    frozen) into `spec.cache`.

    Shards whose file is already current are skipped; rank r of W (`rank`, `world_size`) encodes
    shards r, r+W, ..., `chunk` frames per encoder call on `device`. `autocast` is the precision
    context of the encoder (the training run's, so the cached latents are the ones training would
    have computed).
    Raises ValueError when `spec.cache` holds latents of other weights, another size or other
    shards. Returns the cache directory. Callers under torchrun must barrier before reading it.
    """
    cache = spec.cache
    index = ShardIndex(spec.shards)
    header = {"format": FORMAT, "movq": spec.movq_source, "movq_fingerprint": fingerprint(movq),
              "size": list(spec.size), "shards": [str(p.resolve()) for p in index.shards]}
    check_cache_header(cache, header)
    cache.mkdir(parents=True, exist_ok=True)
    if rank == 0 and not (cache / "cache.json").exists():
        tmp = cache / f"cache.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(header, indent=2))
        os.replace(tmp, cache / "cache.json")
    device = torch.device(device)
    movq = movq.to(device).eval()
    amp = autocast if autocast is not None else contextlib.nullcontext()
    for si, shard in enumerate(index.shards):
        if si % world_size != rank:
            continue
        out = _shard_file(cache, si, shard)
        if _is_current(out, shard):
            continue
        counts = _encode_shard(index, si, movq.encode, header["size"], out, device, chunk, amp)
        log.info("latent cache: %s: %d clips encoded, %d failed", out.name, counts["clips"], counts["failed"])
    return cache


def check_cache_header(cache: Path, want: dict) -> None:
    """Refuse a cache made with other MoVQ weights, another frame size or other shards."""
    path = Path(cache) / "cache.json"
    if not path.exists():
        return
    have = json.loads(path.read_text())
    fix = "point data.latent_cache elsewhere or delete it"
    if have.get("format") != FORMAT:
        raise ValueError(f"data.latent_cache '{cache}' has format {have.get('format')}, this kvideo writes {FORMAT}: "
                         f"delete it to rebuild")
    if have.get("movq_fingerprint") != want["movq_fingerprint"]:
        raise ValueError(f"data.latent_cache '{cache}' holds latents of the MoVQ '{have.get('movq')}' "
                         f"(weights {have.get('movq_fingerprint', '?')[:12]}), but recipe.movq '{want['movq']}' has "
                         f"weights {want['movq_fingerprint'][:12]}: {fix}")
    if have.get("size") != want["size"]:
        raise ValueError(f"data.latent_cache '{cache}' holds latents of {have.get('size')} frames, data.size is "
                         f"{want['size']}: {fix}")
    if have.get("shards") != want["shards"]:
        raise ValueError(f"data.latent_cache '{cache}' holds latents of {len(have.get('shards', []))} other shards "
                         f"(first: {have.get('shards', ['?'])[0]}), not of data.shards "
                         f"({len(want['shards'])} shards, first: {want['shards'][0]}): {fix}")


class LatentClipDataset(ClipDataset):
    """ClipDataset that reads precomputed latents instead of decoding and encoding the video.

    Items are {"latents": float (c, f, h, w) unscaled, "caption", "motion_score", "key", "meta"}
    (or {"failed": key, "reason"}), with the clip start and frames chosen exactly as ClipDataset
    chooses them (its `__getitem__`; only `load` differs).
    """

    def __init__(self, index: ShardIndex, cache: str | Path, clip: ClipFormat, **kwargs):
        super().__init__(index, clip, **kwargs)
        self.cache = Path(cache)
        if not (self.cache / "cache.json").exists():
            raise FileNotFoundError(f"data.latent_cache '{self.cache}' has no cache.json: the stage builds it on "
                                    f"start (train.py), or run tools/cache_latents.py")
        header = json.loads((self.cache / "cache.json").read_text())
        check_cache_header(self.cache, {**header, "size": list(self.clip.size),
                                        "shards": [str(p.resolve()) for p in index.shards]})
        self.files = [_shard_file(self.cache, si, shard) for si, shard in enumerate(index.shards)]
        missing = [str(f) for f in self.files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"data.latent_cache '{self.cache}' is incomplete: {len(missing)} of "
                                    f"{len(self.files)} shard files missing (first: {missing[0]})")
        self._open: Dict[int, object] = {}

    def _handle(self, si: int):
        """(open file, its tensor names) of shard `si`: one memory-mapped handle per worker process."""
        if si not in self._open:
            f = safe_open(str(self.files[si]), "pt")
            self._open[si] = (f, set(f.keys()))
        return self._open[si]

    def __getstate__(self):  # DataLoader workers open their own handles
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def load(self, i: int, start: float, end: float, gen) -> dict:
        f, keys = self._handle(self.index.members[i]["mp4"].shard)
        key = self.index.keys[i]
        if key not in keys:
            raise BadSample("not_cached", "clip not in the latent cache (it failed to decode when the cache was built)")
        times = f.get_tensor(key + TIMES).numpy()
        rows = np.nonzero((times >= start - 1e-6) & (times < end - 1e-6))[0]  # the window read_video decodes
        picks = rows[pick_frames_by_time(times[rows], self.clip.fps, self.clip.num_frames, start)]
        z = f.get_slice(key)[int(picks.min()) : int(picks.max()) + 1]
        z = z[torch.as_tensor(picks - picks.min())].float()  # (f, c, h, w)
        return {"latents": rearrange(z, "f c h w -> c f h w").contiguous()}
