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

A video model extends this one without copying it: the levels are `self.down_samples[i]` /
`self.up_samples[i]`, each with its `units` (ResNet, cross-attention, ResNet) and its
`self_attention`, and `embed(t, context, mask)` gives the conditioning vector.

Sections: config, embeddings, blocks, model, named sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Optional, Sequence

import torch
from einops import rearrange
from torch import nn

from kvideo.nn.layers import GradCheckpointMixin, attention, group_norm
from kvideo.models.sizes import sized_config

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


POOL_QUERIES = ("valid", "all")


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


# ----------------------------------------------------------------------------------------------
# Embeddings and attention
# ----------------------------------------------------------------------------------------------


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(b,) timesteps -> (b, dim) float32 [sin | cos] features, frequencies 1 .. 1/10000."""
    half = dim // 2
    step = -math.log(10000.0) / max(half - 1, 1)
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * step)  # (half,)
    angles = rearrange(t.float(), "b -> b 1") * rearrange(freqs, "j -> 1 j")  # (b, half)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (b, dim)


class TimestepEmbedding(nn.Module):
    """sinusoidal(t) -> Linear -> SiLU -> Linear: (b,) -> (b, time_embed_dim)."""

    def __init__(self, sinusoidal_dim: int, time_embed_dim: int) -> None:
        super().__init__()
        self.sinusoidal_dim = sinusoidal_dim
        self.mlp = nn.Sequential(
            nn.Linear(sinusoidal_dim, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = sinusoidal_embedding(t, self.sinusoidal_dim).to(self.mlp[0].weight.dtype)  # (b, sinusoidal_dim)
        return self.mlp(emb)  # (b, time_embed_dim)


class Attention(nn.Module):
    """Multi-head attention of `x` (b, n, query_dim) over `context` (b, m, context_dim), bias-free
    projections to inner_dim = heads * head_dim and back out to inner_dim."""

    def __init__(self, query_dim: int, inner_dim: int, context_dim: int, head_dim: int = 64) -> None:
        super().__init__()
        if inner_dim % head_dim:
            raise ValueError(f"Attention: {inner_dim} channels are not a multiple of head_dim = {head_dim}")
        self.heads = inner_dim // head_dim
        self.to_query = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_key = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_value = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, inner_dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """mask: optional bool (b, m), True = a valid context token."""
        q = rearrange(self.to_query(x), "b n (h d) -> b h n d", h=self.heads)
        k = rearrange(self.to_key(context), "b m (h d) -> b h m d", h=self.heads)
        v = rearrange(self.to_value(context), "b m (h d) -> b h m d", h=self.heads)
        if mask is not None:
            mask = rearrange(mask, "b m -> b 1 1 m")  # broadcast over heads and queries
        out = attention(q, k, v, mask=mask)  # (b, heads, n, d)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))  # (b, n, inner_dim)


class AttentionPooling(nn.Module):
    """Adds the text to the time embedding: one query, the mean of the valid context tokens
    (`query="valid"`) or of all of them, padding included (`query="all"`, the release), attends
    over the (valid) context; the result (b, time_embed_dim) is added to the time embedding."""

    def __init__(self, time_embed_dim: int, context_dim: int, head_dim: int = 64, query: str = "valid") -> None:
        super().__init__()
        if query not in POOL_QUERIES:
            raise ValueError(f"AttentionPooling: query must be one of {', '.join(POOL_QUERIES)}; got {query!r}")
        self.query = query
        self.attention = Attention(context_dim, time_embed_dim, context_dim, head_dim)

    def forward(self, time_embed: torch.Tensor, context: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is None or self.query == "all":
            query = context.mean(dim=1, keepdim=True)  # (b, 1, context_dim)
        else:
            weights = rearrange(mask.to(context.dtype), "b m -> b m 1")
            count = weights.sum(dim=1, keepdim=True).clamp(min=1)  # (b, 1, 1) valid tokens
            query = (context * weights).sum(dim=1, keepdim=True) / count  # (b, 1, context_dim)
        pooled = self.attention(query, context, mask)  # (b, 1, time_embed_dim)
        return time_embed + rearrange(pooled, "b 1 c -> b c")


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


class ConditionalGroupNorm(nn.Module):
    """GroupNorm(affine=False)(x) * (1 + scale) + shift, (scale, shift) = Linear(SiLU(emb)).

    The Linear starts at zero, so the norm starts as a plain GroupNorm. Works on (b, c, ...) of
    any rank: the video model uses it on (b, c, f, h, w) too.
    """

    def __init__(self, channels: int, cond_dim: int, groups: int = 32) -> None:
        super().__init__()
        self.norm = group_norm(channels, groups, eps=1e-5, affine=False)
        self.context_mlp = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * channels))
        nn.init.zeros_(self.context_mlp[1].weight)
        nn.init.zeros_(self.context_mlp[1].bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """emb (b, cond_dim), or (b, f, cond_dim) per frame for x (b, c, f, h, w)."""
        if emb.ndim == 3:  # per-frame conditioning of a video: (b, f, 2c) -> (b, 2c, f, 1, 1)
            params = rearrange(self.context_mlp(emb), "b f c -> b c f")
        else:
            params = self.context_mlp(emb)  # (b, 2c)
        params = params.reshape(*params.shape, *([1] * (x.ndim - params.ndim)))  # broadcast over the rest
        scale, shift = params.chunk(2, dim=1)
        return self.norm(x) * (1 + scale) + shift


class Block(nn.Module):
    """ConditionalGroupNorm -> SiLU -> [ConvTranspose k2s2 up] -> conv -> [Conv k2s2 down]."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, kernel_size: int = 3,
                 groups: int = 32, resample: Optional[str] = None) -> None:
        super().__init__()
        if resample not in (None, "up", "down"):
            raise ValueError(f"Block: resample must be None, 'up' or 'down'; got {resample!r}")
        self.norm = ConditionalGroupNorm(in_channels, cond_dim, groups)
        self.activation = nn.SiLU()
        self.up = nn.ConvTranspose2d(in_channels, in_channels, kernel_size=2, stride=2) if resample == "up" else None
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.down = nn.Conv2d(out_channels, out_channels, kernel_size=2, stride=2) if resample == "down" else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, after_conv=None) -> torch.Tensor:
        """`after_conv(h) -> h` (video models): applied after `conv`, before any down conv."""
        x = self.activation(self.norm(x, emb))
        if self.up is not None:
            x = self.up(x)  # (b, c_in, 2h, 2w)
        x = self.conv(x)
        if after_conv is not None:
            x = after_conv(x)
        if self.down is not None:
            x = self.down(x)  # (b, c_out, h/2, w/2)
        return x


