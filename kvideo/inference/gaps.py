"""The interpolation stage's frame layout: N keyframes and the k new frames of each of the N - 1 gaps.

A pass turns N keyframes into (k + 1)(N - 1) + 1 frames (4N - 3 with k = 3; 12 -> 45 -> 177 in
two passes). The model sees every gap at once, the k new frames of a gap stacked in channels:
(b, k c, g, h, w), beside the gap's two keyframes (`kvideo.inference.conditioning.gap_input`).
"""

from __future__ import annotations

import torch
from einops import rearrange


def frames_after_passes(num_keyframes: int, passes: int, frames_per_gap: int = 3) -> int:
    """N -> (k + 1)(N - 1) + 1 per pass: 12 -> 45 -> 177 with k = 3."""
    n = num_keyframes
    for _ in range(passes):
        n = (frames_per_gap + 1) * (n - 1) + 1
    return n


def split_gaps(latents: torch.Tensor, k: int):
    """(b, c, (k + 1) g + 1, h, w) frames -> keyframes (b, c, g + 1, h, w) and the new frames of
    each gap stacked in channels, (b, k c, g, h, w)."""
    b, c, f, h, w = latents.shape
    if (f - 1) % (k + 1):
        raise ValueError(f"{f} frames do not split into gaps of {k} new frames")
    g = (f - 1) // (k + 1)
    keys = latents[:, :, :: k + 1]  # (b, c, g + 1, h, w)
    inner = torch.stack([latents[:, :, j * (k + 1) + 1: j * (k + 1) + k + 1] for j in range(g)], dim=2)  # (b, c, g, k, h, w)
    return keys, rearrange(inner, "b c g k h w -> b (k c) g h w")


def gap_blend(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Linear blending of each gap's two keyframes, laid out like split_gaps' new frames: keyframes
    (b, c, g + 1, h, w) -> (b, k c, g, h, w), new frame j of a gap = left + (right - left) j / (k + 1)."""
    left, right = keys[:, :, None, :-1], keys[:, :, None, 1:]  # (b, c, 1, g, h, w)
    w = (torch.arange(1, k + 1, dtype=keys.dtype, device=keys.device) / (k + 1))[:, None, None, None]  # (k, 1, 1, 1)
    return rearrange(left * (1 - w) + right * w, "b c k g h w -> b (k c) g h w")


def merge_gaps(keys: torch.Tensor, new: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of split_gaps: keyframes (b, c, g + 1, h, w) and new (b, k c, g, h, w) -> all frames."""
    b, c, n, h, w = keys.shape
    inner = rearrange(new, "b (k c) g h w -> b c g k h w", k=k)
    frames = []
    for j in range(n - 1):
        frames += [keys[:, :, j: j + 1], inner[:, :, j]]
    frames.append(keys[:, :, n - 1:])
    return torch.cat(frames, dim=2)  # (b, c, (k + 1)(n - 1) + 1, h, w)
