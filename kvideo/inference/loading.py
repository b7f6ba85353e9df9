"""A diffusion stage's checkpoint -> a `Bundle` ready to sample: denoiser, MoVQ, typed config, schedule.

    bundle = load_bundle("runs/keyframe_shapes", "keyframe")
    latents = sample_keyframes(bundle, prompts, inputs, KeyframeOptions.from_recipe(bundle.cfg))

`build_stage_denoiser` assembles a stage's denoiser from its config and checks that the model
fits the stage (input channels for the conditioning, the video UNet for keyframes, ...); the
training stages build on it and add their initialisation (`recipe.init_from`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Union

import torch
from omegaconf import DictConfig
from torch import nn

from kvideo.diffusion import Schedule
from kvideo.inference.autoencoder import load_movq
from kvideo.inference.checkpoints import load_stage_weights
from kvideo.inference.denoiser import TextDenoiser, build_denoiser, make_schedule

DIFFUSION_STAGES = ("t2i", "keyframe", "interpolation")
TEXT_TOWER = "text.tower."


def with_text_tower(state: Dict[str, torch.Tensor], denoiser: TextDenoiser, source: Union[str, Path]
                    ) -> Dict[str, torch.Tensor]:
    """A stage checkpoint's weights with the text tower the denoiser was built with when the
    checkpoint holds none: a converted release leaves its frozen T5 tower out, read from
    recipe.text_encoder.weights instead (kvideo.release.convert). A checkpoint without a tower
    whose config names no weights for it is a ValueError naming the checkpoint."""
    if any(k.startswith(TEXT_TOWER) for k in state):
        return state
    text = denoiser.text
    if text.cfg.weights is None or not text.cfg.frozen:
        raise ValueError(f"checkpoint '{source}' holds no text tower ({TEXT_TOWER}*) and its recipe.text_encoder "
                         "names no frozen weights to read it from")
    return {**state, **{TEXT_TOWER + k: v for k, v in text.tower.state_dict().items()}}


def build_stage_denoiser(cfg: DictConfig) -> TextDenoiser:
    """The denoiser of a t2i, keyframe or interpolation config, randomly initialised; a model that
    does not fit the stage's conditioning is a ValueError naming the keys."""
    from kvideo.models.interpolation_unet import InterpolationUNet
    from kvideo.models.video_unet import VideoUNet

    stage = cfg.stage
    if stage not in DIFFUSION_STAGES:
        raise ValueError(f"stage '{stage}' has no denoiser; expected one of {', '.join(DIFFUSION_STAGES)}")
    model = build_denoiser(cfg)
    ucfg = model.unet.cfg
    if stage == "keyframe":
        if not isinstance(model.unet, VideoUNet):
            raise ValueError(f"stage keyframe needs a video UNet (model.name: video_unet); got model.name: {cfg.model.name}")
        if cfg.recipe.get("conditioning", "first_frame") == "text":
            if ucfg.in_channels != ucfg.out_channels or ucfg.anchor_first_frame:
                raise ValueError(f"stage keyframe with recipe.conditioning: text (plain text-to-video) needs "
                                 f"model.in_channels = out_channels ({ucfg.out_channels}; got {ucfg.in_channels}) "
                                 "and no model.anchor_first_frame (recipe.anchor trains anchors)")
        elif ucfg.out_channels * 2 + 1 != ucfg.in_channels:
            raise ValueError(f"stage keyframe: model.in_channels must be 2 * out_channels + 1 "
                             f"(x_t | first frame | mask) = {2 * ucfg.out_channels + 1}; got {ucfg.in_channels}")
        lora = cfg.recipe.get("lora")
        if lora is not None and lora.enabled:  # the adapters' layers, so a LoRA run's checkpoints load
            from kvideo.inference.lora import LoraSpec, add_lora

            add_lora(model.unet, LoraSpec.from_config(lora))
    elif stage == "interpolation":
        if not isinstance(model.unet, InterpolationUNet):
            raise ValueError(f"stage interpolation needs model.name: interpolation_unet; got {cfg.model.name}")
        k = cfg.recipe.frames_per_gap
        if ucfg.out_channels % k or ucfg.in_channels != ucfg.out_channels // k * (k + 2):
            raise ValueError(f"stage interpolation: with recipe.frames_per_gap = {k}, model.out_channels must be "
                             f"k * latent channels and model.in_channels (k + 2) * latent channels; got "
                             f"{ucfg.in_channels} in, {ucfg.out_channels} out")
    return model


@dataclass
class Bundle:
    """One trained diffusion stage, in eval mode: what its samplers need."""

    stage: str
    denoiser: TextDenoiser
    movq: nn.Module  # the frozen MoVQ whose latent space the stage works in
    cfg: DictConfig  # the checkpoint's typed run config
    schedule: Schedule
    path: str  # the checkpoint it came from

    @property
    def recipe(self):
        return self.cfg.recipe

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device


def load_bundle(path: Union[str, Path], stage: str, which: str = "ema",
                device: Union[torch.device, str] = "cpu") -> Bundle:
    """The `stage` checkpoint at `path` (a run dir, a checkpoint dir or a weights file) with the MoVQ
    its config names; `which` weights: "ema" or "model"."""
    state, cfg = load_stage_weights(path, stage, which)
    denoiser = build_stage_denoiser(cfg)
    denoiser.load_state_dict(with_text_tower(state, denoiser, path))
    movq = load_movq(cfg.recipe.movq, device=device)
    return Bundle(stage, denoiser.to(device).eval(), movq, cfg, make_schedule(cfg.recipe.diffusion), str(path))
