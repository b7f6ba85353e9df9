"""The building blocks of the Kandinsky 3 UNet (`kvideo.models.unet`), shared by every UNet of kvideo.

    sinusoidal_embedding, TimestepEmbedding     timesteps -> (b, time_embed_dim)
    Attention, AttentionPooling                 multi-head attention; the text pooled into the time embedding
    ConditionalGroupNorm                        GroupNorm(affine=False) * (1 + scale) + shift of the conditioning
    Block, ResNetBlock, AttentionBlock          the UNet's ResNet and (self- or cross-) attention blocks

`kvideo.models.unet` re-exports all of them (their older home); the video, interpolation and
identity layers build on them.

Sections: embeddings and attention, blocks.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
from einops import rearrange
from torch import nn

from kvideo.nn.layers import attention, group_norm

# The query of AttentionPooling: the mean of the valid context tokens, or of all of them (UNetConfig.pool_query).
POOL_QUERIES = ("valid", "all")

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
