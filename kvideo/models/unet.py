"""The Kandinsky 3.0 UNet: the text-to-image denoiser, and the backbone of every later stage.

    x (b, in_channels, h, w), t (b,), context (b, n, context_dim), context_mask (b, n)
      -> time_embed(t) + feature_pooling(context)        one conditioning vector per sample
      -> in_layer (3x3 conv to init_channels)
      -> down_samples: one DownLevel per entry of dim_mult, a skip saved after each but the last
      -> up_samples:   the mirror; the skip of a level is concatenated at the start of its twin
      -> out_layer (GroupNorm, SiLU, 3x3 conv) -> (b, out_channels, h, w)

Level i has model_channels * dim_mult[i] channels. A down level is

    [self-attention] -> num_blocks x (ResNet -> text cross-attention -> ResNet)

with the last ResNet halving the resolution (except on the lowest level); an up level is

    num_blocks x (ResNet -> text cross-attention -> ResNet) -> [self-attention]

with its first ResNet doubling the resolution (except on the lowest level). There is no separate
middle block: the lowest down and up levels play that part. Every norm of the network, but the
output one, is a ConditionalGroupNorm, `GroupNorm(affine=False) * (1 + scale) + shift`, with
scale and shift from a zero-initialised Linear of the conditioning vector, so every norm starts
as a plain GroupNorm. No positional embeddings anywhere.

The layout follows the released ai-forever/Kandinsky-3 UNet (3.0B parameters with the
`kandinsky` size); module names are ours. Differences from the release, all deliberate:
the pooling query is the mean of the *valid* context tokens (the release averages padding too:
`pool_query: all` computes that), integer timesteps are embedded in float32, and a context mask
without any valid token is an error (the release returns NaN).

Optionally (`identity_attention`, per level; not in the release) every unit of a level with text
cross-attention also has an identity attention right after it: a cross-attention to identity
tokens (a reference image's, `kvideo.models.identity`) behind a gate starting at zero, so the
model is unchanged at init and for samples without a reference. The tokens come by keyword,
`forward(..., identity=IdentityTokens(...))`; without them the identity attentions are skipped.

A video model extends this one without copying it: the levels are `self.down_samples[i]` /
`self.up_samples[i]`, each with its `units` (ResNet, cross-attention, [identity attention],
ResNet) and its `self_attention`, and `embed(t, context, mask)` gives the conditioning vector.
The building blocks (embeddings, attention, ResNet and attention blocks) are in
`kvideo.models.unet_blocks`, re-exported here.

Sections: config, levels, model, named sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from kvideo.models.identity import IdentityAttention, IdentityTokens
from kvideo.models.sizes import sized_config
from kvideo.models.unet_blocks import (  # noqa: F401 (re-exported: the blocks' older home)
    POOL_QUERIES, Attention, AttentionBlock, AttentionPooling, Block, ConditionalGroupNorm, ResNetBlock,
    TimestepEmbedding, sinusoidal_embedding,
)
from kvideo.nn.layers import GradCheckpointMixin, group_norm

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass
class UNetConfig:
    """Architecture of a Kandinsky 3 UNet. The defaults are the released 3.0B text-to-image model."""

    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # predicted channels out (noise / v / x0: the diffusion code decides)
    model_channels: int = 384  # level i has model_channels * dim_mult[i] channels
    init_channels: Optional[int] = 192  # in/out_layer and sinusoidal width; None = model_channels
    time_embed_dim: int = 1536  # the conditioning vector fed to every norm
    context_dim: int = 4096  # width of the text-encoder tokens
    groups: int = 32  # GroupNorm groups everywhere
    head_dim: int = 64  # attention heads = channels // head_dim
    expansion_ratio: int = 4  # attention feed-forward hidden width = expansion_ratio * channels
    compression_ratio: int = 2  # ResNet bottleneck width = max(in, out) // compression_ratio
    dim_mult: List[int] = field(default_factory=lambda: [1, 2, 4, 8])  # one entry per level
    num_blocks: List[int] = field(default_factory=lambda: [3, 3, 3, 3])  # (ResNet, attn, ResNet) units per level
    add_cross_attention: List[bool] = field(default_factory=lambda: [False, True, True, True])
    add_self_attention: List[bool] = field(default_factory=lambda: [False, True, True, True])
    # The query of the text pooling (AttentionPooling): "valid", the mean of the valid context
    # tokens (kvideo's default, kept), or "all", the mean over all n tokens, padding included (the
    # release's and diffusers' behaviour, for loading released weights). The attention itself
    # honours the mask either way.
    pool_query: str = "valid"
    # Per level (None: none): an identity attention after every text cross-attention of the level
    # (so only on levels with add_cross_attention), to the tokens of `forward(identity=...)`.
    identity_attention: Optional[List[bool]] = None
    identity_dim: Optional[int] = None  # the identity tokens' width; None = context_dim


def _init_channels(cfg: UNetConfig) -> int:
    return cfg.init_channels if cfg.init_channels is not None else cfg.model_channels


def _check_choice(cfg, name: str, allowed: Sequence) -> None:
    """Raise ValueError naming `cfg.<name>` when its value is not one of `allowed`."""
    if getattr(cfg, name) not in allowed:
        raise ValueError(f"{type(cfg).__name__}.{name} must be one of {', '.join(str(a) for a in allowed)}; "
                         f"got {getattr(cfg, name)!r}")


def _check_config(cfg: UNetConfig) -> None:
    """Raise ValueError naming the field when a UNetConfig cannot build a network."""
    _check_choice(cfg, "pool_query", POOL_QUERIES)
    levels = len(cfg.dim_mult)
    if levels < 1:
        raise ValueError("UNetConfig.dim_mult needs at least one level")
    for name in ("num_blocks", "add_cross_attention", "add_self_attention"):
        if len(getattr(cfg, name)) != levels:
            raise ValueError(
                f"UNetConfig.{name} needs one entry per level of dim_mult ({levels}); got {list(getattr(cfg, name))}"
            )
    if any(n < 1 for n in cfg.num_blocks):
        raise ValueError(f"UNetConfig.num_blocks: every level needs at least one block; got {list(cfg.num_blocks)}")
    init = _init_channels(cfg)
    if init % 2:
        raise ValueError(f"UNetConfig.init_channels must be even (sinusoidal embedding); got {init}")
    widths = [init] + [cfg.model_channels * m for m in cfg.dim_mult]  # level i maps widths[i] -> widths[i + 1]
    for width in widths:
        if width % cfg.groups:
            raise ValueError(f"UNetConfig: a width of {width} channels is not a multiple of groups = {cfg.groups}")
    for i in range(levels):
        # self-attention runs on widths[i], cross-attention on widths[i + 1] (and twice that going up)
        if cfg.add_self_attention[i] or cfg.add_cross_attention[i]:
            for width in (widths[i], widths[i + 1]):
                if width % cfg.head_dim:
                    raise ValueError(
                        f"UNetConfig: level {i} attends over {width} channels, "
                        f"not a multiple of head_dim = {cfg.head_dim}"
                    )
    if cfg.time_embed_dim % cfg.head_dim:
        raise ValueError(
            f"UNetConfig.time_embed_dim = {cfg.time_embed_dim} is not a multiple of head_dim = {cfg.head_dim}"
        )
    _identity_levels(cfg)


def _identity_levels(cfg: UNetConfig) -> List[bool]:
    """cfg.identity_attention, one flag per level (all False when None); ValueError naming the key
    when it cannot be built."""
    name = type(cfg).__name__
    if cfg.identity_dim is not None and cfg.identity_dim < 1:
        raise ValueError(f"{name}.identity_dim must be positive (or None: context_dim); got {cfg.identity_dim}")
    if cfg.identity_attention is None:
        return [False] * len(cfg.dim_mult)
    levels = [bool(v) for v in cfg.identity_attention]
    if len(levels) != len(cfg.dim_mult):
        raise ValueError(f"{name}.identity_attention needs one entry per level of dim_mult ({len(cfg.dim_mult)}); "
                         f"got {list(cfg.identity_attention)}")
    if any(i and not c for i, c in zip(levels, cfg.add_cross_attention)):
        raise ValueError(f"{name}.identity_attention: an identity attention follows the text cross-attention, "
                         f"so it needs add_cross_attention on the same levels; got {levels} with "
                         f"add_cross_attention {list(cfg.add_cross_attention)}")
    return levels


def _identity_dim(cfg: UNetConfig) -> int:
    return cfg.identity_dim if cfg.identity_dim is not None else cfg.context_dim


# ----------------------------------------------------------------------------------------------
# Levels
# ----------------------------------------------------------------------------------------------


def _attention(channels: int, cfg: UNetConfig, context_dim: Optional[int]) -> AttentionBlock:
    """Self-attention (context_dim None) or a cross-attention to `context_dim`-wide tokens."""
    return AttentionBlock(channels, cfg.time_embed_dim, context_dim, cfg.groups, cfg.head_dim, cfg.expansion_ratio)


def _cross_units(channels: int, cfg: UNetConfig, level: int) -> tuple:
    """(text cross-attention, identity attention) of a unit of `level` on `channels`, each or None."""
    if not cfg.add_cross_attention[level]:
        return None, None
    cross = _attention(channels, cfg, cfg.context_dim)
    identity = IdentityAttention(_attention(channels, cfg, _identity_dim(cfg))) if _identity_levels(cfg)[level] else None
    return cross, identity


class LevelUnit(nn.Module):
    """ResNet -> [text cross-attention -> [identity attention]] -> ResNet: the repeated unit of
    every level."""

    def __init__(self, in_resnet: ResNetBlock, cross_attention: Optional[AttentionBlock],
                 out_resnet: ResNetBlock, identity_attention: Optional[IdentityAttention] = None) -> None:
        super().__init__()
        self.in_resnet = in_resnet
        self.cross_attention = cross_attention
        self.out_resnet = out_resnet
        self.identity_attention = identity_attention  # after out_resnet: the older keys keep their order


class _Level(GradCheckpointMixin, nn.Module):
    """Shared forward of DownLevel / UpLevel: [self-attn first] -> units -> [self-attn last].

    `temporal` (video models only) interleaves temporal layers: an object with `resnet(slot, x)`,
    `inner(slot)`, `attention(x)` and two flags, `before_down` and `attention_first_up`, where
    slot 2i / 2i + 1 are the in / out ResNet of unit i. Going down `resnet` follows each spatial
    ResNet, going up it precedes it; `inner(slot)` is None or an `after_block` function run inside
    the spatial ResNet after each of its Blocks (with `before_down`, before the down conv of the
    Block that has one); `attention` follows the level's self-attention (going up with
    `attention_first_up`, it precedes it). All run through this level's `run_block`.

    `identity` (IdentityTokens, or None) feeds the units' identity attentions; None skips them.
    """

    self_attention_first: bool = True

    def _run_self_attention(self, x: torch.Tensor, emb: torch.Tensor, temporal) -> torch.Tensor:
        if self.self_attention is None:
            return x
        temporal_first = temporal is not None and not self.self_attention_first and temporal.attention_first_up
        if temporal_first:
            x = self.run_block(temporal.attention, x)
        x = self.run_block(self.self_attention, x, emb)
        if temporal is not None and not temporal_first:
            x = self.run_block(temporal.attention, x)
        return x

    def _run_resnet(self, resnet: ResNetBlock, x: torch.Tensor, emb: torch.Tensor, temporal, slot: int) -> torch.Tensor:
        down = self.self_attention_first  # DownLevel: temporal after the spatial ResNet; UpLevel: before
        if temporal is not None and not down:
            x = self.run_block(temporal.resnet, slot, x)
        inner, before_down = (None, False) if temporal is None else (temporal.inner(slot), temporal.before_down)
        x = self.run_block(resnet, x, emb, inner, before_down)
        if temporal is not None and down:
            x = self.run_block(temporal.resnet, slot, x)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                context_mask: Optional[torch.Tensor] = None, temporal=None, *,
                identity: Optional[IdentityTokens] = None) -> torch.Tensor:
        if self.self_attention_first:
            x = self._run_self_attention(x, emb, temporal)
        for i, unit in enumerate(self.units):
            x = self._run_resnet(unit.in_resnet, x, emb, temporal, 2 * i)
            if unit.cross_attention is not None:
                x = self.run_block(unit.cross_attention, x, emb, context, context_mask)
            if unit.identity_attention is not None and identity is not None:
                x = self.run_block(unit.identity_attention, x, emb, identity.tokens, identity.mask, identity.weight)
            x = self._run_resnet(unit.out_resnet, x, emb, temporal, 2 * i + 1)
        if not self.self_attention_first:
            x = self._run_self_attention(x, emb, temporal)
        return x


class DownLevel(_Level):
    """Down level `level` of `cfg`: [self-attn on in_channels] -> num_blocks x (ResNet -> cross-attn
    -> ResNet); the first unit widens in -> out, the last ResNet halves the resolution (but on the
    lowest level)."""

    self_attention_first = True

    def __init__(self, in_channels: int, out_channels: int, cfg: UNetConfig, level: int) -> None:
        super().__init__()
        e, g, num_blocks = cfg.time_embed_dim, cfg.groups, cfg.num_blocks[level]
        downsample = level != len(cfg.dim_mult) - 1
        self.self_attention = _attention(in_channels, cfg, None) if cfg.add_self_attention[level] else None
        units = []
        for i in range(num_blocks):
            c_in = in_channels if i == 0 else out_channels
            last = i == num_blocks - 1
            in_resnet = ResNetBlock(c_in, out_channels, e, g, cfg.compression_ratio)
            cross, identity = _cross_units(out_channels, cfg, level)
            out_resnet = ResNetBlock(out_channels, out_channels, e, g, cfg.compression_ratio,
                                     "down" if (last and downsample) else None)
            units.append(LevelUnit(in_resnet, cross, out_resnet, identity))
        self.units = nn.ModuleList(units)


class UpLevel(_Level):
    """The twin of down level `level` of `cfg`: num_blocks x (ResNet -> cross-attn -> ResNet) ->
    [self-attn on out_channels].

    The input has in_channels + skip_channels channels (the skip is concatenated by the UNet);
    the first ResNet keeps that width and doubles the resolution (but on the lowest level), the
    first unit narrows to in_channels and the last one to out_channels (the release's layout).
    """

    self_attention_first = False

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, cfg: UNetConfig, level: int) -> None:
        super().__init__()
        e, g, num_blocks = cfg.time_embed_dim, cfg.groups, cfg.num_blocks[level]
        upsample = level != len(cfg.dim_mult) - 1
        units = []
        for i in range(num_blocks):
            c = in_channels + skip_channels if i == 0 else in_channels
            c_out = out_channels if i == num_blocks - 1 else in_channels
            in_resnet = ResNetBlock(c, c, e, g, cfg.compression_ratio, "up" if (i == 0 and upsample) else None)
            cross, identity = _cross_units(c, cfg, level)
            units.append(LevelUnit(in_resnet, cross, ResNetBlock(c, c_out, e, g, cfg.compression_ratio), identity))
        self.units = nn.ModuleList(units)
        self.self_attention = _attention(out_channels, cfg, None) if cfg.add_self_attention[level] else None


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class UNet(GradCheckpointMixin, nn.Module):
    """Kandinsky 3 UNet: `forward(x, t, context, context_mask) -> (b, out_channels, h, w)`.

    x (b, in_channels, h, w) with h, w divisible by `downsample_factor`; t (b,) integer or float
    timesteps; context (b, n, context_dim) text tokens; context_mask (b, n) bool, True = valid
    token (None = all valid; every sample needs at least one valid token); identity (keyword, with
    `identity_attention` set) the identity tokens of each sample, IdentityTokens of identity_dim.
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        _check_config(cfg)
        self.cfg = cfg
        init = _init_channels(cfg)
        self.time_embed = TimestepEmbedding(init, cfg.time_embed_dim)
        self.feature_pooling = AttentionPooling(cfg.time_embed_dim, cfg.context_dim, cfg.head_dim, cfg.pool_query)
        self.in_layer = nn.Conv2d(cfg.in_channels, init, kernel_size=3, padding=1)

        widths = [init] + [cfg.model_channels * m for m in cfg.dim_mult]
        levels = len(cfg.dim_mult)
        self.down_samples = nn.ModuleList([DownLevel(widths[i], widths[i + 1], cfg, i) for i in range(levels)])
        # up_samples[j] mirrors down level i = levels - 1 - j; it takes the skip of down level i
        # (saved at the lowest resolution it reached) except for the lowest level, which has none.
        self.up_samples = nn.ModuleList([
            UpLevel(widths[i + 1], widths[i + 1] if i != levels - 1 else 0, widths[i], cfg, i)
            for i in reversed(range(levels))
        ])
        self.out_layer = nn.Sequential(
            group_norm(init, cfg.groups, eps=1e-5),  # plain affine GroupNorm, as released
            nn.SiLU(),
            nn.Conv2d(init, cfg.out_channels, kernel_size=3, padding=1),
        )

    @property
    def downsample_factor(self) -> int:
        """h and w must be divisible by this: 2 ** (levels - 1)."""
        return 2 ** (len(self.cfg.dim_mult) - 1)

    def identity_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters of the identity attentions (gates and blocks): none without
        `identity_attention`. A stage trains or freezes them as a group."""
        for module in self.modules():
            if isinstance(module, IdentityAttention):
                yield from module.parameters()

    def embed(self, t: torch.Tensor, context: torch.Tensor,
              context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The conditioning vector (b, time_embed_dim) given to every norm."""
        return self.feature_pooling(self.time_embed(t), context, context_mask)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                      context_mask: Optional[torch.Tensor], identity: Optional[IdentityTokens] = None) -> None:
        b, c, h, w = x.shape
        f = self.downsample_factor
        if c != self.cfg.in_channels or h % f or w % f:
            raise ValueError(
                f"UNet: x {tuple(x.shape)} needs {self.cfg.in_channels} channels and h, w divisible by {f}"
            )
        if t.shape != (b,):
            raise ValueError(f"UNet: t must have shape ({b},); got {tuple(t.shape)}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != self.cfg.context_dim:
            raise ValueError(f"UNet: context must be ({b}, n, {self.cfg.context_dim}); got {tuple(context.shape)}")
        if context_mask is not None:
            if context_mask.dtype != torch.bool or context_mask.shape != context.shape[:2]:
                raise ValueError(
                    f"UNet: context_mask must be bool {tuple(context.shape[:2])}; "
                    f"got {context_mask.dtype} {tuple(context_mask.shape)}"
                )
            if not bool(context_mask.any(dim=1).all()):
                raise ValueError("UNet: every sample needs at least one valid context token (context_mask all False)")
        if identity is not None:
            if not any(_identity_levels(self.cfg)):
                raise ValueError("UNet: identity tokens given to a UNet without identity attention "
                                 f"({type(self.cfg).__name__}.identity_attention is not set on any level)")
            identity.check(b, _identity_dim(self.cfg), "UNet")

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                context_mask: Optional[torch.Tensor] = None, *,
                identity: Optional[IdentityTokens] = None) -> torch.Tensor:
        self._check_inputs(x, t, context, context_mask, identity)
        emb = self.embed(t, context, context_mask)  # (b, time_embed_dim)
        return self.run_levels(x, emb, context, context_mask, identity=identity)

    def run_levels(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                   context_mask: Optional[torch.Tensor] = None, temporal_down: Optional[Sequence] = None,
                   temporal_up: Optional[Sequence] = None, *,
                   identity: Optional[IdentityTokens] = None) -> torch.Tensor:
        """in_layer -> levels -> out_layer on (b, in_channels, h, w) with conditioning `emb` (b, e).

        A video model passes one temporal hook per level (see `_Level`) in `temporal_down` and
        `temporal_up`, and its frames folded into the batch (and so its identity tokens repeated
        for them, as the context).
        """
        x = self.in_layer(x)  # (b, init_channels, h, w)
        skips = []
        for i, level in enumerate(self.down_samples):
            x = level(x, emb, context, context_mask, None if temporal_down is None else temporal_down[i],
                      identity=identity)
            if i != len(self.down_samples) - 1:
                skips.append(x)  # (b, c_i, h / 2^(i+1), w / 2^(i+1))
        for j, level in enumerate(self.up_samples):
            if j != 0:
                x = torch.cat([x, skips.pop()], dim=1)  # (b, 2 c_i, h', w'): one skip per level
            x = level(x, emb, context, context_mask, None if temporal_up is None else temporal_up[j],
                      identity=identity)
        return self.out_layer(x)  # (b, out_channels, h, w)


# ----------------------------------------------------------------------------------------------
# Named sizes
# ----------------------------------------------------------------------------------------------

UNET_SIZES: Dict[str, UNetConfig] = {
    # The released Kandinsky 3.0 text-to-image UNet: 384/768/1536/3072 channels, 3.0B parameters.
    "kandinsky": UNetConfig(),
    # A CPU-trainable model for 16x16 ShapesWorld latents: 64/128/128 channels, 8 norm groups.
    "shapes": UNetConfig(
        model_channels=64, init_channels=32, time_embed_dim=256, context_dim=128, groups=8, head_dim=32,
        dim_mult=[1, 2, 2], num_blocks=[1, 2, 2], add_cross_attention=[False, True, True],
        add_self_attention=[False, True, True],
    ),
}


def unet_config(size: str, **overrides) -> UNetConfig:
    """A fresh copy of the named size `size`, with fields replaced by `overrides`."""
    return sized_config(UNET_SIZES, size, **overrides)
