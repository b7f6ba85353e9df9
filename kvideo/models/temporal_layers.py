"""The keyframe UNet's temporal layers, on (b, c, f, h, w) with per-frame conditioning (b, f, e).

Two placements (Kandinsky Video 1.0 compared both and kept the first) and three kinds:

- `separate` (the release): temporal blocks between the spatial blocks. Kind `conv`: a
  `TemporalResNetBlock` beside every spatial ResNet; `attention`: a `TemporalAttentionBlock` there
  instead; `both` (the release): the temporal ResNets, plus a `TemporalAttentionBlock` after the
  self-attention of every level that has one.
- `inside`: temporal layers inside every spatial ResNet, after its second 3x3 conv, on the
  bottleneck's hidden channels: `conv` a `TemporalConvLayer`, `attention` a
  `TemporalAttentionBlock`, `both` the conv then the attention.

Every layer is residual with a zero-initialised output, so the identity at init, and every one
honours `motion_free` (b,) bool: for those samples no information crosses frames (GenTron's
motion-free mask): a temporal convolution's residual is off, a temporal attention is masked to the
identity (each frame attends only to itself: its output is its own value) and its group norms
take each frame's own statistics (over the clip they would carry statistics across frames), a
first-frame attention is off. The per-frame parts (values, feed-forwards) still run. Image mode
(`VideoUNet.forward(temporal=False)`) bypasses every temporal layer instead.

The conditional group norms of the temporal ResNets, convs and attentions normalise the whole
clip (b, c, f, h, w) by default; with `frame_norm` (the config's `temporal_norm: frame`, the
release's computation) they take each frame's own statistics, for every sample.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from einops import rearrange
from torch import nn

from kvideo.models.unet_blocks import Attention, ConditionalGroupNorm
from kvideo.nn.layers import zero_module

PLACEMENTS = ("separate", "inside")
KINDS = ("conv", "attention", "both")
NORMS = ("clip", "frame")  # the temporal norms' statistics: over the clip, or over each frame (the release)
INSIDE_AFTER_BLOCK = 2  # the spatial ResNet's second 3x3 conv: hidden channels, after any resampling


def _keep(motion_free: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """(b,) bool -> (b, 1, 1, 1, 1) in x's dtype, 0 where motion-free; None when nothing is."""
    return None if motion_free is None else (~motion_free).to(x.dtype).reshape(-1, 1, 1, 1, 1)


def _residual(x: torch.Tensor, out: torch.Tensor, motion_free: Optional[torch.Tensor]) -> torch.Tensor:
    keep = _keep(motion_free, x)
    return x + out if keep is None else x + out * keep


