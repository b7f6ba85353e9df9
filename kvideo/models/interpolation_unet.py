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

The release computes four things differently; each is an option whose default keeps kvideo's
computation: the temporal attention's norms take each gap's statistics (`temporal_norm: frame`),
the temporal conv of a Block with a down conv runs before that conv
(`temporal_conv_before_down`), `skip_frames` is looked up in a table
(`skip_embedding: table`), and the temporal attention is two gated convex blends of
non-residual branches, `y = (1 - a1) h + a1 A(N1(h))`, `out = (1 - a2) y + a2 F(N2(y))`
(`attention_gates: 2`).

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
from kvideo.models.temporal_layers import NORMS
from kvideo.models.unet import TimestepEmbedding, UNet, UNetConfig, _check_choice, _init_channels, unet_config
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
    # The statistics of the temporal attention's conditional group norms: "clip", over all gaps
    # (kvideo's default, kept), or "frame", over each gap alone (the release's computation).
    temporal_norm: str = "clip"
    # In the Block of a spatial ResNet that has a k2-s2 down conv, the temporal conv after the
    # Block's 3x3 conv and before its down conv (the release) rather than after the whole Block
    # (kvideo's default, kept).
    temporal_conv_before_down: bool = False
    # How `skip_frames` is embedded, always behind the scale `skip_embed.scale` starting at 0:
    # "sinusoid", MLP(sin(s)) (kvideo's default, kept), or "table", a learnt row per value of s,
    # `nn.Embedding(skip_table_size, time_embed_dim)` (the release: 20 rows).
    skip_embedding: str = "sinusoid"
    skip_table_size: int = 20
    # The gates of the temporal attention (each starting at 0, times the temporal mask m): 1, one
    # gate on the residual block, h + a m (block(h) - h) (kvideo's default, kept); 2, the
    # release's two convex blends of the block's non-residual branches, a1 = `gate` on the
    # attention, a2 = `gate_ff` on the feed-forward (TemporalAttentionBlock.forward).
    attention_gates: int = 1


SKIP_EMBEDDINGS = ("sinusoid", "table")
ATTENTION_GATES = (1, 2)


def _check_interpolation(cfg: InterpolationUNetConfig) -> None:
    """Raise ValueError naming the field when the interpolation options cannot build a network."""
    for name, allowed in (("temporal_norm", NORMS), ("skip_embedding", SKIP_EMBEDDINGS),
                          ("attention_gates", ATTENTION_GATES)):
        _check_choice(cfg, name, allowed)
    if cfg.skip_table_size < 1:
        raise ValueError(f"{type(cfg).__name__}.skip_table_size needs at least one row; got {cfg.skip_table_size}")
    if cfg.identity_attention is not None and any(cfg.identity_attention):
        raise ValueError(f"{type(cfg).__name__}.identity_attention: the interpolation UNet takes no identity tokens "
                         f"(its forward has no `identity`); got {list(cfg.identity_attention)}")


# ----------------------------------------------------------------------------------------------
# Temporal layers, on (b, c, g, h, w)
# ----------------------------------------------------------------------------------------------


class GatedTemporalAttention(nn.Module):
    """A TemporalAttentionBlock behind gates starting at zero, each times the temporal mask m (b,):

    - `gates=1`: h + a m (block(h) - h), a = `gate`;
    - `gates=2` (the release): the block's non-residual branches blended, y = (1 - a1 m) h +
      a1 m A(N1(h)), out = (1 - a2 m) y + a2 m F(N2(y)), a1 = `gate`, a2 = `gate_ff`.
    """

    def __init__(self, channels: int, cond_dim: int, groups: int, head_dim: int, expansion_ratio: int,
                 gates: int = 1, frame_norm: bool = False) -> None:
        super().__init__()
        if gates not in ATTENTION_GATES:
            raise ValueError(f"GatedTemporalAttention: gates must be 1 or 2; got {gates!r}")
        self.block = TemporalAttentionBlock(channels, cond_dim, groups, head_dim, expansion_ratio, zero_init=False,
                                            frame_norm=frame_norm)
        self.gate = nn.Parameter(torch.zeros(()))
        self.gate_ff = nn.Parameter(torch.zeros(())) if gates == 2 else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.gate_ff is None:
            a = (self.gate * mask.to(x.dtype)).reshape(-1, 1, 1, 1, 1)
            return x + a * (self.block(x, emb) - x)
        m = mask.to(x.dtype).reshape(-1, 1, 1, 1, 1)
        return self.block(x, emb, gates=(self.gate * m, self.gate_ff * m))


