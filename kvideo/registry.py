"""Names -> constructors: the models and stages a config can name, and their named sizes.

No import strings in configs: `model.name: movq` and `stage: movq` are looked up here, so
go-to-definition works and a rename breaks loudly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict

from torch import nn

from kvideo.models.movq import MOVQ_SIZES, MoVQ, MovqConfig
from kvideo.models.interpolation_unet import INTERPOLATION_UNET_SIZES, InterpolationUNet, InterpolationUNetConfig
from kvideo.models.unet import UNET_SIZES, UNet, UNetConfig
from kvideo.models.video_movq import VIDEO_MOVQ_SIZES, VideoMoVQ, VideoMovqConfig
from kvideo.models.video_unet import VIDEO_UNET_SIZES, VideoUNet, VideoUNetConfig
from kvideo.stages.interpolation import InterpolationStage
from kvideo.stages.keyframe import KeyframeStage
from kvideo.stages.movq import MovqStage
from kvideo.stages.t2i import T2IStage
from kvideo.stages.video_decoder import VideoDecoderStage


@dataclass(frozen=True)
class ModelEntry:
    schema: type  # the dataclass of the model's hyper-parameters
    build: Callable[[Any], nn.Module]  # schema instance -> module
    sizes: Dict[str, Any]  # named sizes: schema instances


MODELS: Dict[str, ModelEntry] = {
    "movq": ModelEntry(MovqConfig, MoVQ, MOVQ_SIZES),
    "unet": ModelEntry(UNetConfig, UNet, UNET_SIZES),
    "video_movq": ModelEntry(VideoMovqConfig, VideoMoVQ, VIDEO_MOVQ_SIZES),
    "video_unet": ModelEntry(VideoUNetConfig, VideoUNet, VIDEO_UNET_SIZES),
    "interpolation_unet": ModelEntry(InterpolationUNetConfig, InterpolationUNet, INTERPOLATION_UNET_SIZES),
}

STAGES: Dict[str, type] = {
    "movq": MovqStage,
    "t2i": T2IStage,
    "keyframe": KeyframeStage,
    "interpolation": InterpolationStage,
    "video_decoder": VideoDecoderStage,
}


def build_model(cfg) -> nn.Module:
    """The model named by a run config's `model` section, randomly initialised."""
    from kvideo.config import model_config

    return MODELS[cfg.model.name].build(model_config(cfg))


def count_parameters(model: nn.Module) -> Dict[str, Any]:
    """{"total_params", "trainable_params", "modules": {top-level child: count}}, plus
    "temporal_params" for models with temporal layers (a `temporal_parameters()` method)."""
    info: Dict[str, Any] = {
        "total_params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "modules": {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()},
    }
    if hasattr(model, "temporal_parameters"):
        info["temporal_params"] = sum(p.numel() for p in model.temporal_parameters())
    return info


def model_info(cfg) -> Dict[str, Any]:
    """Parameter counts of the model a config names, built on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        model = build_model(cfg)
    return {"model": cfg.model.name, "size": cfg.model.size, **count_parameters(model)}