class ResNetBlock(nn.Module):
    """Bottleneck of four Blocks (kernels 1, 3, 3, 1; hidden max(in, out) // compression_ratio)
    plus a shortcut with the same resampling and a 1x1 conv when the width changes.

    As in the release, upsampling happens in the second Block and downsampling in the third, so
    both 3x3 convs of the bottleneck see the higher resolution only when going up.
    """

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, groups: int = 32,
                 compression_ratio: int = 2, resample: Optional[str] = None) -> None:
        super().__init__()
        hidden = max(in_channels, out_channels) // compression_ratio
        widths = [in_channels, hidden, hidden, hidden, out_channels]
        resamples = [None, "up" if resample == "up" else None, "down" if resample == "down" else None, None]
        self.blocks = nn.ModuleList([
            Block(widths[i], widths[i + 1], cond_dim, kernel, groups, resamples[i])
            for i, kernel in enumerate([1, 3, 3, 1])
        ])
        up, down, project = resample == "up", resample == "down", in_channels != out_channels
        self.shortcut_up = nn.ConvTranspose2d(in_channels, in_channels, kernel_size=2, stride=2) if up else None
        self.shortcut_proj = nn.Conv2d(in_channels, out_channels, kernel_size=1) if project else None
        self.shortcut_down = nn.Conv2d(out_channels, out_channels, kernel_size=2, stride=2) if down else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, after_block=None, before_down: bool = False) -> torch.Tensor:
        """`after_block(i, h) -> h` (video models): applied to the output of Block i of the
        bottleneck; with `before_down`, in the Block with a down conv it runs before that conv
        (after the Block's 3x3 conv) instead."""
        out = x
        for i, block in enumerate(self.blocks):
            inside = after_block is not None and before_down and block.down is not None  # between conv and down
            out = block(out, emb, partial(after_block, i) if inside else None)
            if after_block is not None and not inside:
                out = after_block(i, out)
        for layer in (self.shortcut_up, self.shortcut_proj, self.shortcut_down):
            if layer is not None:
                x = layer(x)
        return x + out


