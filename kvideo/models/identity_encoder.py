"""Identity encoder: a small conv net that reads a ShapesWorld v2 character's four identity
attributes (shape, body colour, band colour, size class) from an image, and an embedding whose
cosine compares the identities of two images (frozen, inside an identity loss).

    images (b, 3, H, W) in [-1, 1], H, W >= 16
      -> stem: conv 3x3 stride 2                        (b, width, H / 2, W / 2)
      -> depth stages: conv 3x3 stride 2, conv 3x3      (b, c_i, H / 2^(i+1), W / 2^(i+1))   c_i = width * min(2^i, 4)
         (GroupNorm + SiLU after every conv)
      -> global average pool                            (b, c_depth)   any input size, translation-invariant
      -> linear, L2-normalised                          embed(images): (b, embed_dim), unit norm
      -> logit_scale * embedding -> a linear head each  forward(images): {attribute: logits (b, n_classes)}

The heads read the normalised embedding, not the features before it: everything a head uses to
tell one attribute value from another is then a direction of the embedding, so the cosine of two
embeddings (what the identity loss compares) is high only when the heads read the same identity
from both images. Heads on the unnormalised features could also use the feature's length, which
the cosine ignores. `logit_scale` (fixed) lets unit vectors make confident logits.

Size class is r as a fraction of the canvas, so the encoder reads it in pixels at the size it was
trained at, `IdentityEncoderConfig.image_size`: resize a square frame to that size first.
The stem downsamples at once (4x cheaper than a full-resolution stem on CPU); its 3x3 taps
overlap, so a 2 px band still reaches it.

The network reads no file: `kvideo.weights.load_identity_encoder` builds it from a saved one, and
tools/train_identity_encoder.py trains it. GroupNorm keeps no running statistics, so train and
eval modes compute the same function.

Sections: config, network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from kvideo.data.characters import IDENTITY, NO_BAND, SIZE_CLASSES
from kvideo.data.shapesworld import COLORS, SHAPES

MIN_SIZE = 16  # the smallest input side the encoder takes

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdentityEncoderConfig:
    """The encoder's sizes and its class vocabularies (one tuple per attribute of ``IDENTITY``,
    stored so that a saved encoder says what its logits mean). ``image_size``: the side the
    encoder was trained at (see the module docstring on size class)."""

    width: int = 16
    depth: int = 4
    embed_dim: int = 64
    groups: int = 8  # GroupNorm groups
    logit_scale: float = 10.0
    image_size: int = 64
    shape: Tuple[str, ...] = SHAPES
    body: Tuple[str, ...] = tuple(COLORS)
    band: Tuple[str, ...] = (*COLORS, NO_BAND)
    size_class: Tuple[str, ...] = tuple(SIZE_CLASSES)

    def __post_init__(self):
        for name in IDENTITY:
            classes = tuple(str(v) for v in getattr(self, name))  # JSON gives lists
            object.__setattr__(self, name, classes)
            if len(classes) < 2 or len(set(classes)) != len(classes):
                raise ValueError(f"IdentityEncoderConfig.{name}: at least 2 distinct classes, got {classes}")
        if self.width < 1 or self.depth < 1 or self.embed_dim < 1:
            raise ValueError(f"IdentityEncoderConfig: width, depth and embed_dim must be >= 1, got "
                             f"{self.width}, {self.depth}, {self.embed_dim}")
        bad = [c for c in self.channels() if c % self.groups]
        if bad:
            raise ValueError(f"IdentityEncoderConfig.groups: {self.groups} does not divide the channels {bad}")
        if self.image_size < MIN_SIZE:
            raise ValueError(f"IdentityEncoderConfig.image_size must be >= {MIN_SIZE}, got {self.image_size}")

    def channels(self) -> Tuple[int, ...]:
        """The stem's width, then each stage's."""
        return (self.width, *(self.width * min(2 ** i, 4) for i in range(1, self.depth + 1)))

    def classes(self) -> Dict[str, Tuple[str, ...]]:
        """Attribute -> its class names, in ``IDENTITY`` order (the logits' order)."""
        return {name: getattr(self, name) for name in IDENTITY}


# ----------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------


class ConvNormAct(nn.Sequential):
    """conv 3x3 (stride 1 or 2) -> GroupNorm -> SiLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int):
        super().__init__(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(groups, c_out), nn.SiLU())


class IdentityEncoder(nn.Module):
    """images (b, 3, H, W) in [-1, 1] -> ``embed``: unit vectors (b, embed_dim); ``forward``:
    {attribute: logits (b, n_classes)} over ``cfg.classes()``. Differentiable in the images."""

    def __init__(self, cfg: IdentityEncoderConfig):
        super().__init__()
        self.cfg = cfg
        channels = cfg.channels()
        layers = [ConvNormAct(3, channels[0], 2, cfg.groups)]  # stem
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [ConvNormAct(c_in, c_out, 2, cfg.groups), ConvNormAct(c_out, c_out, 1, cfg.groups)]
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(channels[-1], cfg.embed_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(cfg.embed_dim, len(classes))
                                    for name, classes in cfg.classes().items()})

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) in [-1, 1] -> (b, embed_dim), L2-normalised."""
        if images.ndim != 4 or images.shape[1] != 3 or min(images.shape[-2:]) < MIN_SIZE:
            raise ValueError(f"IdentityEncoder takes (b, 3, H, W) images with H, W >= {MIN_SIZE}, "
                             f"got {tuple(images.shape)}")
        pooled = self.features(images).mean(dim=(-2, -1))  # (b, c)
        return F.normalize(self.proj(pooled), dim=-1)  # (b, embed_dim)

    def logits(self, embedding: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The heads on unit embeddings (b, embed_dim): {attribute: (b, n_classes)}."""
        scaled = self.cfg.logit_scale * embedding
        return {name: head(scaled) for name, head in self.heads.items()}

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.logits(self.embed(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Dict[str, list]:
        """The class name each head reads from each image: {attribute: [b names]}."""
        classes = self.cfg.classes()
        return {name: [classes[name][i] for i in logits.argmax(-1).tolist()]
                for name, logits in self(images).items()}
