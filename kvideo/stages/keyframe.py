"""Stage `keyframe`: the Kandinsky Video 1.1 keyframe model.

Trains a video UNet (`kvideo.models.video_unet`) on clips of `data.num_frames` keyframes at
`data.fps`, in the latent space of a frozen MoVQ, conditioned on

- the text (the t2i stage's text encoder and null context),
- the first frame: the UNet input is [x_t | first-frame latent in frame 0, zeros elsewhere |
  mask, 1 at frame 0 when a first frame is given], and frame 0 is still denoised;
- the noise-augmentation level: the first-frame latent is noised with Gaussian noise to a
  level drawn from `recipe.noise_aug` (the release draws uniform noise, a bug) and the level is
  given to the temporal layers; sampling uses a small fixed level (default 20);
- the motion score of the clip (shard metadata `motion_score`, times `recipe.motion.scale`).

Training drops the text, the image, or both, at `recipe.dropout` rates, so one model gives the
three branches of `text_image_guided`: [text + image, null text + image, null text + no image].

`recipe.init_from` names a t2i checkpoint: its UNet becomes the spatial layers (new input
channels start at zero, temporal layers are new) and its text encoder is taken over.
`recipe.train_spatial: false` freezes the spatial layers and the text encoder (the 1.0 recipe);
true trains everything (1.1), the loaded layers at `recipe.spatial_lr_scale` times train.lr.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from einops import rearrange
from omegaconf import MISSING
from torch import nn

from kvideo.diffusion import SAMPLERS, Schedule, text_image_guided, training_loss
from kvideo.models.text_encoder import TextEncoderConfig
from kvideo.stages.base import Phase, Stage
from kvideo.stages.movq import clip_latents, ensure_latent_cache, load_movq
from kvideo.stages.t2i import (DiffusionConfig, T2IModel, build_t2i_model, init_from_t2i, loss_options, make_schedule,
                               video_phase)

# ----------------------------------------------------------------------------------------------
# Recipe
# ----------------------------------------------------------------------------------------------


@dataclass
class ConditionDropout:
    """Per-sample shares trained without a condition (disjoint events: at most their sum <= 1)."""

    text: float = 0.1  # null text, first frame kept
    image: float = 0.1  # no first frame, text kept
    both: float = 0.1  # neither: the unconditional branch


@dataclass
class NoiseAugConfig:
    enabled: bool = True  # false: the first frame is given clean and the level is always 0
    distribution: str = "uniform"  # uniform | log_uniform, over integer levels [min_level, max_level]
    min_level: int = 0
    max_level: int = 250
    sample_level: int = 20  # the level used at sampling (the release's noise_augmentation=20)


@dataclass
class MotionConfig:
    """Motion scores are in the shards' unit (`kvideo.data.motion`); the UNet sees scale * score."""

    scale: float = 1.0
    presets: Dict[str, float] = field(default_factory=lambda: {"low": 1.0, "medium": 10.0, "high": 50.0,
                                                               "extreme": 100.0})
    default: str = "medium"  # preset used when sampling without a motion score


@dataclass
class KeyframeSamplingConfig:
    sampler: str = "ddpm"
    steps: int = 50
    spacing: str = "leading"
    timestep_shift: float = 1.0  # inference timesteps moved toward noise (Schedule.timesteps); 1 = none
    text_guidance: float = 5.0  # w_T
    image_guidance: float = 2.0  # w_I
    dynamic_threshold: Optional[float] = 0.995


