"""The base of the autoencoder + GAN stages (movq, video_decoder).

Two phases per step, each with its own optimizer:
  ae    the stage's reconstruction loss, plus, from `recipe.gan_start` on, the hinge generator
        loss against the discriminator with the VQGAN adaptive weight (`generator_term`);
  disc  the hinge discriminator loss on real frames and the (detached) reconstructions of the
        same batch, active from `recipe.gan_start` on.
The GAN starts late on purpose: MoVQGAN users report collapse when it is on from step 0.
LPIPS joins the reconstruction loss when `recipe.lpips_weights` names a local weights file.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from kvideo.models.discriminator import PatchDiscriminator, adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from kvideo.train.stages.base import Phase, Stage


class AutoencoderWithDiscriminator(nn.Module):
    """What an autoencoder stage trains and checkpoints: the autoencoder (`ae.*`) and its
    discriminator (`disc.*`)."""

    def __init__(self, ae: nn.Module, disc: nn.Module):
        super().__init__()
        self.ae = ae
        self.disc = disc

    def set_grad_checkpointing(self, enabled: bool) -> None:
        self.ae.set_grad_checkpointing(enabled)


def build_discriminator(recipe, in_channels: int, video: bool = False) -> PatchDiscriminator:
    """The PatchGAN of a recipe's disc_* keys (3D, over frame neighbourhoods, for `video`)."""
    return PatchDiscriminator(in_channels=in_channels, ndf=recipe.disc_channels, n_layers=recipe.disc_layers,
                              norm_groups=recipe.disc_norm_groups, video=video)


class AutoencoderGANStage(Stage):
    """A stage whose model is an `AutoencoderWithDiscriminator`; subclasses give the autoencoder's
    phase (`ae_phase`) and the reconstruction loss, and call `generator_term` and `keep_for_disc`."""

    log_prefix = "ae"

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.lpips = None
        if self.rc.lpips_weights:
            from kvideo.weights import load_lpips

            self.lpips = load_lpips(self.rc.lpips_weights).to(device)
        self._recon: Dict[int, torch.Tensor] = {}

    def ae_phase(self, model: AutoencoderWithDiscriminator) -> Phase:
        return Phase("ae", model.ae)

    def phases(self, model: AutoencoderWithDiscriminator) -> List[Phase]:
        return [self.ae_phase(model),
                Phase("disc", model.disc, lr=self.rc.disc_lr, betas=tuple(self.rc.disc_betas))]

    def phase_active(self, phase: str, step: int) -> bool:
        return phase == "ae" or step >= self.rc.gan_start

    def size_multiple(self, model: AutoencoderWithDiscriminator) -> int:
        return model.ae.downsample_factor

    def disc_loss(self, parts: Dict[str, nn.Module], real: torch.Tensor, batch: dict) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The discriminator's hinge loss on `real` and the reconstructions the ae phase kept."""
        d_loss = hinge_d_loss(parts["disc"](real), parts["disc"](self._recon.pop(id(batch))))
        return d_loss, {"disc/hinge": float(d_loss.detach())}

    def generator_term(self, model: AutoencoderWithDiscriminator, rec: torch.Tensor, recon: torch.Tensor,
                       batch: dict) -> Tuple[torch.Tensor, Dict[str, float]]:
        """gan_weight * adaptive weight * hinge generator loss of `recon`, to add to the reconstruction
        loss `rec` (from `recipe.gan_start` on); keeps `recon` for the discriminator phase."""
        # The generator step does not train the discriminator: the gradients this backward leaves on
        # its weights are dropped when the disc phase zeroes them. (Switching its requires_grad off
        # around this call would save that work, but under FSDP the flag would reach only the
        # gathered copies of its weights, not the shards its next forward gathers from.)
        g_loss = hinge_g_loss(model.disc(recon))
        weight = torch.tensor(1.0, device=recon.device)
        last = model.ae.last_layer_weight()
        if self.rc.adaptive_gan_weight and torch.is_grad_enabled() and last.requires_grad:
            weight = adaptive_gan_weight(rec, g_loss, last)
        self._recon[id(batch)] = recon.detach()
        return self.rc.gan_weight * weight * g_loss, {f"{self.log_prefix}/g_loss": float(g_loss.detach()),
                                                      f"{self.log_prefix}/gan_weight": float(weight.detach())}

    def after_step(self, model, step: int, batches: List[dict]) -> Dict[str, float]:
        self._recon.clear()
        return {}
