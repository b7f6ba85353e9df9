"""Stage `interpolation`: new frames between neighbouring keyframes (Kandinsky Video 1.1).

A pass turns N keyframes into (k + 1)(N - 1) + 1 frames: k new frames (default 3) in each of the
N - 1 gaps, so 4N - 3 with k = 3, and two passes 4(4N - 3) - 3 (12 -> 45 -> 177 in the full
configuration). The model (`kvideo.models.interpolation_unet`) sees every gap at once, as a
sequence: per gap [left keyframe latent | x_t of the k new frames | right keyframe latent], clean
keyframes, and predicts the k new frames (`recipe.diffusion.target`, v by default; the ShapesWorld
config predicts x0, which need not carry each stacked frame's noise through the UNet).

With `recipe.init_from` the spatial layers come from a t2i checkpoint and the gap-stacked input
and output convs start from its convs (`recipe.init_convs: spread`, see
`kvideo.models.interpolation_unet.spread_image_convs`) or at random (`fresh`).

Training draws clips of `data.num_frames` frames at `data.fps` and, per batch, one of
`recipe.passes`: frames are taken every `stride` frames, keyframes every k + 1 of those, and
the pass's `skip_frames` is given to the model. With probability `recipe.uncond_prob` a sample
is trained as the unconditional branch of guidance: null text, zeroed keyframes and temporal
mask 0. Sampling combines the two branches as `(w + 1) c - w u` (w = 0.5, 10 steps, "trailing").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch
from einops import rearrange
from omegaconf import MISSING
from torch import nn

from kvideo.diffusion import SAMPLERS, Schedule, text_guided, training_loss
from kvideo.models.text_encoder import TextEncoderConfig
from kvideo.stages.base import Phase, Stage
from kvideo.stages.keyframe import decode_video
from kvideo.stages.movq import clip_latents, ensure_latent_cache, load_movq
from kvideo.stages.t2i import (DiffusionConfig, T2IModel, build_t2i_model, init_from_t2i, loss_options, make_schedule,
                               video_phase)

# ----------------------------------------------------------------------------------------------
# Recipe
# ----------------------------------------------------------------------------------------------


@dataclass
class PassConfig:
    stride: int = 1  # frames of the training clip between output frames of this pass
    skip_frames: int = 3  # what the model is told about the pass (release: 3 first pass, 1 second)


@dataclass
class InterpolationSamplingConfig:
    sampler: str = "ddim"
    steps: int = 10
    spacing: str = "trailing"
    timestep_shift: float = 1.0  # inference timesteps moved toward noise (Schedule.timesteps); 1 = none
    guidance: float = 0.5  # (w + 1) * cond - w * uncond
    dynamic_threshold: Optional[float] = None


@dataclass
class InterpolationRecipe:
    movq: str = MISSING
    init_from: Optional[str] = None  # t2i checkpoint: spatial layers and text encoder (in/out convs stay new)
    latent_scale: float = 1.0
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    frames_per_gap: int = 3  # k new frames between neighbouring keyframes
    # How the input and output convs start with init_from: "spread" = from the t2i convs
    # (`spread_image_convs`), "fresh" = random (their channels mean something else).
    init_convs: str = "spread"
    spatial_lr_scale: float = 1.0  # learning rate of the loaded layers (spatial, text encoder), times train.lr
    # Diffuse the new frames' residual over the linear blend of their gap's two keyframe latents
    # (`gap_blend`) instead of the frames themselves; the output conv starts at zero, so with
    # target x0 the untrained model returns the blend exactly.
    residual: bool = False
    gaps: int = 4  # gaps per training sample
    passes: List[PassConfig] = field(default_factory=lambda: [PassConfig(stride=4, skip_frames=3),
                                                              PassConfig(stride=1, skip_frames=1)])
    uncond_prob: float = 0.1  # share of samples trained as the unconditional branch
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(target="v"))
    sampling: InterpolationSamplingConfig = field(default_factory=InterpolationSamplingConfig)
    preview_steps: int = 10


def frames_after_passes(num_keyframes: int, passes: int, frames_per_gap: int = 3) -> int:
    """N -> (k + 1)(N - 1) + 1 per pass: 12 -> 45 -> 177 with k = 3."""
    n = num_keyframes
    for _ in range(passes):
        n = (frames_per_gap + 1) * (n - 1) + 1
    return n


def clip_frames_needed(recipe) -> int:
    """Frames a training clip needs for the longest pass."""
    return (recipe.frames_per_gap + 1) * recipe.gaps * max(p.stride for p in recipe.passes) + 1


# ----------------------------------------------------------------------------------------------
# Gaps
# ----------------------------------------------------------------------------------------------


def split_gaps(latents: torch.Tensor, k: int):
    """(b, c, (k + 1) g + 1, h, w) frames -> keyframes (b, c, g + 1, h, w) and the new frames of
    each gap stacked in channels, (b, k c, g, h, w)."""
    b, c, f, h, w = latents.shape
    if (f - 1) % (k + 1):
        raise ValueError(f"{f} frames do not split into gaps of {k} new frames")
    g = (f - 1) // (k + 1)
    keys = latents[:, :, :: k + 1]  # (b, c, g + 1, h, w)
    inner = torch.stack([latents[:, :, j * (k + 1) + 1: j * (k + 1) + k + 1] for j in range(g)], dim=2)  # (b, c, g, k, h, w)
    return keys, rearrange(inner, "b c g k h w -> b (k c) g h w")


def gap_blend(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Linear blending of each gap's two keyframes, laid out like split_gaps' new frames: keyframes
    (b, c, g + 1, h, w) -> (b, k c, g, h, w), new frame j of a gap = left + (right - left) j / (k + 1)."""
    left, right = keys[:, :, None, :-1], keys[:, :, None, 1:]  # (b, c, 1, g, h, w)
    w = (torch.arange(1, k + 1, dtype=keys.dtype, device=keys.device) / (k + 1))[:, None, None, None]  # (k, 1, 1, 1)
    return rearrange(left * (1 - w) + right * w, "b c k g h w -> b (k c) g h w")


