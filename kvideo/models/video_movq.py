"""The MoVQ with a temporal video decoder (Kandinsky Video's temporal MoVQ-GAN decoder).

The encoder, codebook and every spatial decoder layer are the image MoVQ's
(`kvideo.models.movq`, same parameter names, so an image checkpoint loads as is). The decoder
gains temporal layers that work on frames folded into the batch:

- in every ResNet block of the up levels (and of the middle when `temporal_mid_blocks`), after
  each of its two convs, `h = (1 - a) h + a Conv3d_3x3x3(h)` with the gate a and the conv
  starting at 0 (`kvideo.nn.temporal.TemporalConvBlend`; `temporal_conv_init` chooses another
  start that is also the identity);
- temporal attention (single head, latent-conditioned norm, as the spatial AttnBlock, but over
  frames at each pixel) after the middle attention and after each attention of the lowest
  up level, its output projection zero-initialised.

At initialisation every temporal layer is the identity: the video decoder decodes exactly as the
image decoder frame by frame. The `kandinsky` size is the release's layout, temporal convs in the
middle blocks included: its decoder (the decoder's layers with their temporal convs and
attentions) has 556,645,919 parameters, the release's "556.6M", which is the decoder alone; the
whole video MoVQ (encoder, codebook and quantiser convs too) has 666,196,811. Without the middle
blocks' temporal convs (`temporal_mid_blocks: false`) the whole model has 552,946,503.

`decode_video(z, window, overlap)` decodes (b, c, f, h, w) latents over overlapping temporal
windows blended with linear ramps, so long videos decode in bounded memory without seams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from einops import rearrange
from torch import nn

from kvideo.models.movq import MOVQ_SIZES, MoVQ, MovqConfig, _apply_norm, _make_norm
from kvideo.models.sizes import extend_config, sized_config
from kvideo.nn.layers import attention, zero_module
from kvideo.nn.temporal import CONV_INITS, TemporalConvBlend

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass
class VideoMovqConfig(MovqConfig):
    temporal_mid_blocks: bool = False  # temporal convs in the middle ResNet blocks too (the release; size kandinsky)
    temporal_kernel: int = 3  # the Conv3d is temporal_kernel x temporal_spatial_kernel x temporal_spatial_kernel
    # 3: the release's 3x3x3. 1: a purely temporal conv, (2+1)D with the block's spatial convs, at a
    # ninth of the cost (at the ShapesWorld size the 3x3x3 convs are two thirds of a training step).
    temporal_spatial_kernel: int = 3
    # How the temporal convs and their gates start (kvideo.nn.temporal.TemporalConvBlend; the layer
    # is the identity at init in every case): "zero" (the release: conv and gate at zero),
    # "default" (the conv at PyTorch's init behind the zero gate), "identity" (conv = identity, gate 1).
    temporal_conv_init: str = "zero"


# ----------------------------------------------------------------------------------------------
# Temporal attention
# ----------------------------------------------------------------------------------------------


class TemporalAttnBlock(nn.Module):
    """Single-head attention over the frames of each pixel, with a latent-conditioned norm;
    residual, output projection zero-initialised (identity at init). On ((b f), c, h, w)."""

    def __init__(self, channels: int, *, groups: int, cond_channels: int) -> None:
        super().__init__()
        self.norm = _make_norm(channels, cond_channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, kernel_size=1))

    def forward(self, x: torch.Tensor, zq: torch.Tensor, num_frames: int) -> torch.Tensor:
        h, w = x.shape[-2:]
        qkv = self.qkv(_apply_norm(self.norm, x, zq))  # ((b f), 3c, h, w)
        q, k, v = (rearrange(t, "(b f) c h w -> (b h w) 1 f c", f=num_frames) for t in qkv.chunk(3, dim=1))
        out = rearrange(attention(q, k, v), "(b h w) 1 f c -> (b f) c h w", h=h, w=w)
        return x + self.proj_out(out)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def _key(name: str) -> str:
    return name.replace(".", "_")  # ModuleDict keys cannot contain dots


class _BoundDecoderTemporal:
    """The video MoVQ's temporal layers bound to one decode: frame count and latent."""

    def __init__(self, model: "VideoMoVQ", num_frames: int, zq: torch.Tensor) -> None:
        self.model, self.f, self.zq = model, num_frames, zq

    def inner(self, name: str):
        convs = self.model.temporal_convs[_key(name)] if _key(name) in self.model.temporal_convs else None
        if convs is None:
            return None

        def after_conv(i: int, h: torch.Tensor) -> torch.Tensor:
            video = rearrange(h, "(b f) c h w -> b c f h w", f=self.f)
            return rearrange(convs[i](video), "b c f h w -> (b f) c h w")

        return after_conv

    def attention(self, name: str, h: torch.Tensor) -> torch.Tensor:
        key = _key(name)
        if key not in self.model.temporal_attn:
            return h
        return self.model.temporal_attn[key](h, self.zq, self.f)


