"""Reference images per clip, for identity (reference) conditioning: the pictures of the
characters a clip shows, read beside its frames when the stage reads the field "references".

Which characters: `reference_names(meta)`, in the order the metadata lists them (ShapesWorld v2's
`character` or `characters`, the first named one in the top lane; any other data can list
`reference_names`). Which picture of each, for the first `data.max_references` names:

    the sample's own member KEY.ref.png (.jpg, .jpeg)   the first name only: the character on its
                                                        own background, different in every clip
    <data.references>/NAME.png (.jpg, .jpeg)            every name, e.g. a v2 split's references/

A name with neither is absent, not an error. Slot j of a sample is its j-th name, so a slot keeps
its lane; each picture is read as RGB, resized to cover `data.reference_size` (None: data.size),
centre cropped (never at random: the clip's random streams are untouched) and scaled to [-1, 1].
A sample gains

    references          float (R, 3, H, W), zeros in absent slots      R = data.max_references
    reference_present   bool (R,)
    reference_names     R strings, "" in absent slots

and `shards.collate` stacks them to (b, R, 3, H, W), (b, R) and b lists. A picture that does not
decode makes its sample a bad sample (reason "reference", naming the member or file); a
`data.references` directory that does not exist stops the dataset's construction.

Imports run one way: this module -> shards (a ClipDataset holds `ReferenceReader.read` as its `extras`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from kvideo.data.images import read_image
from kvideo.data.shards import BadSample, ShardIndex, resize_and_crop

FIELD = "references"  # the field a stage lists in `reads_fields` to get reference images
IMAGE_EXTS = ("png", "jpg", "jpeg")
MEMBER = "ref"  # a sample's own reference: the tar member KEY.ref.<ext>


def reference_names(meta: dict) -> List[str]:
    """The names of a clip's characters, in order: meta["character"]["name"], each of
    meta["characters"], or meta["reference_names"]; [] when the metadata names none. A name that
    is not a non-empty string is BadSample("metadata")."""
    if "character" in meta:
        people = [meta["character"]]
    elif "characters" in meta:
        people = meta["characters"]
    else:
        listed = meta.get("reference_names", [])
        people = [{"name": n} for n in listed] if isinstance(listed, list) else None
    if not isinstance(people, list) or not all(isinstance(p, dict) for p in people):
        raise BadSample("metadata", "metadata 'character', 'characters' or 'reference_names' is malformed: expected "
                                    "an object with a name, a list of them, or a list of names")
    names = [p.get("name") for p in people]
    if not all(isinstance(n, str) and n.strip() for n in names):
        raise BadSample("metadata", f"metadata names characters {names!r}: expected non-empty strings")
    return names


def _to_tensor(rgb, size: Tuple[int, int]) -> torch.Tensor:
    """(h, w, 3) uint8 -> float (3, H, W) in [-1, 1], resized to cover `size` and centre-cropped."""
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None]  # (1, 3, h, w) uint8
    return resize_and_crop(image, size, None)[0].float() / 127.5 - 1.0


class ReferenceReader:
    """The reference images of a sample (see the module docstring): up to `count` per clip at
    `size` (height, width), from the sample's own `ref.png` and the directory `directory`
    (NAME.png; None: own references only). Raises FileNotFoundError naming `data.references`
    when the directory does not exist."""

    def __init__(self, directory: Optional[str], count: int, size: Sequence[int]):
        if count < 1:
            raise ValueError(f"data.max_references must be >= 1, got {count}")
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"data.reference_size must be [height, width], got {list(size)}")
        self.count, self.size = int(count), (int(size[0]), int(size[1]))
        self.files: Dict[str, Path] = {}  # NAME -> its picture in `directory`
        if directory is not None:
            root = Path(directory)
            if not root.is_dir():
                raise FileNotFoundError(f"data.references: '{directory}' is not a directory (of NAME.png reference "
                                        f"images, e.g. a ShapesWorld v2 split's references/)")
            for ext in reversed(IMAGE_EXTS):  # NAME.png wins over NAME.jpg
                self.files.update({p.name[: -len(ext) - 1]: p for p in sorted(root.glob(f"*.{ext}"))})
        self._decoded: Dict[str, torch.Tensor] = {}  # the directory's pictures, decoded once per process

    @classmethod
    def from_config(cls, data_cfg) -> "ReferenceReader":
        """The reader of the `data` config section: data.references, data.max_references and
        data.reference_size (None: data.size)."""
        size = data_cfg.reference_size if data_cfg.reference_size is not None else data_cfg.size
        return cls(data_cfg.references, int(data_cfg.max_references), tuple(size))

    def _own(self, index: ShardIndex, i: int, max_bytes: Optional[int]) -> Optional[torch.Tensor]:
        """The sample's own reference member, or None when it has none."""
        ext = next((f"{MEMBER}.{e}" for e in IMAGE_EXTS if f"{MEMBER}.{e}" in index.members[i]), None)
        if ext is None:
            return None
        raw = index.read(i, ext, max_bytes)  # BadSample("oversized") over data.max_sample_mb
        try:
            return _to_tensor(read_image(raw), self.size)
        except ValueError as e:
            raise BadSample("reference", f"reference {index.keys[i]}.{ext} does not decode: {e}") from None

    def _from_directory(self, name: str) -> Optional[torch.Tensor]:
        """NAME's picture in data.references, or None when there is none."""
        if name not in self.files:
            return None
        if name not in self._decoded:
            try:
                self._decoded[name] = _to_tensor(read_image(self.files[name]), self.size)
            except ValueError as e:
                raise BadSample("reference", f"data.references: {e}") from None
        return self._decoded[name]

    def read(self, index: ShardIndex, i: int, meta: dict, max_bytes: Optional[int] = None) -> dict:
        """{"references": (R, 3, H, W), "reference_present": (R,) bool, "reference_names": R
        strings} of sample `i` of `index`, whose metadata is `meta`; BadSample when a picture
        does not decode."""
        images = torch.zeros(self.count, 3, *self.size)  # (R, 3, H, W)
        present = torch.zeros(self.count, dtype=torch.bool)
        names = [""] * self.count
        for j, name in enumerate(reference_names(meta)[: self.count]):
            image = self._own(index, i, max_bytes) if j == 0 else None
            image = image if image is not None else self._from_directory(name)
            if image is not None:
                images[j], present[j], names[j] = image, True, name
        return {"references": images, "reference_present": present, "reference_names": names}