def _frame_norm(norm: ConditionalGroupNorm, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """norm(x, emb) with each frame's own statistics: x (b, c, f, h, w), emb (b, f, e)."""
    b = x.shape[0]
    out = norm(rearrange(x, "b c f h w -> (b f) c h w"), rearrange(emb, "b f e -> (b f) e"))  # ((b f), c, h, w)
    return rearrange(out, "(b f) c h w -> b c f h w", b=b)


def _norm(norm: ConditionalGroupNorm, x: torch.Tensor, emb: torch.Tensor,
          motion_free: Optional[torch.Tensor], per_frame: bool = False) -> torch.Tensor:
    """norm(x, emb) over the clip (b, c, f, h, w); for motion-free samples, or every sample when
    `per_frame`, over each frame alone."""
    if per_frame:
        return _frame_norm(norm, x, emb)
    out = norm(x, emb)
    if motion_free is None:
        return out
    return torch.where(motion_free.reshape(x.shape[0], 1, 1, 1, 1), _frame_norm(norm, x, emb), out)


def _head_dim(channels: int, head_dim: int) -> int:
    """head_dim when it divides `channels`, else one head (the hidden widths of `inside` layers)."""
    return head_dim if channels % head_dim == 0 else channels


class TemporalBlock(nn.Module):
    """ConditionalGroupNorm (conditioned per frame; statistics over the clip, or each frame's with
    `frame_norm`) -> SiLU -> Conv3d (k, 1, 1) over frames."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, kernel_size: int, groups: int,
                 frame_norm: bool = False) -> None:
        super().__init__()
        self.frame_norm = frame_norm
        self.norm = ConditionalGroupNorm(in_channels, cond_dim, groups)
        self.activation = nn.SiLU()
        self.conv = nn.Conv3d(in_channels, out_channels, (kernel_size, 1, 1), padding=(kernel_size // 2, 0, 0))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.conv(self.activation(_norm(self.norm, x, emb, None, self.frame_norm)))


class TemporalResNetBlock(nn.Module):
    """x + bottleneck(x): four TemporalBlocks, kernels 1, 3, 3, 1, hidden channels // compression.
    The last conv starts at zero, so the block starts as the identity."""

    def __init__(self, channels: int, cond_dim: int, groups: int = 32, compression_ratio: int = 2,
                 frame_norm: bool = False) -> None:
        super().__init__()
        hidden = channels // compression_ratio
        widths = [channels, hidden, hidden, hidden, channels]
        self.blocks = nn.ModuleList([
            TemporalBlock(widths[i], widths[i + 1], cond_dim, kernel, groups, frame_norm)
            for i, kernel in enumerate([1, 3, 3, 1])
        ])
        zero_module(self.blocks[-1].conv)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, motion_free: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = x
        for block in self.blocks:
            out = block(out, emb)
        return _residual(x, out, motion_free)


class TemporalConvLayer(nn.Module):
    """x + Conv3d (3, 1, 1)(SiLU(CGN(x))), the conv zero-initialised: the `inside` placement's
    temporal convolution (one layer, as Kandinsky Video 1.0's layers inside the spatial blocks)."""

    def __init__(self, channels: int, cond_dim: int, groups: int = 32, frame_norm: bool = False) -> None:
        super().__init__()
        self.block = TemporalBlock(channels, channels, cond_dim, 3, groups, frame_norm)
        zero_module(self.block.conv)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, motion_free: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _residual(x, self.block(x, emb), motion_free)


class TemporalAttentionBlock(nn.Module):
    """Attention over the frames of each pixel, then a feed-forward; both residual, both ending
    in a zero-initialised projection (identity at init) unless `zero_init=False` (for a block
    behind a zero-initialised gate). No positional embedding: frame order reaches the block
    through the per-frame norms (the frame-index embedding) and neighbouring temporal convs.

    The two branches, A(N1(x)) (`attention_branch`) and F(N2(x)) (`feed_forward_branch`), are
    combined either residually, x + A(N1(x)) then + F(N2(.)), or, given `gates` (a1, a2), by the
    release interpolation model's convex blends of the same branches (see `forward`)."""

    def __init__(self, channels: int, cond_dim: int, groups: int = 32, head_dim: int = 64,
                 expansion_ratio: int = 4, zero_init: bool = True, frame_norm: bool = False) -> None:
        super().__init__()
        self.frame_norm = frame_norm  # norms over each frame's statistics (the release), not the clip's
        self.in_norm = ConditionalGroupNorm(channels, cond_dim, groups)
        self.attention = Attention(channels, channels, channels, head_dim)
        self.out_norm = ConditionalGroupNorm(channels, cond_dim, groups)
        hidden = expansion_ratio * channels
        self.feed_forward = nn.Sequential(
            nn.Linear(channels, hidden, bias=False), nn.SiLU(), nn.Linear(hidden, channels, bias=False),
        )
        if zero_init:  # identity at init; a block behind a zero gate must not be (neither would learn)
            zero_module(self.attention.to_out)
            zero_module(self.feed_forward[2])

    def attention_branch(self, x: torch.Tensor, emb: torch.Tensor,
                         motion_free: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A(N1(x)), no residual: attention over the frames of each pixel of in_norm(x), to_out included."""
        b, c, f, h, w = x.shape
        normed = _norm(self.in_norm, x, emb, motion_free, self.frame_norm)
        tokens = rearrange(normed, "b c f h w -> (b h w) f c")  # a sequence per pixel
        out = self.attention(tokens, tokens)
        if motion_free is not None:  # attention masked to the identity: each frame's own value
            own = self.attention.to_out(self.attention.to_value(tokens))
            out = torch.where(motion_free.repeat_interleave(h * w).reshape(-1, 1, 1), own, out)
        return rearrange(out, "(b h w) f c -> b c f h w", b=b, h=h, w=w)

    def feed_forward_branch(self, x: torch.Tensor, emb: torch.Tensor,
                            motion_free: Optional[torch.Tensor] = None) -> torch.Tensor:
        """F(N2(x)), no residual: the per-position feed-forward of out_norm(x)."""
        normed = _norm(self.out_norm, x, emb, motion_free, self.frame_norm)
        out = self.feed_forward(rearrange(normed, "b c f h w -> b f h w c"))
        return rearrange(out, "b f h w c -> b c f h w")

    def forward(self, x: torch.Tensor, emb: torch.Tensor, motion_free: Optional[torch.Tensor] = None,
                gates: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Residual: y = x + A(N1(x)), out = y + F(N2(y)). With `gates` (a1, a2), each broadcastable
        to x (the release's interpolation attention): y = (1 - a1) x + a1 A(N1(x)),
        out = (1 - a2) y + a2 F(N2(y)). Both run through this forward, so FSDP gathers the weights."""
        if gates is None:
            x = x + self.attention_branch(x, emb, motion_free)
            return x + self.feed_forward_branch(x, emb, motion_free)
        a1, a2 = gates
        y = (1 - a1) * x + a1 * self.attention_branch(x, emb, motion_free)
        return (1 - a2) * y + a2 * self.feed_forward_branch(y, emb, motion_free)


class FirstFrameAttentionBlock(nn.Module):
    """x + attention of every frame's positions over all of frame 0's positions (its keys and
    values), one sequence per clip: (b, c, f, h, w) -> same. Each frame is normalised on its own
    (as the spatial layers see it), conditioned on its temporal embedding, so a frame's output
    depends on itself and frame 0 only; the output projection starts at zero (identity at init).
    No positional embedding: a frame finds where the object was in frame 0 by its features."""

    def __init__(self, channels: int, cond_dim: int, groups: int = 32, head_dim: int = 64) -> None:
        super().__init__()
        self.norm = ConditionalGroupNorm(channels, cond_dim, groups)
        self.attention = Attention(channels, channels, channels, head_dim)
        zero_module(self.attention.to_out)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, motion_free: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, c, f, h, w = x.shape
        normed = _frame_norm(self.norm, x, emb)
        queries = rearrange(normed, "b c f h w -> b (f h w) c")
        first = rearrange(normed[:, :, 0], "b c h w -> b (h w) c")
        out = self.attention(queries, first)
        return _residual(x, rearrange(out, "b (f h w) c -> b c f h w", f=f, h=h), motion_free)


class InsideTemporal(nn.Module):
    """The `inside` placement's layers of one spatial ResNet: a TemporalConvLayer and / or a
    TemporalAttentionBlock on its hidden channels."""

    def __init__(self, channels: int, kind: str, cond_dim: int, groups: int, head_dim: int, expansion_ratio: int,
                 frame_norm: bool = False) -> None:
        super().__init__()
        self.conv = TemporalConvLayer(channels, cond_dim, groups, frame_norm) if kind in ("conv", "both") else None
        self.attention = (TemporalAttentionBlock(channels, cond_dim, groups, _head_dim(channels, head_dim),
                                                 expansion_ratio, frame_norm=frame_norm)
                          if kind in ("attention", "both") else None)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, motion_free: Optional[torch.Tensor] = None) -> torch.Tensor:
        for layer in (self.conv, self.attention):
            if layer is not None:
                x = layer(x, emb, motion_free)
        return x


class LevelTemporal(nn.Module):
    """The temporal layers of one UNet level. Slot 2i and 2i + 1 are the in and out spatial ResNet
    of unit i. `separate`: a block per slot (`resnets`; a TemporalResNetBlock for kinds conv and
    both, a TemporalAttentionBlock for attention), a TemporalAttentionBlock after the level's
    self-attention (`attention`, kind both, where `attention_channels` is given), and an optional
    FirstFrameAttentionBlock after the block of slot `first_frame_slot`. `inside`: an
    InsideTemporal per slot (`inner`) on `inner_channels[slot]`. cfg.temporal_norm chooses the
    norms' statistics; cfg.up_temporal_attention_first is read by an up level (`_Level`)."""

    def __init__(self, resnet_channels: List[int], attention_channels: Optional[int], cfg,
                 first_frame_slot: Optional[int] = None, inner_channels: Optional[List[int]] = None) -> None:
        super().__init__()
        e, g, kind = cfg.time_embed_dim, cfg.groups, cfg.temporal_kind
        per_frame = cfg.temporal_norm == "frame"
        self.attention_first_up = cfg.up_temporal_attention_first
        self.resnets = self.attention = self.first_frame = self.inner = None
        if cfg.temporal_placement == "separate":
            self.resnets = nn.ModuleList([
                TemporalAttentionBlock(c, e, g, _head_dim(c, cfg.head_dim), cfg.expansion_ratio, frame_norm=per_frame)
                if kind == "attention" else TemporalResNetBlock(c, e, g, cfg.compression_ratio, per_frame)
                for c in resnet_channels])
            if attention_channels is not None and kind == "both":
                self.attention = TemporalAttentionBlock(attention_channels, e, g, cfg.head_dim, cfg.expansion_ratio,
                                                        frame_norm=per_frame)
        else:
            self.inner = nn.ModuleList([InsideTemporal(c, kind, e, g, cfg.head_dim, cfg.expansion_ratio, per_frame)
                                        for c in inner_channels])
        self.first_frame_slot = first_frame_slot
        if first_frame_slot is not None:
            self.first_frame = FirstFrameAttentionBlock(resnet_channels[first_frame_slot], e, g, cfg.head_dim)


class BoundTemporal:
    """A LevelTemporal bound to one forward pass: the frame count, the per-frame embedding and the
    motion-free samples (b,) (None: none). The spatial levels work on frames folded into the batch,
    ((b f), c, h, w); the hooks (`kvideo.models.unet._Level`) unfold them to (b, c, f, h, w) for
    the temporal layer and fold them back. Flags the level reads: `attention_first_up` (going up,
    the temporal attention runs before the self-attention: the release) and `before_down` (False:
    the `inside` layers follow whole Blocks)."""

    before_down = False

    def __init__(self, layers: LevelTemporal, num_frames: int, emb: torch.Tensor,
                 motion_free: Optional[torch.Tensor] = None) -> None:
        self.layers, self.f, self.emb, self.motion_free = layers, num_frames, emb, motion_free
        self.attention_first_up = layers.attention_first_up

    def _apply(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        video = rearrange(x, "(b f) c h w -> b c f h w", f=self.f)
        return rearrange(block(video, self.emb, self.motion_free), "b c f h w -> (b f) c h w")

    def resnet(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        if self.layers.resnets is not None:
            x = self._apply(self.layers.resnets[slot], x)
        if slot == self.layers.first_frame_slot:
            x = self._apply(self.layers.first_frame, x)
        return x

    def inner(self, slot: int):
        if self.layers.inner is None:
            return None
        layer = self.layers.inner[slot]
        return lambda i, h: self._apply(layer, h) if i == INSIDE_AFTER_BLOCK else h

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.layers.attention is None else self._apply(self.layers.attention, x)
