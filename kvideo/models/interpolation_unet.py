"""The interpolation UNet of Kandinsky Video 1.1: new frames between every pair of keyframes.

    x (b, in_channels, g, h, w): one "frame" per gap between neighbouring keyframes, each
        [left keyframe (c) | x_t of the k new frames (k c) | right keyframe (c)]
    t (b,), context (b, n, context_dim), context_mask (b, n), skip_frames (b,),
    temporal_mask (b,)  ->  (b, k c, g, h, w): the prediction for the k new frames of each gap

Every spatial layer is the Kandinsky 3 UNet's (`kvideo.models.unet`) on the gaps folded into the
batch. The temporal layers mix information across the sequence of gaps (not across the k
frames of one gap, which sit in the channels):

- a `TemporalConvBlend` after every Block of every spatial ResNet (its four convs, kernels
  1, 3, 3, 1): `h = (1 - a) h + a Conv3d_(3,1,1)(h)`, with the gate a and the conv starting at 0;
- a `TemporalAttentionBlock` after every self-attention, behind a gate starting at 0
  (`h = h + a (block(h) - h)`; the block itself is randomly initialised, or neither would learn).

Every gate is multiplied by `temporal_mask` (b,), 1 normally and 0 in the unconditional branch
of guidance, so the unconditional branch is the spatial model alone. `skip_frames` (which pass:
the spacing of the keyframes in frames) is embedded and added to the time embedding through a
learnable scale starting at 0. At initialisation the model is therefore the image UNet applied
gap by gap.

With the `kandinsky` size (20 input, 12 output channels) this is the released layout, 3.98B
parameters. `load_image_weights` (from `kvideo.models.video_unet`) loads a t2i UNet into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch
from einops import rearrange
from torch import nn

from kvideo.models.sizes import extend_config, sized_config
from kvideo.models.unet import TimestepEmbedding, UNet, UNetConfig, _init_channels, unet_config
from kvideo.models.video_unet import TemporalAttentionBlock, _temporal_attention_levels
from kvideo.nn.temporal import TemporalConvBlend

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass
class InterpolationUNetConfig(UNetConfig):
    """A UNetConfig plus the interpolation layers. The defaults are the released model."""

    in_channels: int = 20  # left keyframe (4) | x_t of the new frames (4 k) | right keyframe (4)
    out_channels: int = 12  # the k = 3 new frames
    temporal_attention: Optional[List[bool]] = None  # per level; None = where there is self-attention


# ----------------------------------------------------------------------------------------------
# Temporal layers, on (b, c, g, h, w)
# ----------------------------------------------------------------------------------------------


class GatedTemporalAttention(nn.Module):
    """h + a m (TemporalAttentionBlock(h) - h); the gate a starts at zero."""

    def __init__(self, channels: int, cond_dim: int, groups: int, head_dim: int, expansion_ratio: int) -> None:
        super().__init__()
        self.block = TemporalAttentionBlock(channels, cond_dim, groups, head_dim, expansion_ratio, zero_init=False)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = (self.gate * mask.to(x.dtype)).reshape(-1, 1, 1, 1, 1)
        return x + a * (self.block(x, emb) - x)


class SkipFramesEmbedding(nn.Module):
    """scale * MLP(sin(skip_frames)), the scale starting at 0: added to the time embedding."""

    def __init__(self, sinusoidal_dim: int, time_embed_dim: int) -> None:
        super().__init__()
        self.embed = TimestepEmbedding(sinusoidal_dim, time_embed_dim)
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, skip_frames: torch.Tensor) -> torch.Tensor:
        return self.scale * self.embed(skip_frames)


class LevelInterpolation(nn.Module):
    """The temporal layers of one level: per spatial ResNet (slot) one TemporalConvBlend per Block,
    and an optional gated temporal attention."""

    def __init__(self, block_channels: List[List[int]], attention_channels: Optional[int],
                 cfg: InterpolationUNetConfig) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.ModuleList([TemporalConvBlend(c) for c in slot]) for slot in block_channels])
        self.attention = (GatedTemporalAttention(attention_channels, cfg.time_embed_dim, cfg.groups, cfg.head_dim,
                                                 cfg.expansion_ratio) if attention_channels is not None else None)


class _BoundInterpolation:
    """LevelInterpolation bound to one forward: gap count, conditioning vector, temporal mask."""

    def __init__(self, layers: LevelInterpolation, num_gaps: int, emb: torch.Tensor, mask: torch.Tensor) -> None:
        self.layers, self.g, self.emb, self.mask = layers, num_gaps, emb, mask

    def _unfold(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "(b g) c h w -> b c g h w", g=self.g)

    @staticmethod
    def _fold(x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b c g h w -> (b g) c h w")

    def resnet(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        return x  # nothing around the spatial ResNets: the convs sit inside them

    def inner(self, slot: int):
        convs = self.layers.convs[slot]

        def after_block(i: int, h: torch.Tensor) -> torch.Tensor:
            return self._fold(convs[i](self._unfold(h), self.mask))

        return after_block

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        if self.layers.attention is None:
            return x
        return self._fold(self.layers.attention(self._unfold(x), self.emb, self.mask))


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def _block_widths(resnet) -> List[int]:
    return [block.conv.out_channels for block in resnet.blocks]


class InterpolationUNet(UNet):
    """The image UNet's layers (same names) plus `temporal_down`, `temporal_up`, `skip_embed`."""

    def __init__(self, cfg: InterpolationUNetConfig) -> None:
        super().__init__(cfg)
        init, e = _init_channels(cfg), cfg.time_embed_dim
        attn = _temporal_attention_levels(cfg)
        levels = len(cfg.dim_mult)
        self.skip_embed = SkipFramesEmbedding(init, e)
        self.temporal_down = nn.ModuleList([
            LevelInterpolation([_block_widths(r) for u in level.units for r in (u.in_resnet, u.out_resnet)],
                               level.self_attention.in_norm.norm.num_channels if attn[i] else None, cfg)
            for i, level in enumerate(self.down_samples)
        ])
        self.temporal_up = nn.ModuleList([
            LevelInterpolation([_block_widths(r) for u in level.units for r in (u.in_resnet, u.out_resnet)],
                               level.self_attention.in_norm.norm.num_channels if attn[levels - 1 - j] else None, cfg)
            for j, level in enumerate(self.up_samples)
        ])

    def temporal_modules(self) -> Dict[str, nn.Module]:
        return {"temporal_down": self.temporal_down, "temporal_up": self.temporal_up, "skip_embed": self.skip_embed}

    def temporal_parameters(self) -> Iterator[nn.Parameter]:
        for module in self.temporal_modules().values():
            yield from module.parameters()

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                context_mask: Optional[torch.Tensor] = None, *, skip_frames: Optional[torch.Tensor] = None,
                temporal_mask: Optional[torch.Tensor] = None, temporal: bool = True) -> torch.Tensor:
        """(b, in_channels, g, h, w) -> (b, out_channels, g, h, w). `temporal=False` runs the
        spatial layers alone (as a temporal mask of 0 does, without computing the temporal layers)."""
        if x.ndim != 5:
            raise ValueError(f"InterpolationUNet: x must be (b, c, gaps, h, w); got {tuple(x.shape)}")
        b, _, g = x.shape[:3]
        frames = rearrange(x, "b c g h w -> (b g) c h w")
        self._check_inputs(frames, t.repeat_interleave(g), context.repeat_interleave(g, dim=0),
                           None if context_mask is None else context_mask.repeat_interleave(g, dim=0))
        emb = self.embed(t, context, context_mask)  # (b, e)
        if skip_frames is not None:
            if skip_frames.shape != (b,):
                raise ValueError(f"InterpolationUNet: skip_frames must have shape ({b},); got {tuple(skip_frames.shape)}")
            emb = emb + self.skip_embed(skip_frames.to(emb.device))
        down = up = None
        if temporal:
            mask = torch.ones(b, device=x.device) if temporal_mask is None else temporal_mask.to(x.device)
            if mask.shape != (b,):
                raise ValueError(f"InterpolationUNet: temporal_mask must have shape ({b},); got {tuple(mask.shape)}")
            per_gap = emb[:, None, :].expand(b, g, emb.shape[1])  # (b, g, e): the attention norms' conditioning
            down = [_BoundInterpolation(layers, g, per_gap, mask) for layers in self.temporal_down]
            up = [_BoundInterpolation(layers, g, per_gap, mask) for layers in self.temporal_up]
        out = self.run_levels(
            frames, emb.repeat_interleave(g, dim=0), context.repeat_interleave(g, dim=0),
            None if context_mask is None else context_mask.repeat_interleave(g, dim=0), down, up,
        )
        return rearrange(out, "(b g) c h w -> b c g h w", b=b)


