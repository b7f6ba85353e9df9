"""What one training step of a stage runs, for the planner (kvideo/train/plan.py): the model the
engine trains, built as its stage builds it but randomly initialised, with what the stage freezes
frozen; the frozen networks the stage holds beside it (a latent stage's MoVQ, an autoencoder
stage's LPIPS); one step of it. A latent stage encodes the frames with the MoVQ (unless
`data.latent_cache`) and runs `diffusion.training_loss` through the stage's condition (with
identity attention, each sample's references too), the text through the text encoder with a
dropout mask; an autoencoder stage runs its own `loss`, the ae phase with the GAN term on, then the
disc phase.

Under the planner's fake tensors (`kvideo.train.plan.fake_tensors`) every network is built on the
meta device and given fake parameters (`_network`), so nothing holds memory and no file is read.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional

import torch
from einops import rearrange
from omegaconf import DictConfig, read_write
from torch import nn
from torch._guards import detect_fake_mode
from torch.utils._python_dispatch import _disable_current_modes

from kvideo.diffusion import training_loss
from kvideo.inference.autoencoder import clip_latents
from kvideo.inference.conditioning import (
    IdentityCondition, ImageCondition, InterpolationCondition, KeyframeCondition, Names, Prompts, References,
    TextVideoCondition, given_frames, noise_augment,
)
from kvideo.inference.denoiser import loss_spec, make_schedule
from kvideo.inference.gaps import gap_blend, split_gaps
from kvideo.inference.loading import DIFFUSION_STAGES, build_stage_denoiser
from kvideo.models.movq import MoVQ, MovqConfig

CAPTION = "a red fox runs across a snowy field"


@dataclass
class Trainee:
    """What one training step of a stage runs: the model the engine trains (frozen parts frozen),
    the frozen networks the stage holds beside it, and `phases(batch_size)`: one closure per
    optimizer phase, each running that phase's forward and returning its scalar loss."""

    model: nn.Module
    held: List[nn.Module]
    phases: Callable[[int], List[Callable[[], torch.Tensor]]]


def planning_config(cfg: DictConfig) -> DictConfig:
    """`cfg` with the weight files the model would read at construction unset (the text tower's,
    LPIPS'): the planner builds every network randomly initialised."""
    cfg = copy.deepcopy(cfg)
    with read_write(cfg):
        if cfg.stage in DIFFUSION_STAGES:
            cfg.recipe.text_encoder.weights = None
        else:
            cfg.recipe.lpips_weights = None
    return cfg


def build_trainee(cfg: DictConfig, movq: Optional[MovqConfig] = None) -> Trainee:
    """The `Trainee` of `cfg`'s stage, randomly initialised and reading no file. A latent stage's
    frozen MoVQ is built from `movq` (the stage reads it from `recipe.movq`; the default is the
    released MoVQ's architecture)."""
    if cfg.stage in DIFFUSION_STAGES:
        return _latent_trainee(planning_config(cfg), movq or MovqConfig())
    return _autoencoder_trainee(cfg)


def _latent_trainee(cfg: DictConfig, movq_cfg: MovqConfig) -> Trainee:
    from kvideo.train.stages.keyframe import freeze_untrained

    model = _network(lambda: build_stage_denoiser(cfg))
    if cfg.stage == "keyframe":
        freeze_untrained(model, cfg.recipe)
    movq = _network(lambda: MoVQ(movq_cfg)).requires_grad_(False).eval()
    schedule, spec = make_schedule(cfg.recipe.diffusion), loss_spec(cfg.recipe.diffusion)

    def step(b: int) -> torch.Tensor:
        x0, cond, mask = _conditioned(cfg, model, schedule, _latents(cfg, movq, b))
        cond = _with_references(cfg, model, cond, x0)
        loss, _ = training_loss(lambda x_t, t: model(x_t, t, cond), schedule, x0, spec, mask=mask)
        return loss.mean()

    return Trainee(model, [movq], lambda b: [lambda: step(b)])


def _latents(cfg: DictConfig, movq: MoVQ, b: int) -> torch.Tensor:
    """A batch's scaled latents (b, c, f, h, w) as the stage makes them: its frames encoded by the
    frozen MoVQ now, or read from `data.latent_cache`. The interpolation stage encodes the frames
    of one pass (`pass_latents`)."""
    rc = cfg.recipe
    frames = (rc.frames_per_gap + 1) * rc.gaps + 1 if cfg.stage == "interpolation" else cfg.data.num_frames
    height, width = cfg.data.size
    if cfg.data.latent_cache:
        _, h, w = movq.latent_shape(height, width)
        batch = {"latents": torch.randn(b, movq.cfg.embed_dim, frames, h, w)}
    else:
        batch = {"video": torch.rand(b, 3, frames, height, width) * 2 - 1}
    return clip_latents(movq, batch, rc.latent_scale, torch.device("cpu"))


