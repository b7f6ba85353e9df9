"""Network building blocks shared by the models of kvideo (`kvideo.models`)."""

from kvideo.nn.layers import (
    Downsample2d,
    GradCheckpointMixin,
    Upsample2d,
    attention,
    group_norm,
    xformers_available,
    zero_module,
)

__all__ = [
    "Downsample2d",
    "GradCheckpointMixin",
    "Upsample2d",
    "attention",
    "group_norm",
    "xformers_available",
    "zero_module",
]
