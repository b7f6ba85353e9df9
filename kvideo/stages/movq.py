"""Stage `movq`: the MoVQ autoencoder that every diffusion stage works in.

Two phases per step, each with its own optimizer:
  ae    reconstruction (MSE + LPIPS when local weights are configured) + codebook loss, plus,
        from `recipe.gan_start` on, the hinge generator loss with the VQGAN adaptive weight;
  disc  the hinge discriminator loss on real frames and the (detached) reconstructions,
        active from `recipe.gan_start` on.
The GAN starts late on purpose: MoVQGAN users report collapse when it is on from step 0.

Frames are trained one by one: clips (b, c, f, h, w) are folded to (b f) c h w. Every
`recipe.dead_code_every` steps, codes used less than the threshold are re-initialised from
recent encoder outputs (decided on rank 0, broadcast to every rank).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from kvideo.models.discriminator import PatchDiscriminator, adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from kvideo.models.lpips import LPIPS
from kvideo.stages.base import Phase, Stage
from kvideo.train import dist


@dataclass
class MovqRecipe:
    mse_weight: float = 1.0
    lpips_weight: float = 0.1
    lpips_weights: Optional[str] = None  # local LPIPS weights file; LPIPS is off when unset
    codebook_weight: float = 1.0
    gan_weight: float = 0.1
    gan_start: int = 10_000  # step at which the generator and discriminator GAN losses start
    adaptive_gan_weight: bool = True
    disc_layers: int = 2
    disc_channels: int = 64
    disc_norm_groups: int = 32
    disc_lr: Optional[float] = None  # None: train.lr
    disc_betas: List[float] = field(default_factory=lambda: [0.5, 0.9])
    dead_code_every: int = 200  # 0 disables dead-code restarts
    # Share of training batches whose decoder input is the quantised latent (MoVQGAN: 1.0); the
    # others decode the continuous latent, the one the diffusion stages decode at inference. The
    # codebook and commitment losses apply to every batch.
    quantize_prob: float = 1.0


class MovqTrainModule(nn.Module):
    """What the movq stage trains and checkpoints: the autoencoder and its discriminator."""

    def __init__(self, ae: nn.Module, disc: nn.Module):
        super().__init__()
        self.ae = ae
        self.disc = disc

    def set_grad_checkpointing(self, enabled: bool) -> None:
        self.ae.set_grad_checkpointing(enabled)


def frames_of(batch: dict) -> torch.Tensor:
    """The batch's frames as images: (b, c, f, h, w) -> (b f) c h w."""
    return rearrange(batch["video"], "b c f h w -> (b f) c h w")


@torch.no_grad()
def clip_latents(movq: nn.Module, batch: dict, latent_scale: float, device: torch.device) -> torch.Tensor:
    """A batch's clips as scaled MoVQ latents (b, c, f, h, w): the cached latents when the data
    came from `data.latent_cache`, else its frames (b, 3, f, H, W) encoded now."""
    if "latents" in batch:
        z = batch["latents"].to(device, non_blocking=True).float()
    else:
        video = batch["video"].to(device, non_blocking=True)
        z = rearrange(movq.encode(rearrange(video, "b c f h w -> (b f) c h w")).float(), "(b f) c h w -> b c f h w",
                      b=video.shape[0])
    return z * latent_scale


def ensure_latent_cache(cfg, movq: nn.Module, device: torch.device) -> None:
    """Build `cfg.data.latent_cache` (when set) from `cfg.data.shards` with the stage's frozen
    MoVQ; a no-op when it is complete, an error when it holds another MoVQ's latents."""
    if not cfg.data.get("latent_cache"):
        return
    from kvideo.data.latent_cache import build_latent_cache
    from kvideo.train.engine import autocast_context

    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) \
        if torch.distributed.is_initialized() else (0, 1)
    build_latent_cache(cfg.data.latent_cache, cfg.data.shards, movq, cfg.recipe.movq, cfg.data.size, device=device,
                       autocast=autocast_context(cfg.train.precision, device, logging.getLogger(__name__)),
                       rank=rank, world_size=world)
    dist.barrier()


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(4.0 / mse)


