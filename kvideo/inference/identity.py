"""Identity at sampling: reference images given to a sampler, and the bank of named identities.

    bank = IdentityBank.load("bank.safetensors")                 # or IdentityBank.from_images({"Ada": "ada.png"})
    refs = bank.references_for(prompts, max_entries=2)          # each prompt's named entries, in caption order
    latents = sample_keyframes(bundle, prompts, first, 10.0, options, references=refs)

A `ReferenceSet` is what a sampler takes: images (b, r, 3, H, W) in [-1, 1], one name per entry,
and which entries are present. `encode_references` turns it into the conditioning's `References`
for one stage (its MoVQ latents, scaled; the name tags from its text encoder).

An `IdentityBank` holds named reference images, saved as one safetensors file (a tensor per name,
(3, H, W) in [-1, 1], with the format in its metadata). Entries come from reference images or
from a generated shot (its first frame, `add`), so a second shot can be conditioned on the
character of the first (`Pipeline.two_shots`). Images, not latents, are stored: every stage encodes
them with its own MoVQ.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch

from kvideo.data.images import read_image
from kvideo.data.shards import resize_and_crop
from kvideo.inference.conditioning import References

BANK_FORMAT = "kvideo.identity_bank"
BANK_VERSION = "1"


@dataclass
class ReferenceSet:
    """Reference images for a batch of prompts: `images` (b, r, 3, H, W) in [-1, 1]; `names`, b lists
    of r names ("" for an unnamed or absent entry); `present` (b, r) bool (None: every entry)."""

    images: torch.Tensor
    names: List[List[str]]
    present: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.images.dim() != 5 or self.images.shape[2] != 3:
            raise ValueError(f"ReferenceSet: images must be (b, r, 3, H, W); got {tuple(self.images.shape)}")
        b, r = self.images.shape[:2]
        if len(self.names) != b or any(len(row) != r for row in self.names):
            raise ValueError(f"ReferenceSet: names must be {b} lists of {r} names; got {[len(n) for n in self.names]}")
        if self.present is None:
            self.present = torch.ones(b, r, dtype=torch.bool)
        if self.present.shape != (b, r):
            raise ValueError(f"ReferenceSet: present must be ({b}, {r}); got {tuple(self.present.shape)}")

    @property
    def batch_size(self) -> int:
        return self.images.shape[0]


def encode_references(bundle, refs: ReferenceSet, names: bool = True) -> References:
    """`refs` for the stage of `bundle`: the images, fitted to the size its references were
    trained at (data.reference_size, else data.size), through its MoVQ encoder (latents scaled by
    its recipe.latent_scale) and, when its reference encoder takes name tags and `names`, the names'
    tags from its text encoder. A stage without a reference encoder is a ValueError."""
    denoiser = bundle.denoiser
    if denoiser.reference is None:
        raise ValueError(f"references were given, but the {bundle.stage} checkpoint '{bundle.path}' has no identity "
                         "attention (model.identity_attention) to take them")
    device = bundle.device
    b, r = refs.images.shape[:2]
    size = bundle.cfg.data.get("reference_size") or bundle.cfg.data.size  # the size it was trained on
    images = resize_and_crop(refs.images.flatten(0, 1).float(), tuple(int(v) for v in size), None).clamp(-1, 1)
    z = bundle.movq.encode(images.to(device)).float() * bundle.recipe.latent_scale
    tagged = names and denoiser.reference.name_proj is not None
    return References(z.reshape(b, r, *z.shape[1:]), refs.present.to(device),
                      denoiser.name_embeddings(refs.names) if tagged else None)


def read_reference(path: Union[str, Path]) -> torch.Tensor:
    """An image file -> (3, H, W) float in [-1, 1] (`kvideo.data.images.read_image`: a file that is
    not an image is a ValueError naming it)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"reference image '{path}' does not exist")
    rgb = torch.from_numpy(read_image(path)).permute(2, 0, 1)
    return rgb.float() / 127.5 - 1.0


def _whole_word(name: str) -> str:
    return rf"(?<!\w){re.escape(name)}(?!\w)"


def names_in(prompt: str, names: Sequence[str]) -> List[str]:
    """Those of `names` the prompt mentions as whole words, in the order the prompt names them."""
    found = [(m.start(), name) for name in names for m in [re.search(_whole_word(name), prompt)] if m]
    return [name for _, name in sorted(found)]


