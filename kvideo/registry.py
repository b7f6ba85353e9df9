"""Names -> constructors: the models and stages a config can name, and their named sizes.

No import strings in configs: `model.name: movq` and `stage: movq` are looked up here, so
go-to-definition works and a rename breaks loudly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict

from torch import nn

from kvideo.models.movq import MOVQ_SIZES, MoVQ, MovqConfig
from kvideo.stages.movq import MovqStage


@dataclass(frozen=True)
class ModelEntry:
    schema: type  # the dataclass of the model's hyper-parameters
    build: Callable[[Any], nn.Module]  # schema instance -> module
    sizes: Dict[str, Any]  # named sizes: schema instances


MODELS: Dict[str, ModelEntry] = {
    "movq": ModelEntry(MovqConfig, MoVQ, MOVQ_SIZES),
}

STAGES: Dict[str, type] = {
    "movq": MovqStage,
}


def build_model(cfg) -> nn.Module:
    """The model named by a run config's `model` section, randomly initialised."""
    from kvideo.config import model_config

    return MODELS[cfg.model.name].build(model_config(cfg))