def _conditioned(cfg: DictConfig, model: nn.Module, schedule, z: torch.Tensor):
    """(x0, condition, loss mask) of the stage's loss for latents z (b, c, f, h, w). Every sample
    has its text (through the text encoder, with a dropout mask, so the null context is in the
    graph as in training) and, where the stage gives one, its first frame or keyframes; a keyframe
    stage's joint image samples (`recipe.images.share`) are traced as clips."""
    rc, b = cfg.recipe, z.shape[0]
    ones = torch.ones(b, dtype=torch.bool)

    def text(n: int) -> Prompts:
        return Prompts([CAPTION] * n, torch.zeros(n, dtype=torch.bool))

    if cfg.stage == "t2i":
        x0 = rearrange(z, "b c f h w -> (b f) c h w")  # one image per frame
        return x0, ImageCondition(text(x0.shape[0])), None
    if cfg.stage == "interpolation":
        keys, x0 = split_gaps(z, rc.frames_per_gap)
        if rc.residual:
            x0 = x0 - gap_blend(keys, rc.frames_per_gap)
        return x0, InterpolationCondition(text(b), keys, ones.float(), rc.passes[0].skip_frames), None
    if rc.conditioning == "text":
        cond, mask = TextVideoCondition(text(b), torch.ones(b), rc.motion.scale), None
        if rc.anchor.enabled:
            k = max(rc.anchor.frame, 0)
            cond = replace(cond, anchor=z[:, :, k], has_anchor=ones, anchor_frame=k, anchor_timestep=rc.anchor.timestep)
            mask = ~given_frames(ones, z.shape[2], k) if rc.anchor.loss == "others" else None
        return z, cond, mask
    level = torch.zeros(b, dtype=torch.long)
    motion_free = torch.zeros(b, dtype=torch.bool) if rc.motion_free > 0 else None
    cond = KeyframeCondition(text(b), noise_augment(schedule, z[:, :, 0], level), ones, level, torch.ones(b),
                             rc.motion.scale, motion_free)
    return z, cond, ~given_frames(ones, z.shape[2]) if model.unet.cfg.anchor_first_frame else None


def _with_references(cfg: DictConfig, model: nn.Module, cond, x0: torch.Tensor):
    """A model with identity attention traces its step with every sample's `data.max_references`
    references present and named, at `data.reference_size` (None: data.size), as the stage gives
    them (their MoVQ encoding, frozen and without gradient, is left out)."""
    if getattr(model, "reference", None) is None:
        return cond
    b, r = x0.shape[0], int(cfg.data.max_references)
    factor = int(cfg.data.size[0]) // x0.shape[-2]  # the MoVQ's downsampling
    h, w = (int(v) // factor for v in (cfg.data.reference_size or cfg.data.size))
    refs = References(torch.randn(b, r, x0.shape[1], h, w), torch.ones(b, r, dtype=torch.bool),
                      Names([[CAPTION.split()[0]] * r] * b) if cfg.recipe.identity.names else None)
    return IdentityCondition(cond, refs)


def _autoencoder_trainee(cfg: DictConfig) -> Trainee:
    """The movq or video_decoder stage's model, and its two phases through the stage's own loss at
    `recipe.gan_start` (the GAN term on); LPIPS randomly initialised when the config names its file."""
    from kvideo.models.lpips import LPIPS
    from kvideo.train.stages import STAGES
    from kvideo.train.stages.video_decoder import video_decoder_model

    stage = STAGES[cfg.stage](planning_config(cfg), torch.device("cpu"))
    model = _network(lambda: video_decoder_model(stage.cfg) if cfg.stage == "video_decoder" else stage.build_model())
    if cfg.recipe.lpips_weights:
        stage.lpips = _network(LPIPS)
    parts = {"ae": model.ae, "disc": model.disc}

    def phases(b: int) -> List[Callable[[], torch.Tensor]]:
        batch = {"video": torch.rand(b, 3, cfg.data.num_frames, *cfg.data.size) * 2 - 1}
        return [lambda: stage.loss(model, parts, batch, cfg.recipe.gan_start, "ae")[0],
                lambda: stage.loss(model, parts, batch, cfg.recipe.gan_start, "disc")[0]]

    return Trainee(model, [stage.lpips] if stage.lpips is not None else [], phases)


def _network(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()`, or under `fake_tensors()` the network built on the meta device (out of the fake
    mode: fake parameters refuse `Module.to`, which peft's LoRA and LPIPS call) and given fake
    parameters and buffers of its shapes and dtypes."""
    if detect_fake_mode() is None:
        return build()
    with _disable_current_modes(), torch.device("meta"):
        module = build()
    made: Dict[int, torch.Tensor] = {}  # a tensor two modules share stays shared
    for m in module.modules():
        for tensors in (m._parameters, m._buffers):
            for name, t in [(n, t) for n, t in tensors.items() if t is not None]:
                if id(t) not in made:
                    made[id(t)] = torch.empty(t.shape, dtype=t.dtype)
                    if isinstance(t, nn.Parameter):
                        made[id(t)] = nn.Parameter(made[id(t)], requires_grad=t.requires_grad)
                tensors[name] = made[id(t)]
    return module
