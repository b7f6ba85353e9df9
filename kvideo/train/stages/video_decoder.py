"""Stage `video_decoder`: the MoVQ decoder fine-tuned on clips with temporal layers, encoder frozen.

Starts from an image MoVQ checkpoint (`recipe.movq`): every image weight is loaded into a
`VideoMoVQ` (`kvideo.models.video_movq`), whose temporal layers start as identities, so at step 0
the video decoder decodes exactly as the image decoder. The encoder, quant_conv and codebook
stay frozen: the latents the diffusion stages produce keep their meaning. Each step encodes a
clip frame by frame, decodes it with the temporal decoder and trains

  ae    MSE + LPIPS (when local weights are configured) + `recipe.temporal_weight` times the L1
        of decoded against true frame differences (`temporal_difference_loss`) + from `recipe.gan_start` the hinge
        generator loss against a 3D PatchGAN (it sees 3-frame neighbourhoods, so flicker is
        visible to it), with the VQGAN adaptive weight;
  disc  the hinge loss of that discriminator on real and decoded clips.

`recipe.train_spatial: false` trains only the temporal layers; `recipe.spatial_lr_scale` trains
the loaded spatial decoder slower than the new temporal layers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from kvideo.inference.checkpoints import load_stage_weights
from kvideo.metrics.reconstruction import evaluate_video_decoding
from kvideo.registry import build_model
from kvideo.train.stages.autoencoder import AutoencoderGANStage, AutoencoderWithDiscriminator, build_discriminator
from kvideo.train.stages.base import Phase

log = logging.getLogger(__name__)


def video_decoder_model(cfg) -> AutoencoderWithDiscriminator:
    """The VideoMoVQ and the 3D discriminator, randomly initialised, with what the stage does not
    train frozen: the encoder, quant_conv and codebook (and, with `recipe.train_spatial: false`,
    every spatial layer). Reads no file."""
    from kvideo.models.video_movq import VideoMoVQ

    ae = build_model(cfg)
    if not isinstance(ae, VideoMoVQ):
        raise ValueError(f"stage video_decoder needs model.name: video_movq; got {cfg.model.name}")
    for part in (ae.encoder, ae.quant_conv, ae.quantize):
        part.requires_grad_(False)
    if not cfg.recipe.train_spatial:
        ae.requires_grad_(False)
        for p in ae.temporal_parameters():
            p.requires_grad_(True)
    return AutoencoderWithDiscriminator(ae, build_discriminator(cfg.recipe, cfg.model.out_channels, video=True))


def build_video_decoder(cfg) -> AutoencoderWithDiscriminator:
    """`video_decoder_model` with the image MoVQ `recipe.movq` loaded in."""
    model = video_decoder_model(cfg)
    ae = model.ae
    state, movq_cfg = load_stage_weights(cfg.recipe.movq, "movq")
    differ = {k: (movq_cfg.model[k], cfg.model[k]) for k in movq_cfg.model
              if k not in ("name", "size") and k in cfg.model and movq_cfg.model[k] != cfg.model[k]}
    if differ:
        raise ValueError(f"recipe.movq '{cfg.recipe.movq}' was trained with other model settings; set "
                         + ", ".join(f"model.{k}={a} (this config has {b})" for k, (a, b) in differ.items()))
    image = {k[len("ae."):]: v for k, v in state.items() if k.startswith("ae.")}
    missing, unexpected = ae.load_state_dict(image, strict=False)
    if unexpected or any(not k.startswith(("temporal_convs.", "temporal_attn.")) for k in missing):
        raise ValueError(f"recipe.movq '{cfg.recipe.movq}' does not match model (unexpected {unexpected[:3]}, "
                         f"missing {[k for k in missing if not k.startswith('temporal_')][:3]})")
    return model


def temporal_difference_loss(frames: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Mean |(frame_t - frame_(t-1)) - (true_t - true_(t-1))| over (b, c, f, H, W) clips."""
    return ((frames[:, :, 1:] - frames[:, :, :-1]) - (truth[:, :, 1:] - truth[:, :, :-1])).abs().mean()


class VideoDecoderStage(AutoencoderGANStage):
    name = "video_decoder"
    log_prefix = "vdec"

    def check_data(self, data) -> None:
        if data.num_frames < 2:
            raise ValueError(f"stage video_decoder trains on clips: data.num_frames must be >= 2, got {data.num_frames}")

    def build_model(self) -> nn.Module:
        return build_video_decoder(self.cfg)

    def ae_phase(self, model: AutoencoderWithDiscriminator) -> Phase:
        return Phase.new_layers_faster("ae", model.ae, model.ae.temporal_parameters(), self.rc.spatial_lr_scale)

    def loss(self, model: AutoencoderWithDiscriminator, parts, batch, step, phase) -> Tuple[torch.Tensor, Dict[str, float]]:
        video = batch["video"].to(self.device, non_blocking=True)  # (b, 3, f, H, W)
        b, _, f = video.shape[:3]
        if phase == "disc":
            return self.disc_loss(parts, video, batch)
        with torch.no_grad():
            z = model.ae.encode(rearrange(video, "b c f h w -> (b f) c h w"))  # the frozen encoder
        recon = rearrange(parts["ae"](z, num_frames=f), "(b f) c h w -> b c f h w", b=b).float()
        rec = self.rc.mse_weight * F.mse_loss(recon, video)
        logs = {"vdec/mse": float(F.mse_loss(recon.detach(), video))}
        if self.rc.temporal_weight > 0:
            td = temporal_difference_loss(recon, video)
            rec = rec + self.rc.temporal_weight * td
            logs["vdec/temporal_l1"] = float(td.detach())
        if self.lpips is not None:
            p = self.lpips(rearrange(recon, "b c f h w -> (b f) c h w"), rearrange(video, "b c f h w -> (b f) c h w")).mean()
            rec = rec + self.rc.lpips_weight * p
            logs["vdec/lpips"] = float(p)
        loss = rec
        if step >= self.rc.gan_start:
            term, gan_logs = self.generator_term(model, rec, recon, batch)
            loss = loss + term
            logs.update(gan_logs)
        return loss, logs

    @torch.no_grad()
    def preview(self, model: AutoencoderWithDiscriminator, batch: dict, out_dir: Path, step: int) -> List[Path]:
        from torchvision.utils import save_image

        video = batch["video"][:2].to(self.device)
        b = video.shape[0]
        z = model.ae.encode(rearrange(video, "b c f h w -> (b f) c h w"))
        recon = rearrange(model.ae.decode_frames(z, video.shape[2]), "(b f) c h w -> b c f h w", b=b).clamp(-1, 1)
        grid = rearrange(torch.stack([video, recon], 1), "b r c f h w -> (b r f) c h w")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"step_{step:07d}.png"
        save_image((grid + 1) / 2, path, nrow=video.shape[2])
        return [path]

    @torch.no_grad()
    def evaluate(self, model: AutoencoderWithDiscriminator, batches: Iterable[dict]) -> Dict[str, float]:
        out = evaluate_video_decoding(model.ae, batches, self.device)
        return {k: v for k, v in out.items() if k != "flicker_by_distance"}  # the training log takes scalars