class AttentionBlock(nn.Module):
    """CGN -> attention -> residual; CGN -> 1x1-conv feed-forward (x expansion, SiLU, no bias) -> residual.

    Self-attention over the h*w positions when `context_dim` is None; otherwise cross-attention
    from the positions to the context tokens, honouring the context mask.
    """

    def __init__(self, channels: int, cond_dim: int, context_dim: Optional[int] = None, groups: int = 32,
                 head_dim: int = 64, expansion_ratio: int = 4) -> None:
        super().__init__()
        self.is_cross = context_dim is not None
        self.in_norm = ConditionalGroupNorm(channels, cond_dim, groups)
        self.attention = Attention(channels, channels, context_dim if context_dim is not None else channels, head_dim)
        self.out_norm = ConditionalGroupNorm(channels, cond_dim, groups)
        hidden = expansion_ratio * channels
        self.feed_forward = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1, bias=False),
            nn.SiLU(),
            nn.Conv2d(hidden, channels, kernel_size=1, bias=False),
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor] = None,
                context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        out = rearrange(self.in_norm(x, emb), "b c h w -> b (h w) c")  # tokens = positions
        if self.is_cross:
            out = self.attention(out, context, context_mask)  # (b, h*w, c)
        else:
            out = self.attention(out, out)
        x = x + rearrange(out, "b (h w) c -> b c h w", h=h, w=w)
        return x + self.feed_forward(self.out_norm(x, emb))


def _cross_attention(channels: int, cfg: UNetConfig) -> AttentionBlock:
    return AttentionBlock(channels, cfg.time_embed_dim, cfg.context_dim, cfg.groups, cfg.head_dim, cfg.expansion_ratio)


def _self_attention(channels: int, cfg: UNetConfig) -> AttentionBlock:
    return AttentionBlock(channels, cfg.time_embed_dim, None, cfg.groups, cfg.head_dim, cfg.expansion_ratio)


class LevelUnit(nn.Module):
    """ResNet -> [text cross-attention] -> ResNet: the repeated unit of every level."""

    def __init__(self, in_resnet: ResNetBlock, cross_attention: Optional[AttentionBlock],
                 out_resnet: ResNetBlock) -> None:
        super().__init__()
        self.in_resnet = in_resnet
        self.cross_attention = cross_attention
        self.out_resnet = out_resnet


