"""The dataset of a `data` config section: frames from the shards or, with `data.latent_cache`,
the cached MoVQ latents of the same clips; with the reference images of each clip when the stage
reads the field "references".

Imports run one way: this module -> latent_cache, references -> shards.
"""

from __future__ import annotations

from typing import Sequence

from kvideo.data.latent_cache import LatentClipDataset
from kvideo.data.references import FIELD as REFERENCES, ReferenceReader
from kvideo.data.shards import ClipDataset, ClipFormat, ShardIndex


def build_dataset(data_cfg, seed: int, *, train: bool, fields: Sequence[str] = ()) -> ClipDataset:
    """A ClipDataset from the `data` config section: `data.shards` for training, else `data.val_shards`.
    Training reads `data.latent_cache` (a LatentClipDataset) when it is set; validation never does.
    `fields`: the metadata fields the stage reads, which a good sample must have; with "references",
    each sample carries its reference images (data.references, data.max_references,
    data.reference_size)."""
    key = "data.shards" if train else "data.val_shards"
    spec = data_cfg.shards if train else data_cfg.val_shards
    extras = ReferenceReader.from_config(data_cfg).read if REFERENCES in fields else None
    kwargs = dict(seed=seed, train=train, fields=fields, max_sample_mb=data_cfg.get("max_sample_mb"), extras=extras)
    clip = ClipFormat.from_config(data_cfg)
    if train and data_cfg.get("latent_cache"):
        return LatentClipDataset(ShardIndex(spec, key=key), data_cfg.latent_cache, clip, **kwargs)
    return ClipDataset(ShardIndex(spec, key=key), clip, **kwargs)
