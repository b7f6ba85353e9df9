"""Stage `t2i`: the text-to-image first-frame model (Kandinsky 3.0 UNet + open_clip text encoder).

Trains on single frames from the shards, in the continuous latent space of a frozen MoVQ
(`recipe.movq`, a movq-stage checkpoint or run directory): frames -> MoVQ.encode -> latents x0,
then the denoising loss of `kvideo.diffusion.training_loss`. The text context of a share
`recipe.text_dropout` of the samples is replaced by the learned null context, so one model
gives both branches of classifier-free guidance.

The MoVQ stays outside the trained model (it is not in the checkpoints; the config names it).
The text tower is frozen by default; its projection and null embedding train with the UNet.
`sample_images` is the one sampling path, used by previews and by `sample.py --stage t2i`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from einops import rearrange
from omegaconf import MISSING
from torch import nn

from kvideo.diffusion import SAMPLERS, Schedule, plan_timesteps, text_guided, training_loss
from kvideo.models.text_encoder import TextEncoder, TextEncoderConfig
from kvideo.stages.base import Phase, Stage
from kvideo.stages.movq import clip_latents, ensure_latent_cache, load_movq

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Recipe
# ----------------------------------------------------------------------------------------------


@dataclass
class DiffusionConfig:
    schedule: str = "squaredcos_cap_v2"
    num_steps: int = 1000
    zero_terminal_snr: bool = True
    target: str = "eps"  # eps | v | x0
    weighting: Optional[str] = None  # None | min_snr
    min_snr_gamma: float = 5.0
    # Training timesteps skewed toward high noise (kvideo.diffusion.losses.draw_timesteps); 1 = uniform.
    # (The inference timesteps have a shift of their own: recipe.sampling.timestep_shift.)
    timestep_shift: float = 1.0


@dataclass
class SamplingConfig:
    """Defaults of previews and of sample.py (each overridable on its command line)."""

    sampler: str = "ddpm"  # ddpm | ddim | dpmpp_2m
    steps: int = 50
    spacing: str = "leading"
    timestep_shift: float = 1.0  # inference timesteps moved toward noise (Schedule.timesteps); 1 = none
    guidance: float = 5.0  # Kandinsky convention: (w + 1) * cond - w * uncond
    dynamic_threshold: Optional[float] = 0.995  # percentile; None disables


@dataclass
class T2IRecipe:
    movq: str = MISSING  # movq-stage checkpoint (run dir, checkpoint dir or weights file)
    latent_scale: float = 1.0  # latents = scale * MoVQ.encode(x); Kandinsky uses them unscaled
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    text_dropout: float = 0.1  # share of samples trained with the null (unconditional) context
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    preview_prompts: List[str] = field(default_factory=lambda: [
        "a red circle standing still on a black background",
        "a blue square moving left quickly on a white background",
        "a yellow triangle moving up slowly on a gray background",
        "a green circle moving right quickly on a black background",
    ])
    preview_steps: int = 15  # previews use DPM-Solver++(2M) with this many steps


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class T2IModel(nn.Module):
    """What the t2i stage trains and checkpoints: the UNet and the text encoder. The keyframe and
    interpolation stages train the same pair with a video UNet.

    forward(x_t, t, prompts, drop) -> prediction: the network function of training, with the
    context of the samples where `drop` (b,) is True replaced by the null context.
    """

    def __init__(self, unet: nn.Module, text: TextEncoder):
        super().__init__()
        self.unet = unet
        self.text = text

    def context(self, prompts: Sequence[str], drop: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(tokens (b, n, d), mask (b, n)) for prompts; rows where `drop` is True get the null context."""
        tokens, mask = self.text(list(prompts))
        if drop is not None and bool(drop.any()):
            null_tokens, null_mask = self.text.null_context(len(prompts))
            keep = ~drop.to(tokens.device)
            tokens = torch.where(keep[:, None, None], tokens, null_tokens)
            mask = torch.where(keep[:, None], mask, null_mask)
        return tokens, mask

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, prompts: Sequence[str],
                drop: Optional[torch.Tensor] = None, **unet_kwargs) -> torch.Tensor:
        """`unet_kwargs` go to the UNet unchanged (the video stages' conditioning)."""
        tokens, mask = self.context(prompts, drop)
        return self.unet(x_t, t, tokens, mask, **unet_kwargs)

    def set_grad_checkpointing(self, enabled: bool) -> None:
        self.unet.set_grad_checkpointing(enabled)


