"""Temporal layers that need nothing from a particular network: gated 3D convolutions.

`TemporalConvBlend` is the Kandinsky Video way of adding time to a trained image layer:
`h = (1 - a) h + a Conv3d(h)` on (b, c, f, h, w), with the gate a and the conv both starting at
zero, so the layer starts as the identity; an optional per-sample mask (b,) multiplies the
gate (0 switches the layer off for that sample, as in the interpolation model's unconditional
branch). The interpolation UNet uses kernel (3, 1, 1), the video decoder (3, 3, 3).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn


class TemporalConvBlend(nn.Module):
    """h = (1 - a m) h + a m Conv3d(h) on (b, c, f, h, w); the gate a starts at zero (identity).

    The conv starts at zero too (the release) or, `zero_conv=False`, at PyTorch's default init:
    with both factors at zero the gate's gradient is -h . dL/dh, with no conv to say what mixing
    frames would gain, and neither factor may move for a long time (docs/NOTES.md)."""

    def __init__(self, channels: int, kernel_size: Sequence[int] = (3, 1, 1), zero_conv: bool = True) -> None:
        super().__init__()
        kernel = tuple(int(k) for k in kernel_size)
        if len(kernel) != 3 or any(k % 2 == 0 for k in kernel):
            raise ValueError(f"TemporalConvBlend: kernel_size must be three odd sizes (f, h, w); got {kernel_size}")
        self.conv = nn.Conv3d(channels, channels, kernel, padding=tuple(k // 2 for k in kernel))
        if zero_conv:
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        a = self.gate if mask is None else (self.gate * mask.to(x.dtype)).reshape(-1, 1, 1, 1, 1)
        return x + a * (self.conv(x) - x)