class MovqStage(Stage):
    name = "movq"
    default_model = "movq"
    recipe_schema = MovqRecipe

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.lpips = LPIPS(self.rc.lpips_weights).to(device) if self.rc.lpips_weights else None
        self._recon: Dict[int, torch.Tensor] = {}

    # -- model and phases ------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        from kvideo.registry import build_model

        ae = build_model(self.cfg)
        disc = PatchDiscriminator(in_channels=self.cfg.model.out_channels, ndf=self.rc.disc_channels,
                                  n_layers=self.rc.disc_layers, norm_groups=self.rc.disc_norm_groups)
        return MovqTrainModule(ae, disc)

    def phases(self, model: MovqTrainModule) -> List[Phase]:
        return [Phase("ae", model.ae),
                Phase("disc", model.disc, lr=self.rc.disc_lr, betas=tuple(self.rc.disc_betas))]

    def phase_active(self, phase: str, step: int) -> bool:
        return phase == "ae" or step >= self.rc.gan_start

    # -- losses ----------------------------------------------------------------------------------

    def loss(self, model: MovqTrainModule, parts, batch, step, phase) -> Tuple[torch.Tensor, Dict[str, float]]:
        x = frames_of(batch).to(self.device, non_blocking=True)
        if phase == "disc":
            recon = self._recon.pop(id(batch))
            d_loss = hinge_d_loss(parts["disc"](x), parts["disc"](recon))
            return d_loss, {"disc/hinge": d_loss.detach()}

        continuous = bool(torch.rand(()) >= self.rc.quantize_prob)
        recon, vq_loss, info = parts["ae"](x, decode_continuous=continuous)
        recon = recon.float()
        rec = self.rc.mse_weight * F.mse_loss(recon, x)
        logs = {"ae/mse": F.mse_loss(recon.detach(), x), "ae/vq": vq_loss.detach()}
        if self.lpips is not None:
            p = self.lpips(recon, x).mean()
            rec = rec + self.rc.lpips_weight * p
            logs["ae/lpips"] = p.detach()
        loss = rec + self.rc.codebook_weight * vq_loss
        if step >= self.rc.gan_start:
            model.disc.requires_grad_(False)  # the generator step does not train the discriminator
            g_loss = hinge_g_loss(model.disc(recon))
            model.disc.requires_grad_(True)
            weight = torch.tensor(1.0, device=x.device)
            if self.rc.adaptive_gan_weight and torch.is_grad_enabled():
                weight = adaptive_gan_weight(rec, g_loss, model.ae.last_layer_weight())
            loss = loss + self.rc.gan_weight * weight * g_loss
            logs.update({"ae/g_loss": g_loss.detach(), "ae/gan_weight": weight.detach()})
            self._recon[id(batch)] = recon.detach()
        return loss, {k: float(v) for k, v in logs.items()}

    def after_step(self, model: MovqTrainModule, step: int, batches: List[dict]) -> Dict[str, float]:
        self._recon.clear()
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

    # -- previews and evaluation -----------------------------------------------------------------

    @torch.no_grad()
    def preview(self, model: MovqTrainModule, batch: dict, out_dir: Path, step: int) -> List[Path]:
        from torchvision.utils import save_image

        x = frames_of(batch)[:8].to(self.device)
        recon = model.ae.decode(model.ae.encode(x))
        grid = torch.cat([x, recon.float().clamp(-1, 1)])
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"step_{step:07d}.png"
        save_image((grid + 1) / 2, path, nrow=len(x))
        return [path]

    @torch.no_grad()
    def evaluate(self, model: MovqTrainModule, batches: Iterable[dict]) -> Dict[str, float]:
        return evaluate_reconstruction(model.ae, batches, self.device)


@torch.no_grad()
def evaluate_reconstruction(ae: nn.Module, batches: Iterable[dict], device: torch.device) -> Dict[str, float]:
    """Mean PSNR of encode -> decode through the continuous latent (the path diffusion uses) and
    through the quantised one, and the codebook usage on these frames."""
    cont, quant, n = 0.0, 0.0, 0
    for batch in batches:
        x = frames_of(batch).to(device)
        z = ae.encode(x)
        cont += float(psnr(ae.decode(z).clamp(-1, 1), x).sum())
        zq, _, _ = ae.quantize(z)
        quant += float(psnr(ae.decode(zq).clamp(-1, 1), x).sum())
        n += len(x)
    if n == 0:
        raise ValueError("evaluate_reconstruction: no decodable frames")
    return {"psnr": cont / n, "psnr_quantized": quant / n, "frames": float(n)}


def load_movq(path: str | Path, which: str = "ema", device: torch.device | str = "cpu") -> nn.Module:
    """The autoencoder of a movq-stage checkpoint (a checkpoint dir, a run dir or a weights
    file), in eval mode. Later stages use it frozen to encode frames and decode latents."""
    from kvideo.config import model_config
    from kvideo.models.movq import MoVQ
    from kvideo.train.checkpoint import load_stage_weights

    state, cfg = load_stage_weights(path, "movq", which)
    ae = MoVQ(model_config(cfg))
    ae.load_state_dict({k[len("ae."):]: v for k, v in state.items() if k.startswith("ae.")})
    return ae.to(device).eval()