def build_t2i_model(cfg) -> T2IModel:
    """The UNet named by `cfg.model` and the text encoder of `cfg.recipe.text_encoder`."""
    from kvideo.config import model_config
    from kvideo.registry import MODELS

    unet_cfg = model_config(cfg)
    text_cfg = TextEncoderConfig(**{k: cfg.recipe.text_encoder[k] for k in TextEncoderConfig.__dataclass_fields__})
    if text_cfg.out_dim != unet_cfg.context_dim:
        raise ValueError(f"recipe.text_encoder.out_dim ({text_cfg.out_dim}) must equal model.context_dim "
                         f"({unet_cfg.context_dim}): the UNet attends to the projected text tokens")
    return T2IModel(MODELS[cfg.model.name].build(unet_cfg), TextEncoder(text_cfg))


def init_from_t2i(model: T2IModel, cfg, keep_new: Sequence[str] = ()) -> Dict[str, torch.Tensor]:
    """Load the t2i checkpoint `cfg.recipe.init_from` into a video stage's model: its UNet as the
    spatial layers (`kvideo.models.video_unet.load_image_weights`; `keep_new` prefixes stay
    freshly initialised) and its text encoder, which must have the same `recipe.text_encoder`.
    Returns the t2i UNet's weights (for a stage that derives its new layers from them)."""
    from kvideo.models.video_unet import load_image_weights
    from kvideo.train.checkpoint import load_stage_weights

    state, t2i_cfg = load_stage_weights(cfg.recipe.init_from, "t2i")
    if dict(t2i_cfg.recipe.text_encoder) != dict(cfg.recipe.text_encoder):
        raise ValueError(f"recipe.text_encoder differs from the one of recipe.init_from '{cfg.recipe.init_from}': "
                         f"{dict(cfg.recipe.text_encoder)} vs {dict(t2i_cfg.recipe.text_encoder)}")
    unet_state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    report = load_image_weights(model.unet, unet_state, keep_new=keep_new)
    model.text.load_state_dict({k[len("text."):]: v for k, v in state.items() if k.startswith("text.")})
    log.info("%s: loaded %d spatial tensors from %s (%d widened, %d new)", cfg.stage, len(report["loaded"]),
             cfg.recipe.init_from, len(report["widened"]), len(report["new"]))
    return unet_state


def video_phase(model: T2IModel, spatial_lr_scale: float) -> Phase:
    """The one optimizer phase of a video stage initialised from t2i: the spatial layers and the
    text encoder (everything but `model.unet.temporal_parameters()`) train at `spatial_lr_scale`
    times train.lr, the new temporal layers at train.lr."""
    return Phase.new_layers_faster("main", model, model.unet.temporal_parameters(), spatial_lr_scale)


def make_schedule(diffusion_cfg, sampling_cfg=None) -> Schedule:
    """The stage's noise schedule. With `sampling_cfg` (the stage's recipe.sampling) it samples
    with that config's timestep shift, and a sampling plan the model cannot follow (an eps model
    asked to start at the zero-SNR timestep) is an error now, not at the first preview."""
    schedule = Schedule.from_name(diffusion_cfg.schedule, diffusion_cfg.num_steps,
                                  zero_terminal_snr=diffusion_cfg.zero_terminal_snr,
                                  timestep_shift=1.0 if sampling_cfg is None else sampling_cfg.timestep_shift)
    if sampling_cfg is not None:
        try:
            plan_timesteps(schedule, sampling_cfg.steps, sampling_cfg.spacing, diffusion_cfg.target)
        except ValueError as e:
            raise ValueError(f"recipe.sampling (spacing '{sampling_cfg.spacing}') with recipe.diffusion "
                             f"(target '{diffusion_cfg.target}'): {e}") from None
    return schedule


