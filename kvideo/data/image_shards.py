"""Image shards for joint image-video training: tar shards of KEY.png | KEY.jpg (.jpeg, .webp) + KEY.json
with a caption, as webdataset writes them.

    images = ImageShards("data/images", size=(64, 64), seed=0)
    frames, captions = images.draw(step, n, per_step=8)  # (n, 3, H, W) in [-1, 1], n captions

A step's images are positions `(step * world + rank) * per_step + k` of a sequence that runs
through a seeded permutation of the samples, a new one each epoch: they depend on the step alone,
so a resumed run draws exactly the images it would have drawn, with no loader state to save, and
ranks draw disjoint images. Each image is resized to cover `size` and randomly cropped (seeded by
its position). A sample whose JSON or caption is bad, or whose image does not decode, is skipped
for the next position and counted in `skipped` by reason (the keys of
`kvideo.data.shards.SKIP_REASONS`); a shard set with no image sample is an error naming it.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import List, Sequence, Tuple

import torch

from kvideo.data.images import read_image
from kvideo.data.shards import BadSample, ShardIndex, parse_metadata, resize_and_crop

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


class ImageShards:
    """The image samples of a set of tar shards, drawn by step (see the module docstring)."""

    def __init__(self, spec: str, size: Sequence[int], seed: int = 0, key: str = "recipe.images.shards") -> None:
        self.index = ShardIndex(spec, required=("json",), key=key)
        self.rows = [i for i, exts in enumerate(self.index.members) if any(e in exts for e in IMAGE_EXTS)]
        if not self.rows:
            raise RuntimeError(f"{key}: the shards in '{spec}' hold no image sample (KEY.png|jpg|jpeg|webp + KEY.json)")
        self.size = (int(size[0]), int(size[1]))
        self.seed = seed
        self.skipped: Counter = Counter()
        self._orders: dict = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _row(self, position: int) -> int:
        epoch, i = divmod(position, len(self.rows))
        if epoch not in self._orders:
            self._orders = {epoch: torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + epoch)).tolist()}  # one epoch's order kept
        return self.rows[self._orders[epoch][i]]

    def load(self, position: int) -> Tuple[torch.Tensor, str]:
        """(3, H, W) in [-1, 1] and the caption of the sample at `position`; BadSample when it is bad."""
        row = self._row(position)
        _, caption, _ = parse_metadata(self.index.read(row, "json"), ("caption",))
        ext = next(e for e in IMAGE_EXTS if e in self.index.members[row])
        try:
            rgb = read_image(self.index.read(row, ext))
        except ValueError as e:
            raise BadSample("undecodable", f"{self.index.keys[row]}.{ext}: {e}") from None
        image = torch.from_numpy(rgb).permute(2, 0, 1)[None]  # (1, 3, h, w) uint8
        image = resize_and_crop(image, self.size, torch.Generator().manual_seed(self.seed * 7919 + position))
        return image[0].float() / 127.5 - 1, caption

    def draw(self, step: int, n: int, per_step: int, rank: int = 0, world: int = 1) -> Tuple[torch.Tensor, List[str]]:
        """`n` (<= per_step) images and captions for training step `step` on `rank` of `world`."""
        if n > per_step:
            raise ValueError(f"ImageShards.draw: {n} images asked of a step that draws at most {per_step}")
        position = (step * world + rank) * per_step
        frames, captions = [], []
        tries = 0
        while len(frames) < n:
            try:
                image, caption = self.load(position)
                frames.append(image)
                captions.append(caption)
            except BadSample as e:
                self.skipped[e.reason] += 1
                log.warning("skipping image sample '%s' (%s): %s", self.index.keys[self._row(position)], e.reason, e)
                tries += 1
                if tries >= len(self.rows):
                    raise RuntimeError(f"recipe.images.shards: every image sample of '{self.index.shards[0].parent}' "
                                       "is bad (see the warnings)") from None
            position += 1
        return torch.stack(frames) if frames else torch.zeros(0, 3, *self.size), captions
