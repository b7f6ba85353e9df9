"""Temporal layers that need nothing from a particular network: gated 3D convolutions.

`TemporalConvBlend` is the Kandinsky Video way of adding time to a trained image layer:
`h = (1 - a) h + a Conv3d(h)` on (b, c, f, h, w), with the gate a and the conv both starting at
zero (or the conv at the identity and the gate at 1), so the layer starts as the identity; an
optional per-sample mask (b,) multiplies the gate (0 switches the layer off for that sample, as
in the interpolation model's unconditional branch). The interpolation UNet uses kernel (3, 1, 1),
the video decoder (3, 3, 3).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn


CONV_INITS = ("zero", "default", "identity")


class TemporalConvBlend(nn.Module):
    """h = (1 - a m) h + a m Conv3d(h) on (b, c, f, h, w), the identity at init for every `init`:

    - "zero" (the release): the conv and the gate a start at zero. The conv's gradient is then a
      times something, so zero, and the gate's is -h . dL/dh, with no conv to say what mixing
      frames would gain: neither factor may move for a long time (docs/BENCHMARKS.md, vd4);
    - "default": the conv at PyTorch's default init behind the zero gate;
    - "identity" (Make-A-Video's temporal convs): the conv is the identity (centre tap = I,
      everything else 0) and the gate starts at 1, so Conv3d(h) - h = 0 while the conv's weights
      take the layer's whole gradient from the first step.
    """

    def __init__(self, channels: int, kernel_size: Sequence[int] = (3, 1, 1), init: str = "zero") -> None:
        super().__init__()
        kernel = tuple(int(k) for k in kernel_size)
        if len(kernel) != 3 or any(k % 2 == 0 for k in kernel):
            raise ValueError(f"TemporalConvBlend: kernel_size must be three odd sizes (f, h, w); got {kernel_size}")
        if init not in CONV_INITS:
            raise ValueError(f"TemporalConvBlend: init must be one of {CONV_INITS}; got {init!r}")
        self.conv = nn.Conv3d(channels, channels, kernel, padding=tuple(k // 2 for k in kernel))
        if init in ("zero", "identity"):
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)
        if init == "identity":
            with torch.no_grad():
                self.conv.weight[(slice(None), slice(None), *(k // 2 for k in kernel))] = torch.eye(channels)
        self.gate = nn.Parameter(torch.tensor(1.0 if init == "identity" else 0.0))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        a = self.gate if mask is None else (self.gate * mask.to(x.dtype)).reshape(-1, 1, 1, 1, 1)
        return x + a * (self.conv(x) - x)
