"""Stage `t2i`: the text-to-image first-frame model (Kandinsky 3.0 UNet + open_clip text encoder).

Trains on single frames from the shards, in the continuous latent space of a frozen MoVQ
(`recipe.movq`, a movq-stage checkpoint or run directory): frames -> MoVQ.encode -> latents x0,
then the denoising loss of `kvideo.diffusion.training_loss` under an `ImageCondition`. The text of
a share `recipe.text_dropout` of the samples is dropped to the learned null context, so one model
gives both branches of classifier-free guidance. With `model.identity_attention` each frame also
gets its clip's reference images (an `IdentityCondition`; `recipe.identity`).

The MoVQ stays outside the trained model (it is not in the checkpoints; the config names it).
The text tower is frozen by default; its projection and null embedding train with the UNet.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import torch
from einops import rearrange

from kvideo.inference.conditioning import ImageCondition, Prompts
from kvideo.inference.denoiser import TextDenoiser
from kvideo.inference.sampling import FirstFrameOptions, sample_first_frames
from kvideo.train.stages.base import Phase
from kvideo.train.stages.diffusion import LatentDiffusionStage, with_identity


class T2IStage(LatentDiffusionStage):
    name = "t2i"

    def __init__(self, cfg, device):
        if not 0.0 <= cfg.recipe.text_dropout < 1.0:
            raise ValueError(f"recipe.text_dropout must be in [0, 1), got {cfg.recipe.text_dropout}")
        super().__init__(cfg, device)

    def phases(self, model: TextDenoiser) -> List[Phase]:
        return [Phase("main", model)]

    def loss(self, model, parts, batch, step, phase):
        x0 = rearrange(self.latents(batch), "b c f h w -> (b f) c h w")  # one image per frame
        repeats = x0.shape[0] // len(batch["caption"])
        captions = [c for c in batch["caption"] for _ in range(repeats)]
        drop = torch.rand(len(captions)) < self.rc.text_dropout
        refs = self.references(batch, repeats)
        cond = with_identity(ImageCondition(Prompts(self.unnamed(captions, batch, refs), drop)), refs)
        loss, logs = self.diffusion_loss(parts["main"], x0, cond)
        return loss, {**logs, "t2i/latent_std": float(x0.std())}

    @torch.no_grad()
    def preview(self, model: TextDenoiser, batch: dict, out_dir: Path, step: int) -> List[Path]:
        from torchvision.utils import save_image

        options = FirstFrameOptions.from_recipe(self.cfg, sampler="dpmpp_2m", steps=self.rc.preview_steps)
        images = sample_first_frames(self.bundle(model), list(self.rc.preview_prompts), options,
                                     generator=torch.Generator().manual_seed(0))
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"step_{step:07d}.png"
        save_image((images + 1) / 2, path, nrow=len(images))
        return [path]