@dataclass
class KeyframeRecipe:
    movq: str = MISSING  # movq-stage checkpoint
    init_from: Optional[str] = None  # t2i-stage checkpoint for the spatial layers and text encoder
    train_spatial: bool = True  # false: only temporal layers (and new input channels' conv) train
    spatial_lr_scale: float = 1.0  # learning rate of the loaded spatial layers and text encoder, times train.lr
    latent_scale: float = 1.0
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    dropout: ConditionDropout = field(default_factory=ConditionDropout)
    noise_aug: NoiseAugConfig = field(default_factory=NoiseAugConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampling: KeyframeSamplingConfig = field(default_factory=KeyframeSamplingConfig)
    preview_steps: int = 15  # previews: DPM-Solver++(2M), the first frames of the preview batch


# ----------------------------------------------------------------------------------------------
# Conditioning
# ----------------------------------------------------------------------------------------------


def conditioned_input(x_t: torch.Tensor, first: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor:
    """[x_t | first-frame latent in frame 0, zeros elsewhere | mask]: (b, c, f, h, w) -> (b, 2c + 1, f, h, w).

    first (b, c, h, w): the (noise-augmented) first-frame latent; has_image (b,) bool or float:
    where 0 the first frame and the mask are zeros (no image).
    """
    b, c, f, h, w = x_t.shape
    keep = has_image.to(x_t.dtype).reshape(b, 1, 1, 1)
    cond = torch.zeros_like(x_t)
    cond[:, :, 0] = first.to(x_t.dtype) * keep
    mask = torch.zeros(b, 1, f, h, w, dtype=x_t.dtype, device=x_t.device)
    mask[:, :, 0] = keep
    return torch.cat([x_t, cond, mask], dim=1)


def noise_augment(schedule: Schedule, latent: torch.Tensor, level: torch.Tensor,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """q_sample of the first-frame latent to integer `level` (b,) with Gaussian noise."""
    gen_device = generator.device if generator is not None else latent.device
    noise = torch.randn(latent.shape, generator=generator, device=gen_device, dtype=latent.dtype).to(latent.device)
    return schedule.q_sample(latent, level.to(latent.device).long(), noise)


def sampling_noise_level(cfg: NoiseAugConfig) -> int:
    """The first frame's noise-augmentation level at sampling: `sample_level`, or 0 for a model
    trained without augmentation (it has only ever seen a clean first frame at level 0)."""
    return int(cfg.sample_level) if cfg.enabled else 0


def draw_noise_levels(cfg: NoiseAugConfig, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Training levels (n,) long from the configured distribution; zeros when disabled."""
    if not cfg.enabled:
        return torch.zeros(n, dtype=torch.long)
    lo, hi = int(cfg.min_level), int(cfg.max_level)
    if not 0 <= lo <= hi:
        raise ValueError(f"recipe.noise_aug: need 0 <= min_level <= max_level; got {lo}, {hi}")
    if cfg.distribution == "uniform":
        return torch.randint(lo, hi + 1, (n,), generator=generator)
    if cfg.distribution == "log_uniform":  # favours small levels: log(level + 1) uniform
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        a, b = torch.log(torch.tensor(lo + 1.0, dtype=torch.float64)), torch.log(torch.tensor(hi + 1.0, dtype=torch.float64))
        return (torch.exp(a + u * (b - a)) - 1).round().long().clamp(lo, hi)
    raise ValueError(f"recipe.noise_aug.distribution must be 'uniform' or 'log_uniform'; got {cfg.distribution!r}")


def draw_dropout(cfg: ConditionDropout, n: int, generator: Optional[torch.Generator] = None):
    """(drop_text, drop_image) bool (n,): disjoint events text-only, image-only and both."""
    rates = [float(cfg.text), float(cfg.image), float(cfg.both)]
    if any(r < 0 for r in rates) or sum(rates) > 1:
        raise ValueError(f"recipe.dropout: text, image and both must be >= 0 and sum to at most 1; got {rates}")
    u = torch.rand(n, generator=generator)
    text_only = u < rates[0]
    image_only = (u >= rates[0]) & (u < rates[0] + rates[1])
    both = (u >= rates[0] + rates[1]) & (u < sum(rates))
    return text_only | both, image_only | both


def resolve_motion_score(cfg: MotionConfig, value: Union[str, float, None]) -> float:
    """A number, a number as text or a preset name -> motion score (shard units)."""
    if value is None:
        value = cfg.default
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except ValueError:
        pass
    if value not in cfg.presets:
        raise ValueError(f"unknown motion preset {value!r}; presets of this model: "
                         f"{', '.join(f'{k}={v:g}' for k, v in cfg.presets.items())} (or give a number)")
    return float(cfg.presets[value])


# ----------------------------------------------------------------------------------------------
# Model function and sampling
# ----------------------------------------------------------------------------------------------


def keyframe_net(unet: nn.Module, motion_scale: float):
    """net(x_t, t, **branch) for guidance: each branch holds context, context_mask, first,
    has_image, noise_aug_level and motion_score (shard units) of batch size b."""

    def net(x, t, *, context, context_mask, first, has_image, noise_aug_level, motion_score):
        return unet(conditioned_input(x, first, has_image), t, context, context_mask,
                    noise_aug_level=noise_aug_level, motion_score=motion_score * motion_scale)

    return net


@torch.no_grad()
def sample_keyframes(model: T2IModel, schedule: Schedule, prompts: Sequence[str], first: torch.Tensor, *,
                     num_frames: int, target: str, motion_score: Union[float, torch.Tensor], motion_scale: float,
                     noise_aug_level: int = 20, sampler: str = "ddpm", steps: int = 50, spacing: str = "leading",
                     text_guidance: float = 5.0, image_guidance: float = 2.0, latent_scale: float = 1.0,
                     negative_prompt: Optional[str] = None, dynamic_threshold: Optional[float] = None,
                     use_image: bool = True, generator: Optional[torch.Generator] = None,
                     callback=None) -> torch.Tensor:
    """Keyframe latents (b, c, num_frames, h, w) from prompts and first-frame latents `first` (b, c, h, w)
    (scaled like the training latents), with three-way guidance in one batched forward.

    The unconditional text of the image-only and unconditional branches is the null context, or
    the context of `negative_prompt` when one is given. `use_image=False` samples plain
    text-to-video keyframes (the image-dropped branch the model was trained with): every branch
    gets no first frame, and the guidance reduces to text guidance with scale w_T.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}'; choose from {', '.join(SAMPLERS)}")
    b = len(prompts)
    if first.shape[0] != b:
        raise ValueError(f"{b} prompts but {first.shape[0]} first frames")
    device = next(model.parameters()).device
    first = first.to(device)
    tokens, mask = model.context(prompts)
    neg_tokens, neg_mask = (model.context([negative_prompt] * b) if negative_prompt
                            else model.text.null_context(b))
    level = torch.full((b,), int(noise_aug_level), dtype=torch.long, device=device)
    first_aug = noise_augment(schedule, first, level, generator) if noise_aug_level > 0 else first
    motion = torch.as_tensor(motion_score, dtype=torch.float32, device=device).expand(b).clone()
    # as in training, a branch without the first frame has noise-augmentation level 0
    no_image = {"has_image": torch.zeros(b, device=device), "noise_aug_level": torch.zeros_like(level)}
    image = {"has_image": torch.ones(b, device=device), "noise_aug_level": level} if use_image else no_image
    common = {"first": first_aug, "motion_score": motion}
    net = text_image_guided(
        keyframe_net(model.unet, motion_scale),
        {"context": tokens, "context_mask": mask, **image, **common},
        {"context": neg_tokens, "context_mask": neg_mask, **image, **common},
        {"context": neg_tokens, "context_mask": neg_mask, **no_image, **common},
        text_scale=text_guidance, image_scale=image_guidance,
    )
    c, h, w = first.shape[1:]
    gen_device = generator.device if generator is not None else device
    x_T = torch.randn((b, c, num_frames, h, w), generator=generator, device=gen_device).to(device)
    kwargs = dict(steps=steps, spacing=spacing, target=target, dynamic_threshold=dynamic_threshold,
                  data_range=latent_scale, callback=callback)
    if sampler != "dpmpp_2m":
        kwargs["generator"] = generator
    return SAMPLERS[sampler](net, schedule, x_T, **kwargs)


def decode_video(movq: nn.Module, latents: torch.Tensor, latent_scale: float) -> torch.Tensor:
    """(b, c, f, h, w) scaled latents -> (b, 3, f, H, W) frames in [-1, 1], frame by frame."""
    b = latents.shape[0]
    frames = movq.decode(rearrange(latents, "b c f h w -> (b f) c h w") / latent_scale).clamp(-1, 1)
    return rearrange(frames, "(b f) c h w -> b c f h w", b=b)


# ----------------------------------------------------------------------------------------------
# Stage
# ----------------------------------------------------------------------------------------------


def build_keyframe_model(cfg, load_init: bool = True) -> T2IModel:
    """The video UNet and text encoder; with `recipe.init_from` (and `load_init`), the t2i
    checkpoint loaded in."""
    from kvideo.models.video_unet import VideoUNet

    model = build_t2i_model(cfg)
    if not isinstance(model.unet, VideoUNet):
        raise ValueError(f"stage keyframe needs a video UNet (model.name: video_unet); got model.name: {cfg.model.name}")
    if model.unet.cfg.out_channels * 2 + 1 != model.unet.cfg.in_channels:
        raise ValueError(f"stage keyframe: model.in_channels must be 2 * out_channels + 1 "
                         f"(x_t | first frame | mask) = {2 * model.unet.cfg.out_channels + 1}; "
                         f"got {model.unet.cfg.in_channels}")
    if cfg.recipe.init_from and load_init:
        init_from_t2i(model, cfg)
    if not cfg.recipe.train_spatial:
        model.requires_grad_(False)
        for p in model.unet.temporal_parameters():
            p.requires_grad_(True)
        model.unet.in_layer.requires_grad_(True)  # the new conditioning channels must learn
    return model


class KeyframeStage(Stage):
    name = "keyframe"
    default_model = "video_unet"
    recipe_schema = KeyframeRecipe
    reads_latents = True

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.movq = load_movq(self.rc.movq, device=device).requires_grad_(False)
        ensure_latent_cache(cfg, self.movq, device)
        self.schedule = make_schedule(self.rc.diffusion, self.rc.sampling)
        if cfg.data.num_frames < 2:
            raise ValueError(f"stage keyframe needs data.num_frames >= 2 (keyframes per clip); got {cfg.data.num_frames}")
        draw_dropout(self.rc.dropout, 0)  # validate the rates now, not at the first step
        draw_noise_levels(self.rc.noise_aug, 0)

    def build_model(self) -> nn.Module:
        return build_keyframe_model(self.cfg)

    def phases(self, model: T2IModel) -> List[Phase]:
        return [video_phase(model, self.rc.spatial_lr_scale)]

    def latents(self, batch: dict) -> torch.Tensor:
        """The batch's clips as (b, c, f, h, w) scaled MoVQ latents."""
        return clip_latents(self.movq, batch, self.rc.latent_scale, self.device)

    def loss(self, model, parts, batch, step, phase):
        x0 = self.latents(batch)
        b = x0.shape[0]
        drop_text, drop_image = draw_dropout(self.rc.dropout, b)
        level = draw_noise_levels(self.rc.noise_aug, b).to(self.device)
        first = noise_augment(self.schedule, x0[:, :, 0], level)
        level = torch.where(drop_image.to(self.device), torch.zeros_like(level), level)
        motion = batch["motion_score"].to(self.device) * self.rc.motion.scale
        net = parts["main"]

        def model_fn(x_t, t):
            return net(conditioned_input(x_t, first, ~drop_image.to(self.device)), t, batch["caption"], drop_text,
                       noise_aug_level=level, motion_score=motion)

        loss, info = training_loss(model_fn, self.schedule, x0, **loss_options(self.rc.diffusion))
        return loss.mean(), {"keyframe/mse": float(info["mse"].mean()), "keyframe/latent_std": float(x0.std())}

    @torch.no_grad()
    def preview(self, model: T2IModel, batch: dict, out_dir: Path, step: int) -> List[Path]:
        """Keyframes for the first clips of `batch` from their true first frame, caption and motion
        score: one row per clip, the true keyframes above the sampled ones."""
        from torchvision.utils import save_image

        n = min(4, len(batch["caption"]))
        x0 = self.latents({k: batch[k][:n] for k in ("video", "latents") if k in batch})
        s = self.rc.sampling
        latents = sample_keyframes(
            model, self.schedule, batch["caption"][:n], x0[:, :, 0], num_frames=x0.shape[2],
            target=self.rc.diffusion.target, motion_score=batch["motion_score"][:n], motion_scale=self.rc.motion.scale,
            noise_aug_level=sampling_noise_level(self.rc.noise_aug),
            sampler="dpmpp_2m", steps=self.rc.preview_steps, spacing=s.spacing, text_guidance=s.text_guidance,
            image_guidance=s.image_guidance, latent_scale=self.rc.latent_scale,
            dynamic_threshold=s.dynamic_threshold, generator=torch.Generator().manual_seed(0))
        fake = decode_video(self.movq, latents, self.rc.latent_scale)
        real = batch["video"][:n].to(fake.device) if "video" in batch \
            else decode_video(self.movq, x0, self.rc.latent_scale)  # cached latents: their reconstruction
        rows = torch.stack([real, fake], dim=1)  # (n, 2, 3, f, H, W)
        grid = rearrange(rows, "n r c f h w -> (n r f) c h w")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"step_{step:07d}.png"
        save_image((grid + 1) / 2, path, nrow=x0.shape[2])
        return [path]


def load_keyframe(path: Union[str, Path], which: str = "ema", device: Union[torch.device, str] = "cpu"):
    """(model, movq, cfg) of a keyframe-stage checkpoint, in eval mode."""
    from kvideo.train.checkpoint import load_stage_weights

    state, cfg = load_stage_weights(path, "keyframe", which)
    model = build_keyframe_model(cfg, load_init=False)  # the checkpoint holds every weight
    model.load_state_dict(state)
    movq = load_movq(cfg.recipe.movq, device=device)
    return model.to(device).eval(), movq, cfg