def loss_options(diffusion_cfg) -> dict:
    """The `training_loss` keywords a DiffusionConfig sets (target, weighting, timestep shift)."""
    return {"target": diffusion_cfg.target, "weighting": diffusion_cfg.weighting,
            "min_snr_gamma": diffusion_cfg.min_snr_gamma, "timestep_shift": diffusion_cfg.timestep_shift}


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_images(model: T2IModel, movq: nn.Module, schedule: Schedule, prompts: Sequence[str], *,
                  height: int, width: int, target: str, latent_scale: float = 1.0, sampler: str = "ddpm",
                  steps: int = 50, spacing: str = "leading", guidance: float = 5.0,
                  negative_prompt: Optional[str] = None, dynamic_threshold: Optional[float] = None,
                  generator: Optional[torch.Generator] = None, callback=None) -> torch.Tensor:
    """Images (b, 3, height, width) in [-1, 1] for `prompts`, with classifier-free guidance.

    The unconditional branch is the null context, or the context of `negative_prompt` when one
    is given (so the negative prompt really steers away). Noise comes from `generator` only.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}'; choose from {', '.join(SAMPLERS)}")
    device = next(model.parameters()).device
    f = movq.downsample_factor
    if height % f or width % f:
        raise ValueError(f"image size {height}x{width} is not divisible by the MoVQ factor {f}")
    b = len(prompts)
    tokens, mask = model.context(prompts)
    if negative_prompt:
        neg_tokens, neg_mask = model.context([negative_prompt] * b)
    else:
        neg_tokens, neg_mask = model.text.null_context(b)
    net = text_guided(model.unet, {"context": tokens, "context_mask": mask},
                      {"context": neg_tokens, "context_mask": neg_mask}, guidance)
    shape = (b, movq.cfg.embed_dim, height // f, width // f)
    gen_device = generator.device if generator is not None else device
    x_T = torch.randn(shape, generator=generator, device=gen_device).to(device)
    kwargs = dict(steps=steps, spacing=spacing, target=target, dynamic_threshold=dynamic_threshold,
                  data_range=latent_scale, callback=callback)
    if sampler != "dpmpp_2m":
        kwargs["generator"] = generator
    latents = SAMPLERS[sampler](net, schedule, x_T, **kwargs)
    return movq.decode(latents / latent_scale).clamp(-1, 1)


# ----------------------------------------------------------------------------------------------
# Stage
# ----------------------------------------------------------------------------------------------


class T2IStage(Stage):
    name = "t2i"
    default_model = "unet"
    recipe_schema = T2IRecipe
    reads_latents = True

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        if not 0.0 <= self.rc.text_dropout < 1.0:
            raise ValueError(f"recipe.text_dropout must be in [0, 1), got {self.rc.text_dropout}")
        self.movq = load_movq(self.rc.movq, device=device).requires_grad_(False)
        ensure_latent_cache(cfg, self.movq, device)
        self.schedule = make_schedule(self.rc.diffusion, self.rc.sampling)

    def build_model(self) -> nn.Module:
        return build_t2i_model(self.cfg)

    def phases(self, model: T2IModel) -> List[Phase]:
        return [Phase("main", model)]

    def latents(self, batch: dict) -> torch.Tensor:
        """The batch's frames as scaled continuous MoVQ latents, one image each: (b f) c h w."""
        z = clip_latents(self.movq, batch, self.rc.latent_scale, self.device)
        return rearrange(z, "b c f h w -> (b f) c h w")

    def loss(self, model, parts, batch, step, phase):
        x0 = self.latents(batch)
        captions = [c for c in batch["caption"] for _ in range(x0.shape[0] // len(batch["caption"]))]
        drop = torch.rand(len(captions)) < self.rc.text_dropout
        loss, info = training_loss(lambda x, t: parts["main"](x, t, captions, drop), self.schedule, x0,
                                   **loss_options(self.rc.diffusion))
        return loss.mean(), {"t2i/mse": float(info["mse"].mean()), "t2i/latent_std": float(x0.std())}

    @torch.no_grad()
    def preview(self, model: T2IModel, batch: dict, out_dir: Path, step: int) -> List[Path]:
        from torchvision.utils import save_image

        h, w = self.cfg.data.size
        images = sample_images(model, self.movq, self.schedule, list(self.rc.preview_prompts), height=h, width=w,
                               target=self.rc.diffusion.target, latent_scale=self.rc.latent_scale,
                               sampler="dpmpp_2m", steps=self.rc.preview_steps, spacing=self.rc.sampling.spacing,
                               guidance=self.rc.sampling.guidance,
                               dynamic_threshold=self.rc.sampling.dynamic_threshold,
                               generator=torch.Generator().manual_seed(0))
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"step_{step:07d}.png"
        save_image((images + 1) / 2, path, nrow=len(images))
        return [path]


def load_t2i(path: str | Path, which: str = "ema", device: torch.device | str = "cpu"):
    """(model, movq, cfg) of a t2i-stage checkpoint, in eval mode; the MoVQ is the one its
    config names."""
    from kvideo.train.checkpoint import load_stage_weights

    state, cfg = load_stage_weights(path, "t2i", which)
    model = build_t2i_model(cfg)
    model.load_state_dict(state)
    movq = load_movq(cfg.recipe.movq, device=device)
    return model.to(device).eval(), movq, cfg
