"""Stage `movq`: the MoVQ autoencoder that every diffusion stage works in.

The two phases of `AutoencoderGANStage`; the ae phase's reconstruction loss is MSE + LPIPS (when
local weights are configured) + the codebook loss, + with `recipe.scale_equivariance.weight` the
decoder's MSE on latent and image downsampled alike (`kvideo.models.movq.downsample`). Frames
are trained one by one: clips (b, c, f, h, w) are folded to (b f) c h w. Every
`recipe.dead_code_every` steps, codes used less than the threshold are re-initialised from
recent encoder outputs (decided on rank 0, broadcast to every rank).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from kvideo.metrics.reconstruction import evaluate_reconstruction, frames_of
from kvideo.models.movq import downsample
from kvideo.registry import build_model
from kvideo.train import dist
from kvideo.train.stages.autoencoder import AutoencoderGANStage, AutoencoderWithDiscriminator, build_discriminator


class MovqStage(AutoencoderGANStage):
    name = "movq"

    def build_model(self) -> nn.Module:
        return AutoencoderWithDiscriminator(build_model(self.cfg), build_discriminator(self.rc, self.cfg.model.out_channels))

    def loss(self, model: AutoencoderWithDiscriminator, parts, batch, step, phase) -> Tuple[torch.Tensor, Dict[str, float]]:
        x = frames_of(batch).to(self.device, non_blocking=True)
        if phase == "disc":
            return self.disc_loss(parts, x, batch)

        continuous = bool(torch.rand(()) >= self.rc.quantize_prob)
        se = self.rc.scale_equivariance
        factor = se.factors[int(torch.randint(len(se.factors), ()))] if se.weight > 0 else 1
        recon, vq_loss, info = parts["ae"](x, decode_continuous=continuous, scale_down=factor)
        recon = recon.float()
        rec = self.rc.mse_weight * F.mse_loss(recon, x)
        logs = {"ae/mse": float(F.mse_loss(recon.detach(), x)), "ae/vq": float(vq_loss.detach())}
        if factor > 1:  # the decoder draws the downsampled image from the downsampled latent
            down = F.mse_loss(info["recon_down"].float(), downsample(x, factor))
            rec = rec + se.weight * down
            logs["ae/scale_equivariance"] = float(down.detach())
        if self.lpips is not None:
            p = self.lpips(recon, x).mean()
            rec = rec + self.rc.lpips_weight * p
            logs["ae/lpips"] = float(p.detach())
        loss = rec + self.rc.codebook_weight * vq_loss
        if step >= self.rc.gan_start:
            term, gan_logs = self.generator_term(model, rec, recon, batch)
            loss = loss + term
            logs.update(gan_logs)
        return loss, logs

    def after_step(self, model: AutoencoderWithDiscriminator, step: int, batches: List[dict]) -> Dict[str, float]:
        super().after_step(model, step, batches)
        quantizer = model.ae.quantize
        out = {f"codebook/{k}": float(v) for k, v in quantizer.codebook_usage().items()}
        every = self.rc.dead_code_every
        if every > 0 and (step + 1) % every == 0:
            restarted = 0
            if not dist.dist.is_initialized() or dist.dist.get_rank() == 0:
                with torch.no_grad():
                    z = model.ae.encode(frames_of(batches[-1]).to(self.device))  # (b, c, h, w)
                restarted = quantizer.restart_dead_codes(rearrange(z.float(), "b c h w -> (b h w) c"))
            names = [f"ae.quantize.{n}" for n, _ in quantizer.named_parameters()] + \
                    [f"ae.quantize.{n}" for n, _ in quantizer.named_buffers()]
            dist.broadcast_module_(model, names)
            out["codebook/restarted"] = float(restarted)
        return out

    @torch.no_grad()
    def preview(self, model: AutoencoderWithDiscriminator, batch: dict, out_dir: Path, step: int) -> List[Path]:
        from torchvision.utils import save_image

        x = frames_of(batch)[:8].to(self.device)
        recon = model.ae.decode(model.ae.encode(x))
        grid = torch.cat([x, recon.float().clamp(-1, 1)])
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"step_{step:07d}.png"
        save_image((grid + 1) / 2, path, nrow=len(x))
        return [path]

    @torch.no_grad()
    def evaluate(self, model: AutoencoderWithDiscriminator, batches: Iterable[dict]) -> Dict[str, float]:
        return evaluate_reconstruction(model.ae, batches, self.device)