@torch.no_grad()
def spread_image_convs(model: InterpolationUNet, image_state: Dict[str, torch.Tensor], frames_per_gap: int) -> None:
    """Start the gap-stacked input and output convs from an image UNet's (`image_state`, its keys).

    The input conv's block for each of the k noisy frames gets the image input conv divided by
    k, the keyframe blocks start at zero: the spatial layers first see the image model's features
    of the mean of the k noisy frames. Each of the k output blocks is the image output conv: every
    new frame starts with the image model's prediction for that mean. A fresh random input conv
    instead feeds the loaded spatial layers features they have never seen; on ShapesWorld its
    samples stayed noisy after 30 minutes (docs/BENCHMARKS.md).
    """
    k = frames_per_gap
    w_in, b_in = image_state["in_layer.weight"], image_state["in_layer.bias"]
    w_out, b_out = image_state["out_layer.2.weight"], image_state["out_layer.2.bias"]
    c = w_in.shape[1]
    if model.in_layer.weight.shape[1] != (k + 2) * c or model.out_layer[2].weight.shape[0] != k * w_out.shape[0]:
        raise ValueError(f"image convs ({c} in, {w_out.shape[0]} out) do not spread over {k} frames per gap into "
                         f"{model.in_layer.weight.shape[1]} in, {model.out_layer[2].weight.shape[0]} out")
    model.in_layer.weight.zero_()
    for j in range(k):
        model.in_layer.weight[:, (j + 1) * c: (j + 2) * c].copy_(w_in / k)
    model.in_layer.bias.copy_(b_in)
    model.out_layer[2].weight.copy_(w_out.repeat(k, 1, 1, 1))
    model.out_layer[2].bias.copy_(b_out.repeat(k))


# ----------------------------------------------------------------------------------------------
# Named sizes
# ----------------------------------------------------------------------------------------------


def _interpolation_size(image_size: str, frames_per_gap: int = 3) -> InterpolationUNetConfig:
    base = unet_config(image_size)
    c = base.out_channels
    return extend_config(base, InterpolationUNetConfig, in_channels=c * (frames_per_gap + 2),
                         out_channels=c * frames_per_gap)


INTERPOLATION_UNET_SIZES: Dict[str, InterpolationUNetConfig] = {
    # The released Kandinsky Video 1.1 interpolation model: 3.98B parameters.
    "kandinsky": _interpolation_size("kandinsky"),
    # The ShapesWorld t2i UNet's spatial layout (its checkpoint loads into it).
    "shapes": _interpolation_size("shapes"),
}


def interpolation_unet_config(size: str, **overrides) -> InterpolationUNetConfig:
    return sized_config(INTERPOLATION_UNET_SIZES, size, **overrides)
