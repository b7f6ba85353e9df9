"""Names -> constructors and schemas: the models and stages a config can name, and their sizes.

No import strings in configs: `model.name: movq` and `stage: movq` are looked up here, so
go-to-definition works and a rename breaks loudly. This module hands the schemas to the config
loader (`load_config`); the training stages that run a stage's recipe are registered in
`kvideo.train.stages`, which the inference side never imports.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Union

from omegaconf import DictConfig
from torch import nn

from kvideo import config
from kvideo.config import Schemas, StageSchema
from kvideo.models.interpolation_unet import INTERPOLATION_UNET_SIZES, InterpolationUNet, InterpolationUNetConfig
from kvideo.models.movq import MOVQ_SIZES, MoVQ, MovqConfig
from kvideo.models.unet import UNET_SIZES, UNet, UNetConfig
from kvideo.models.video_movq import VIDEO_MOVQ_SIZES, VideoMoVQ, VideoMovqConfig
from kvideo.models.video_unet import VIDEO_UNET_SIZES, VideoUNet, VideoUNetConfig
from kvideo.recipes import InterpolationRecipe, KeyframeRecipe, MovqRecipe, T2IRecipe, VideoDecoderRecipe


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

STAGES: Dict[str, StageSchema] = {
    "movq": StageSchema(MovqRecipe, "movq"),
    "t2i": StageSchema(T2IRecipe, "unet"),
    "keyframe": StageSchema(KeyframeRecipe, "video_unet"),
    "interpolation": StageSchema(InterpolationRecipe, "interpolation_unet"),
    "video_decoder": StageSchema(VideoDecoderRecipe, "video_movq"),
}

SCHEMAS = Schemas(stages=STAGES, models=MODELS)


def load_config(files: Sequence[Union[str, Path]] = (), overrides: Sequence[str] = (), *, base: Optional[dict] = None,
                require_complete: bool = True) -> DictConfig:
    """`kvideo.config.load_config` typed by the registered stages and models."""
    return config.load_config(files, overrides, schemas=SCHEMAS, base=base, require_complete=require_complete)


def model_config(cfg: DictConfig) -> Any:
    """The `model` section as an instance of the model's schema dataclass (without name/size)."""
    entry = MODELS[cfg.model.name]
    values = {f.name: config.plain(cfg.model[f.name]) for f in dataclasses.fields(entry.schema)}
    return entry.schema(**values)


def build_model(cfg: DictConfig) -> nn.Module:
    """The model named by a run config's `model` section, randomly initialised."""
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


def model_info(cfg: DictConfig) -> Dict[str, Any]:
    """Parameter counts of the model a config names, built on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        model = build_model(cfg)
    return {"model": cfg.model.name, "size": cfg.model.size, **count_parameters(model)}