class _Level(GradCheckpointMixin, nn.Module):
    """Shared forward of DownLevel / UpLevel: [self-attn first] -> units -> [self-attn last].

    `temporal` (video models only) interleaves temporal layers: an object with `resnet(slot, x)`,
    `inner(slot)`, `attention(x)` and two flags, `before_down` and `attention_first_up`, where
    slot 2i / 2i + 1 are the in / out ResNet of unit i. Going down `resnet` follows each spatial
    ResNet, going up it precedes it; `inner(slot)` is None or an `after_block` function run inside
    the spatial ResNet after each of its Blocks (with `before_down`, before the down conv of the
    Block that has one); `attention` follows the level's self-attention (going up with
    `attention_first_up`, it precedes it). All run through this level's `run_block`.
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
                context_mask: Optional[torch.Tensor] = None, temporal=None) -> torch.Tensor:
        if self.self_attention_first:
            x = self._run_self_attention(x, emb, temporal)
        for i, unit in enumerate(self.units):
            x = self._run_resnet(unit.in_resnet, x, emb, temporal, 2 * i)
            if unit.cross_attention is not None:
                x = self.run_block(unit.cross_attention, x, emb, context, context_mask)
            x = self._run_resnet(unit.out_resnet, x, emb, temporal, 2 * i + 1)
        if not self.self_attention_first:
            x = self._run_self_attention(x, emb, temporal)
        return x


class DownLevel(_Level):
    """[self-attn on in_channels] -> num_blocks x (ResNet -> cross-attn -> ResNet); the first unit
    widens in -> out, the last ResNet halves the resolution when `downsample`."""

    self_attention_first = True

    def __init__(self, in_channels: int, out_channels: int, cfg: UNetConfig, num_blocks: int,
                 cross_attention: bool, self_attention: bool, downsample: bool) -> None:
        super().__init__()
        e, g = cfg.time_embed_dim, cfg.groups
        self.self_attention = _self_attention(in_channels, cfg) if self_attention else None
        units = []
        for i in range(num_blocks):
            c_in = in_channels if i == 0 else out_channels
            last = i == num_blocks - 1
            units.append(LevelUnit(
                ResNetBlock(c_in, out_channels, e, g, cfg.compression_ratio),
                _cross_attention(out_channels, cfg) if cross_attention else None,
                ResNetBlock(out_channels, out_channels, e, g, cfg.compression_ratio,
                            "down" if (last and downsample) else None),
            ))
        self.units = nn.ModuleList(units)


class UpLevel(_Level):
    """num_blocks x (ResNet -> cross-attn -> ResNet) -> [self-attn on out_channels].

    The input has in_channels + skip_channels channels (the skip is concatenated by the UNet);
    the first ResNet keeps that width and doubles the resolution when `upsample`, the first unit
    narrows to in_channels and the last one to out_channels (the release's layout).
    """

    self_attention_first = False

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, cfg: UNetConfig, num_blocks: int,
                 cross_attention: bool, self_attention: bool, upsample: bool) -> None:
        super().__init__()
        e, g = cfg.time_embed_dim, cfg.groups
        units = []
        for i in range(num_blocks):
            c = in_channels + skip_channels if i == 0 else in_channels
            c_out = out_channels if i == num_blocks - 1 else in_channels
            units.append(LevelUnit(
                ResNetBlock(c, c, e, g, cfg.compression_ratio, "up" if (i == 0 and upsample) else None),
                _cross_attention(c, cfg) if cross_attention else None,
                ResNetBlock(c, c_out, e, g, cfg.compression_ratio),
            ))
        self.units = nn.ModuleList(units)
        self.self_attention = _self_attention(out_channels, cfg) if self_attention else None


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class UNet(GradCheckpointMixin, nn.Module):
    """Kandinsky 3 UNet: `forward(x, t, context, context_mask) -> (b, out_channels, h, w)`.

    x (b, in_channels, h, w) with h, w divisible by `downsample_factor`; t (b,) integer or float
    timesteps; context (b, n, context_dim) text tokens; context_mask (b, n) bool, True = valid
    token (None = all valid; every sample needs at least one valid token).
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
        self.down_samples = nn.ModuleList([
            DownLevel(widths[i], widths[i + 1], cfg, cfg.num_blocks[i], cfg.add_cross_attention[i],
                      cfg.add_self_attention[i], downsample=i != levels - 1)
            for i in range(levels)
        ])
        # up_samples[j] mirrors down level i = levels - 1 - j; it takes the skip of down level i
        # (saved at the lowest resolution it reached) except for the lowest level, which has none.
        self.up_samples = nn.ModuleList([
            UpLevel(widths[i + 1], widths[i + 1] if i != levels - 1 else 0, widths[i], cfg, cfg.num_blocks[i],
                    cfg.add_cross_attention[i], cfg.add_self_attention[i], upsample=i != levels - 1)
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

    def embed(self, t: torch.Tensor, context: torch.Tensor,
              context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The conditioning vector (b, time_embed_dim) given to every norm."""
        return self.feature_pooling(self.time_embed(t), context, context_mask)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                      context_mask: Optional[torch.Tensor]) -> None:
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

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_inputs(x, t, context, context_mask)
        emb = self.embed(t, context, context_mask)  # (b, time_embed_dim)
        return self.run_levels(x, emb, context, context_mask)

    def run_levels(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                   context_mask: Optional[torch.Tensor] = None, temporal_down: Optional[Sequence] = None,
                   temporal_up: Optional[Sequence] = None) -> torch.Tensor:
        """in_layer -> levels -> out_layer on (b, in_channels, h, w) with conditioning `emb` (b, e).

        A video model passes one temporal hook per level (see `_Level`) in `temporal_down` and
        `temporal_up`, and its frames folded into the batch.
        """
        x = self.in_layer(x)  # (b, init_channels, h, w)
        skips = []
        for i, level in enumerate(self.down_samples):
            x = level(x, emb, context, context_mask, None if temporal_down is None else temporal_down[i])
            if i != len(self.down_samples) - 1:
                skips.append(x)  # (b, c_i, h / 2^(i+1), w / 2^(i+1))
        for j, level in enumerate(self.up_samples):
            if j != 0:
                x = torch.cat([x, skips.pop()], dim=1)  # (b, 2 c_i, h', w'): one skip per level
            x = level(x, emb, context, context_mask, None if temporal_up is None else temporal_up[j])
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
