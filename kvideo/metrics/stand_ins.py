"""Random-weight stand-ins for the metric networks, for when their published weights are not at hand.

The tests prove the metric code against the reference implementations with these, and a ranking
on ShapesWorld (benchmarks/metric_ranking.py) runs the whole evaluation with them. Numbers from a
stand-in are not comparable with any published figure: a report that uses one says so.

    save_random_fid_inception(path, seed)   # the FID Inception's layout, random weights
    torch.jit.script(RandomI3D()).save(path)  # the I3D's calling convention, a small random net
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from kvideo.metrics.inception import FIDInception


def save_random_fid_inception(path: Union[str, Path], seed: int = 0) -> Path:
    """A randomly initialised FID Inception in the weights file's layout, with non-trivial
    batch-norm statistics (as trained weights have), saved to `path`."""
    torch.manual_seed(seed)
    state = FIDInception().state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    for k, v in state.items():
        if k.endswith("running_mean"):
            state[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_var"):
            state[k] = 0.5 + torch.rand(v.shape, generator=g)
    torch.save(state, path)
    return Path(path)


class RandomI3D(nn.Module):
    """The I3D's calling convention (uint8 (b, c, t, h, w); rescale to [-1, 1], resize, and
    features or softmax by keyword) on a small random 3D convolutional network: `depth` stride-2
    convolutions of `width` channels, a mean over space and time, a linear head of `features`.
    Every argument changes the output, so a caller that passes one wrongly is caught."""

    def __init__(self, width: int = 8, features: int = 20, depth: int = 1, size: int = 12) -> None:
        super().__init__()
        layers = []
        for i in range(depth):
            layers += [nn.Conv3d(3 if i == 0 else width, width, 3, stride=1 if i == 0 else 2, padding=1), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, features)
        self.size = size

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        x = x.float()
        if rescale:
            x = x / 127.5 - 1
        if resize:
            x = F.interpolate(x, size=(x.shape[2], self.size, self.size), mode="trilinear", align_corners=False)
        logits = self.head(self.body(x).mean(dim=(2, 3, 4)))
        return logits if return_features else torch.softmax(logits, dim=1)