def without_names(prompt: str, names: Sequence[str], word: str) -> str:
    """`prompt` with every whole-word mention of each of `names` replaced by `word`."""
    for name in names:
        prompt = re.sub(_whole_word(name), word, prompt)
    return prompt


class IdentityBank:
    """Named reference images, (3, H, W) in [-1, 1] each, of one size (the first entry's)."""

    def __init__(self, entries: Optional[Mapping[str, torch.Tensor]] = None):
        self.entries: Dict[str, torch.Tensor] = {}
        for name, image in (entries or {}).items():
            self.add(name, image)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def names(self) -> List[str]:
        return list(self.entries)

    def add(self, name: str, image: torch.Tensor) -> None:
        """Enter (or replace) `name` with `image` (3, H, W) in [-1, 1], e.g. a generated shot's first
        frame; an image of another size than the bank's is resized to cover it and centre-cropped."""
        if not isinstance(name, str) or not name.strip() or not re.fullmatch(r"[\w\-. ]+", name):
            raise ValueError(f"identity bank: a name must be a non-blank word (letters, digits, _ - . space); got {name!r}")
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"identity bank entry '{name}': the image must be (3, H, W); got {tuple(image.shape)}")
        image = image.detach().float().cpu()
        others = [v.shape[1:] for k, v in self.entries.items() if k != name]
        if others and image.shape[1:] != others[0]:  # one size per bank: fitted to it
            image = resize_and_crop(image[None], tuple(others[0]), None)[0]
        self.entries[name] = image.clamp(-1, 1).contiguous()

    @classmethod
    def from_images(cls, images: Mapping[str, Union[str, Path]]) -> "IdentityBank":
        """A bank of `name -> image file` (each read with `read_reference`)."""
        return cls({name: read_reference(path) for name, path in images.items()})

    def save(self, path: Union[str, Path]) -> Path:
        """Write the bank as one safetensors file, atomically (`kvideo.weights.write_safetensors`)."""
        from kvideo.weights import write_safetensors

        if not self.entries:
            raise ValueError("identity bank: nothing to save (no entries)")
        return write_safetensors(dict(self.entries), path, {"format": BANK_FORMAT, "version": BANK_VERSION})

    @classmethod
    def load(cls, path: Union[str, Path]) -> "IdentityBank":
        """A bank saved by `save`; a file of another kind is a ValueError naming it."""
        from safetensors.torch import load_file

        from kvideo.weights import safetensors_metadata

        meta = safetensors_metadata(path, "identity bank")
        if meta.get("format") != BANK_FORMAT:
            raise ValueError(f"'{path}' is not an identity bank (its metadata format is {meta.get('format')!r})")
        return cls(load_file(str(path)))

    def named_in(self, prompt: str) -> List[str]:
        """The bank's names the prompt mentions (whole words), in the order the prompt names them."""
        return names_in(prompt, self.entries)

    def references_for(self, prompts: Sequence[str], max_entries: Optional[int] = None,
                       names: Optional[Sequence[Sequence[str]]] = None) -> ReferenceSet:
        """Each prompt's entries: the `names` given per prompt, or the bank's names the prompt
        mentions in caption order (`named_in`), at most `max_entries` (None: as many as the most
        any prompt has, at least 1), padded with absent entries. A name not in the bank is a
        ValueError naming it and the bank's names."""
        if not self.entries:
            raise ValueError("identity bank: no entries")
        rows = [list(n) for n in names] if names is not None else [self.named_in(p) for p in prompts]
        if len(rows) != len(prompts):
            raise ValueError(f"{len(rows)} name lists for {len(prompts)} prompts")
        for row in rows:
            for name in row:
                if name not in self.entries:
                    raise ValueError(f"identity bank has no entry '{name}'; it holds {', '.join(self.entries)}")
        r = max_entries if max_entries is not None else max(1, max(len(row) for row in rows))
        size = next(iter(self.entries.values())).shape
        images = torch.zeros(len(prompts), r, *size)
        present = torch.zeros(len(prompts), r, dtype=torch.bool)
        padded = []
        for i, row in enumerate(rows):
            row = row[:r]
            for j, name in enumerate(row):
                images[i, j], present[i, j] = self.entries[name], True
            padded.append(row + [""] * (r - len(row)))
        return ReferenceSet(images, padded, present)