def merge_gaps(keys: torch.Tensor, new: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of split_gaps: keyframes (b, c, g + 1, h, w) and new (b, k c, g, h, w) -> all frames."""
    b, c, n, h, w = keys.shape
    inner = rearrange(new, "b (k c) g h w -> b c g k h w", k=k)
    frames = []
    for j in range(n - 1):
        frames += [keys[:, :, j: j + 1], inner[:, :, j]]
    frames.append(keys[:, :, n - 1:])
    return torch.cat(frames, dim=2)  # (b, c, (k + 1)(n - 1) + 1, h, w)


def gap_input(x_t: torch.Tensor, keys: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[left keyframe | x_t | right keyframe] per gap: (b, k c, g, ...) -> (b, (k + 2) c, g, ...).
    Samples where `keep` (b,) is 0 get zeroed keyframes (the unconditional branch)."""
    k = keep.to(x_t.dtype).reshape(-1, 1, 1, 1, 1)
    return torch.cat([keys[:, :, :-1] * k, x_t, keys[:, :, 1:] * k], dim=1)


def interpolation_net(unet: nn.Module, skip_frames: int):
    """net(x_t, t, **branch): branch holds context, context_mask, keys and keep (b,)."""

    def net(x, t, *, context, context_mask, keys, keep):
        skip = torch.full((x.shape[0],), skip_frames, dtype=torch.long, device=x.device)
        return unet(gap_input(x, keys, keep), t, context, context_mask, skip_frames=skip, temporal_mask=keep)

    return net


@torch.no_grad()
def interpolate(model: T2IModel, schedule: Schedule, keyframes: torch.Tensor, prompts: Sequence[str], *,
                passes: Sequence[int], frames_per_gap: int, target: str, sampler: str = "ddim", steps: int = 10,
                spacing: str = "trailing", guidance: float = 0.5, latent_scale: float = 1.0,
                negative_prompt: Optional[str] = None, dynamic_threshold: Optional[float] = None,
                residual: bool = False, generator: Optional[torch.Generator] = None, callback=None) -> torch.Tensor:
    """Keyframe latents (b, c, N, h, w) -> (b, c, frames_after_passes(N, len(passes)), h, w).

    `passes` lists the skip_frames value of each pass in order (e.g. [3, 1]). Each pass samples
    all gaps at once; the unconditional branch is null text (or the negative prompt), zeroed
    keyframes and temporal mask 0. `residual`: the model was trained on residuals over
    `gap_blend` (recipe.residual), which is added back to its samples.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}'; choose from {', '.join(SAMPLERS)}")
    b, k = keyframes.shape[0], frames_per_gap
    device = next(model.parameters()).device
    tokens, mask = model.context(prompts)
    neg_tokens, neg_mask = model.context([negative_prompt] * b) if negative_prompt else model.text.null_context(b)
    keys = keyframes.to(device)
    for p, skip in enumerate(passes):
        c, n, h, w = keys.shape[1:]
        net = text_guided(interpolation_net(model.unet, skip),
                          {"context": tokens, "context_mask": mask, "keys": keys, "keep": torch.ones(b, device=device)},
                          {"context": neg_tokens, "context_mask": neg_mask, "keys": keys,
                           "keep": torch.zeros(b, device=device)}, guidance)
        gen_device = generator.device if generator is not None else device
        x_T = torch.randn((b, k * c, n - 1, h, w), generator=generator, device=gen_device).to(device)
        kwargs = dict(steps=steps, spacing=spacing, target=target, dynamic_threshold=dynamic_threshold,
                      data_range=2 * latent_scale if residual else latent_scale, callback=callback)
        if sampler != "dpmpp_2m":
            kwargs["generator"] = generator
        new = SAMPLERS[sampler](net, schedule, x_T, **kwargs)
        if residual:
            new = new + gap_blend(keys, k)
        keys = merge_gaps(keys, new, k)
    return keys


# ----------------------------------------------------------------------------------------------
# Stage
# ----------------------------------------------------------------------------------------------


def build_interpolation_model(cfg, load_init: bool = True) -> T2IModel:
    from kvideo.models.interpolation_unet import InterpolationUNet, spread_image_convs

    model = build_t2i_model(cfg)
    if not isinstance(model.unet, InterpolationUNet):
        raise ValueError(f"stage interpolation needs model.name: interpolation_unet; got {cfg.model.name}")
    k, ucfg = cfg.recipe.frames_per_gap, model.unet.cfg
    if ucfg.out_channels % k or ucfg.in_channels != ucfg.out_channels // k * (k + 2):
        raise ValueError(f"stage interpolation: with recipe.frames_per_gap = {k}, model.out_channels must be "
                         f"k * latent channels and model.in_channels (k + 2) * latent channels; got "
                         f"{ucfg.in_channels} in, {ucfg.out_channels} out")
    if cfg.recipe.init_convs not in ("spread", "fresh"):
        raise ValueError(f"recipe.init_convs must be 'spread' or 'fresh'; got {cfg.recipe.init_convs!r}")
    if cfg.recipe.init_from and load_init:  # the input and output convs mean other things here
        image_state = init_from_t2i(model, cfg, keep_new=("in_layer.", "out_layer.2."))
        if cfg.recipe.init_convs == "spread":
            spread_image_convs(model.unet, image_state, k)
    if cfg.recipe.residual and load_init:  # start at a zero residual: the blend itself
        nn.init.zeros_(model.unet.out_layer[2].weight)
        nn.init.zeros_(model.unet.out_layer[2].bias)
    return model


class InterpolationStage(Stage):
    name = "interpolation"
    default_model = "interpolation_unet"
    recipe_schema = InterpolationRecipe
    reads_latents = True

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        if not self.rc.passes:
            raise ValueError("recipe.passes needs at least one pass")
        need = clip_frames_needed(self.rc)
        if cfg.data.num_frames < need:
            raise ValueError(f"data.num_frames = {cfg.data.num_frames} is too short: {self.rc.gaps} gaps of "
                             f"{self.rc.frames_per_gap} frames at stride {max(p.stride for p in self.rc.passes)} "
                             f"need {need}")
        if not 0.0 <= self.rc.uncond_prob < 1.0:
            raise ValueError(f"recipe.uncond_prob must be in [0, 1), got {self.rc.uncond_prob}")
        self.movq = load_movq(self.rc.movq, device=device).requires_grad_(False)
        ensure_latent_cache(cfg, self.movq, device)
        self.schedule = make_schedule(self.rc.diffusion, self.rc.sampling)

    def build_model(self) -> nn.Module:
        return build_interpolation_model(self.cfg)

    def phases(self, model) -> List[Phase]:
        return [video_phase(model, self.rc.spatial_lr_scale)]

    def pass_latents(self, batch: dict, step: int, n: Optional[int] = None):
        """Scaled latents (b, c, f, h, w) of the frames of one pass (chosen by step) of the first
        `n` clips of a batch, and the pass's skip_frames. Only the pass's frames are encoded."""
        p = self.rc.passes[step % len(self.rc.passes)]
        span = (self.rc.frames_per_gap + 1) * self.rc.gaps + 1
        clip = {k: batch[k][:n, :, :: p.stride][:, :, :span] for k in ("video", "latents") if k in batch}
        return clip_latents(self.movq, clip, self.rc.latent_scale, self.device), p.skip_frames

    def loss(self, model, parts, batch, step, phase):
        z, skip = self.pass_latents(batch, step)
        keys, x0 = split_gaps(z, self.rc.frames_per_gap)
        if self.rc.residual:
            x0 = x0 - gap_blend(keys, self.rc.frames_per_gap)
        b = x0.shape[0]
        uncond = torch.rand(b) < self.rc.uncond_prob
        keep = (~uncond).float().to(self.device)
        skip_t = torch.full((b,), skip, dtype=torch.long, device=self.device)
        net = parts["main"]

        def model_fn(x_t, t):
            return net(gap_input(x_t, keys, keep), t, batch["caption"], uncond, skip_frames=skip_t, temporal_mask=keep)

        loss, info = training_loss(model_fn, self.schedule, x0, **loss_options(self.rc.diffusion))
        return loss.mean(), {"interpolation/mse": float(info["mse"].mean()), f"interpolation/skip{skip}": 1.0}

    @torch.no_grad()
    def preview(self, model, batch: dict, out_dir: Path, step: int) -> List[Path]:
        """Per clip of the batch (up to 2): the true frames of the last pass above the interpolated ones."""
        from torchvision.utils import save_image

        n = min(2, len(batch["caption"]))
        true, skip = self.pass_latents(batch, len(self.rc.passes) - 1, n)
        keys, _ = split_gaps(true, self.rc.frames_per_gap)
        s = self.rc.sampling
        z = interpolate(model, self.schedule, keys, batch["caption"][:n], passes=[skip],
                        frames_per_gap=self.rc.frames_per_gap, target=self.rc.diffusion.target, sampler=s.sampler,
                        steps=self.rc.preview_steps, spacing=s.spacing, guidance=s.guidance,
                        latent_scale=self.rc.latent_scale, dynamic_threshold=s.dynamic_threshold,
                        residual=self.rc.residual, generator=torch.Generator().manual_seed(0))
        fake = decode_video(self.movq, z, self.rc.latent_scale)
        real = decode_video(self.movq, true, self.rc.latent_scale)  # the true frames through the MoVQ
        rows = torch.stack([real, fake], dim=1)  # (n, 2, 3, f, H, W)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"step_{step:07d}.png"
        save_image((rearrange(rows, "n r c f h w -> (n r f) c h w") + 1) / 2, path, nrow=real.shape[2])
        return [path]


def load_interpolation(path: Union[str, Path], which: str = "ema", device: Union[torch.device, str] = "cpu"):
    """(model, movq, cfg) of an interpolation-stage checkpoint, in eval mode."""
    from kvideo.train.checkpoint import load_stage_weights

    state, cfg = load_stage_weights(path, "interpolation", which)
    model = build_interpolation_model(cfg, load_init=False)
    model.load_state_dict(state)
    return model.to(device).eval(), load_movq(cfg.recipe.movq, device=device), cfg
