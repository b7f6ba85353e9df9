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
the pass's `skip_frames` is given to the model (an `InterpolationCondition`, with the gap layout
of kvideo.inference.gaps). With probability `recipe.uncond_prob` a sample is trained as the
unconditional branch of guidance: null text, zeroed keyframes and temporal mask 0. Sampling combines the two branches as `(w + 1) c - w u` (w = 0.5, 10 steps, "trailing").
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch
from einops import rearrange
from torch import nn

from kvideo.inference.autoencoder import clip_latents, decode_latents
from kvideo.inference.conditioning import InterpolationCondition, Prompts
from kvideo.inference.denoiser import TextDenoiser
from kvideo.inference.gaps import gap_blend, split_gaps
from kvideo.inference.sampling import InterpolationOptions, interpolate
from kvideo.train.stages.base import Phase
from kvideo.train.stages.diffusion import LatentDiffusionStage, init_from_t2i, video_phase


def clip_frames_needed(recipe) -> int:
    """Frames a training clip needs for the longest pass."""
    return (recipe.frames_per_gap + 1) * recipe.gaps * max(p.stride for p in recipe.passes) + 1


class InterpolationStage(LatentDiffusionStage):
    name = "interpolation"

    def __init__(self, cfg, device):
        rc = cfg.recipe
        if not rc.passes:
            raise ValueError("recipe.passes needs at least one pass")
        if not 0.0 <= rc.uncond_prob < 1.0:
            raise ValueError(f"recipe.uncond_prob must be in [0, 1), got {rc.uncond_prob}")
        if rc.init_convs not in ("spread", "fresh"):
            raise ValueError(f"recipe.init_convs must be 'spread' or 'fresh'; got {rc.init_convs!r}")
        super().__init__(cfg, device)

    def check_data(self, data) -> None:
        super().check_data(data)
        rc, need = self.rc, clip_frames_needed(self.rc)
        if data.num_frames < need:
            raise ValueError(f"data.num_frames = {data.num_frames} is too short: {rc.gaps} gaps of "
                             f"{rc.frames_per_gap} frames at stride {max(p.stride for p in rc.passes)} need {need}")

    def initialise(self, model: TextDenoiser) -> None:
        """The t2i checkpoint `recipe.init_from` loaded in (its input and output convs mean other
        things here: spread over the gap layout or fresh, `recipe.init_convs`); with
        `recipe.residual` the output conv starts at zero, so the untrained model gives the blend."""
        from kvideo.models.interpolation_unet import spread_image_convs

        if self.rc.init_from:
            image_state = init_from_t2i(model, self.cfg, keep_new=("in_layer.", "out_layer.2."))
            if self.rc.init_convs == "spread":
                spread_image_convs(model.unet, image_state, self.rc.frames_per_gap)
        if self.rc.residual:
            nn.init.zeros_(model.unet.out_layer[2].weight)
            nn.init.zeros_(model.unet.out_layer[2].bias)

    def phases(self, model: TextDenoiser) -> List[Phase]:
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
        cond = InterpolationCondition(Prompts(batch["caption"], uncond), keys, keep, skip)
        loss, logs = self.diffusion_loss(parts["main"], x0, cond)
        return loss, {**logs, f"interpolation/skip{skip}": 1.0}

    @torch.no_grad()
    def preview(self, model: TextDenoiser, batch: dict, out_dir: Path, step: int) -> List[Path]:
        """Per clip of the batch (up to 2): the true frames of the last pass above the interpolated ones."""
        from torchvision.utils import save_image

        n = min(2, len(batch["caption"]))
        true, skip = self.pass_latents(batch, len(self.rc.passes) - 1, n)
        keys, _ = split_gaps(true, self.rc.frames_per_gap)
        options = InterpolationOptions.from_recipe(self.cfg, steps=self.rc.preview_steps, skip_frames=[skip])
        z = interpolate(self.bundle(model), keys, batch["caption"][:n], options,
                        generator=torch.Generator().manual_seed(0))
        fake = decode_latents(self.movq, z, self.rc.latent_scale)
        real = decode_latents(self.movq, true, self.rc.latent_scale)  # the true frames through the MoVQ
        rows = torch.stack([real, fake], dim=1)  # (n, 2, 3, f, H, W)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"step_{step:07d}.png"
        save_image((rearrange(rows, "n r c f h w -> (n r f) c h w") + 1) / 2, path, nrow=real.shape[2])
        return [path]