class SkipFramesEmbedding(nn.Module):
    """scale * embed(skip_frames), the scale starting at 0: added to the time embedding. The
    embedding is MLP(sin(s)) (`kind="sinusoid"`, `embed`) or row s of a learnt table
    (`kind="table"`, `table`, the release: s must be an integer in [0, table_size))."""

    def __init__(self, sinusoidal_dim: int, time_embed_dim: int, kind: str = "sinusoid", table_size: int = 20) -> None:
        super().__init__()
        if kind not in SKIP_EMBEDDINGS:
            raise ValueError(f"SkipFramesEmbedding: kind must be one of {', '.join(SKIP_EMBEDDINGS)}; got {kind!r}")
        self.embed = TimestepEmbedding(sinusoidal_dim, time_embed_dim) if kind == "sinusoid" else None
        self.table = nn.Embedding(table_size, time_embed_dim) if kind == "table" else None
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, skip_frames: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            return self.scale * self.embed(skip_frames)
        rows = self.table.num_embeddings
        if skip_frames.is_floating_point() and not bool((skip_frames == skip_frames.round()).all()):
            raise ValueError(f"InterpolationUNet: skip_frames must be whole numbers for the skip_embedding table; "
                             f"got {skip_frames.tolist()}")
        if bool(((skip_frames < 0) | (skip_frames >= rows)).any()):
            raise ValueError(f"InterpolationUNet: skip_frames {skip_frames.tolist()} outside the skip_embedding "
                             f"table's rows 0 .. {rows - 1} (skip_table_size = {rows})")
        return self.scale * self.table(skip_frames.long())  # (b, time_embed_dim)


class LevelInterpolation(nn.Module):
    """The temporal layers of one level: per spatial ResNet (slot) one TemporalConvBlend per Block,
    and an optional gated temporal attention."""

    def __init__(self, block_channels: List[List[int]], attention_channels: Optional[int],
                 cfg: InterpolationUNetConfig) -> None:
        super().__init__()
        self.conv_before_down = cfg.temporal_conv_before_down
        self.convs = nn.ModuleList([nn.ModuleList([TemporalConvBlend(c) for c in slot]) for slot in block_channels])
        self.attention = (GatedTemporalAttention(attention_channels, cfg.time_embed_dim, cfg.groups, cfg.head_dim,
                                                 cfg.expansion_ratio, cfg.attention_gates, cfg.temporal_norm == "frame")
                          if attention_channels is not None else None)


class _BoundInterpolation:
    """LevelInterpolation bound to one forward: gap count, conditioning vector, temporal mask. The
    level (`kvideo.models.unet._Level`) reads `before_down` (the temporal conv of a down-sampling
    Block before its down conv) and `attention_first_up` (always False here)."""

    attention_first_up = False

    def __init__(self, layers: LevelInterpolation, num_gaps: int, emb: torch.Tensor, mask: torch.Tensor) -> None:
        self.layers, self.g, self.emb, self.mask = layers, num_gaps, emb, mask
        self.before_down = layers.conv_before_down

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
        _check_interpolation(cfg)
        init, e = _init_channels(cfg), cfg.time_embed_dim
        attn = _temporal_attention_levels(cfg)
        levels = len(cfg.dim_mult)
        self.skip_embed = SkipFramesEmbedding(init, e, cfg.skip_embedding, cfg.skip_table_size)
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