class VideoMoVQ(MoVQ):
    """MoVQ + `temporal_convs` and `temporal_attn` in the decoder. decode(z) stays the image path."""

    def __init__(self, cfg: VideoMovqConfig) -> None:
        if cfg.temporal_conv_init not in CONV_INITS:
            raise ValueError(f"model.temporal_conv_init must be one of {CONV_INITS}; got {cfg.temporal_conv_init!r}")
        super().__init__(cfg)
        dec, kernel = self.decoder, (cfg.temporal_kernel, cfg.temporal_spatial_kernel, cfg.temporal_spatial_kernel)
        convs: Dict[str, nn.Module] = {}
        if cfg.temporal_mid_blocks:
            for name in ("block_1", "block_2"):
                block = getattr(dec.mid, name)
                convs[_key(f"mid.{name}")] = self._blends(block, kernel, cfg.temporal_conv_init)
        for j, level in enumerate(dec.up):
            for i, block in enumerate(level.block):
                convs[_key(f"up.{j}.block.{i}")] = self._blends(block, kernel, cfg.temporal_conv_init)
        self.temporal_convs = nn.ModuleDict(convs)
        attn: Dict[str, nn.Module] = {}
        lowest = len(dec.up) - 1
        names = ["mid.attn_1"] + [f"up.{lowest}.attn.{i}" for i in range(len(dec.up[lowest].attn))]
        for name in names:
            attn[_key(name)] = TemporalAttnBlock(dec.mid.attn_1.q.in_channels if name.startswith("mid")
                                                 else dec.up[lowest].attn[0].q.in_channels,
                                                 groups=cfg.norm_groups, cond_channels=cfg.embed_dim)
        self.temporal_attn = nn.ModuleDict(attn)

    @staticmethod
    def _blends(block: nn.Module, kernel: Tuple[int, int, int], init: str) -> nn.ModuleList:
        return nn.ModuleList([TemporalConvBlend(block.conv1.out_channels, kernel, init),
                              TemporalConvBlend(block.conv2.out_channels, kernel, init)])

    def temporal_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.temporal_convs.parameters()
        yield from self.temporal_attn.parameters()

    def forward(self, x: torch.Tensor, *args, num_frames: Optional[int] = None, **kwargs):
        """With `num_frames`: `decode_frames(x, num_frames)` (the video decoder's training call, so
        DDP sees it as the forward); otherwise the image MoVQ's reconstruction forward."""
        if num_frames is not None:
            return self.decode_frames(x, num_frames)
        return super().forward(x, *args, **kwargs)

    def decode_frames(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """((b f), c, h, w) latents of clips of `num_frames` -> ((b f), 3, H, W), with the temporal layers."""
        if z.ndim != 4 or z.shape[1] != self.cfg.embed_dim or z.shape[0] % num_frames:
            raise ValueError(f"VideoMoVQ.decode_frames expects ((b f), {self.cfg.embed_dim}, h, w) with f = "
                             f"{num_frames}; got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z), z, _BoundDecoderTemporal(self, num_frames, z))

    def decode_video(self, z: torch.Tensor, window: Optional[int] = None, overlap: int = 4) -> torch.Tensor:
        """(b, c, f, h, w) latents -> (b, 3, f, H, W) frames, decoded over temporal windows of
        `window` frames (None: all at once) overlapping by `overlap`, blended with linear ramps."""
        b, _, f = z.shape[:3]
        starts = window_starts(f, window, overlap)
        size = f if window is None else min(window, f)
        out, weight = None, z.new_zeros(f)
        for s in starts:
            piece = z[:, :, s: s + size]
            frames = rearrange(self.decode_frames(rearrange(piece, "b c f h w -> (b f) c h w"), piece.shape[2]),
                               "(b f) c h w -> b c f h w", b=b)
            ramp = blend_weights(piece.shape[2], s, f, overlap if len(starts) > 1 else 0).to(frames)
            if out is None:
                out = frames.new_zeros(b, frames.shape[1], f, *frames.shape[-2:])
            out[:, :, s: s + size] += frames * ramp[:, None, None]
            weight[s: s + size] += ramp.to(weight)
        return out / weight.to(out)[:, None, None]


def window_starts(num_frames: int, window: Optional[int], overlap: int) -> List[int]:
    """First frames of the decoding windows: every window - overlap frames, the last one flush
    with the end. A single window when `window` is None or covers the video."""
    if window is None or window >= num_frames:
        return [0]
    if not 0 <= overlap < window:
        raise ValueError(f"decode window {window} needs 0 <= overlap < window; got overlap {overlap}")
    starts = list(range(0, num_frames - window + 1, window - overlap))
    if starts[-1] != num_frames - window:
        starts.append(num_frames - window)
    return starts


def blend_weights(length: int, start: int, total: int, overlap: int) -> torch.Tensor:
    """Per-frame weights of a window: linear ramps over `overlap` frames at each inner edge,
    1 at the video's own first and last frames (so every frame's weights sum to > 0)."""
    w = torch.ones(length)
    if overlap > 0:
        ramp = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
        n = min(overlap, length)
        if start > 0:
            w[:n] = ramp[:n]
        if start + length < total:
            w[length - n:] = torch.minimum(w[length - n:], ramp[:n].flip(0))
    return w


# ----------------------------------------------------------------------------------------------
# Named sizes
# ----------------------------------------------------------------------------------------------


def _video_size(size: str, **fields) -> VideoMovqConfig:
    return extend_config(MOVQ_SIZES[size], VideoMovqConfig, **fields)


VIDEO_MOVQ_SIZES: Dict[str, VideoMovqConfig] = {
    # The release's temporal decoder: 556,645,919 parameters in the decoder (the release's 556.6M),
    # 666,196,811 in the whole video MoVQ.
    "kandinsky": _video_size("kandinsky", temporal_mid_blocks=True),
    "shapes": _video_size("shapes"),
}


def video_movq_config(size: str, **overrides) -> VideoMovqConfig:
    return sized_config(VIDEO_MOVQ_SIZES, size, **overrides)
