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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from omegaconf import MISSING
from torch import nn

from kvideo.models.discriminator import PatchDiscriminator, adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from kvideo.models.lpips import LPIPS
from kvideo.stages.base import Phase, Stage
from kvideo.stages.movq import psnr

log = logging.getLogger(__name__)


@dataclass
class VideoDecoderRecipe:
    movq: str = MISSING  # the image movq-stage checkpoint this decoder starts from (and whose encoder it keeps)
    train_spatial: bool = True  # false: only the temporal layers train
    spatial_lr_scale: float = 1.0  # learning rate of the loaded spatial decoder, times train.lr (the temporal layers': train.lr)
    mse_weight: float = 1.0
    # L1 between the decoded and the true frame-to-frame differences: penalises change the clip
    # does not have (flicker on a static background) and missing change alike. 0: off (release).
    temporal_weight: float = 0.0
    lpips_weight: float = 0.1
    lpips_weights: Optional[str] = None
    gan_weight: float = 0.1
    gan_start: int = 2_000
    adaptive_gan_weight: bool = True
    disc_layers: int = 2
    disc_channels: int = 64
    disc_norm_groups: int = 32
    disc_lr: Optional[float] = None
    disc_betas: List[float] = field(default_factory=lambda: [0.5, 0.9])
    decode_window: Optional[int] = None  # frames per window when decoding long videos (None: whole)
    decode_overlap: int = 4


class VideoDecoderTrainModule(nn.Module):
    def __init__(self, ae: nn.Module, disc: nn.Module):
        super().__init__()
        self.ae = ae
        self.disc = disc


def build_video_decoder(cfg, load_init: bool = True) -> VideoDecoderTrainModule:
    from kvideo.models.video_movq import VideoMoVQ
    from kvideo.registry import build_model
    from kvideo.train.checkpoint import load_stage_weights

    ae = build_model(cfg)
    if not isinstance(ae, VideoMoVQ):
        raise ValueError(f"stage video_decoder needs model.name: video_movq; got {cfg.model.name}")
    if load_init:
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
    for part in (ae.encoder, ae.quant_conv, ae.quantize):
        part.requires_grad_(False)
    if not cfg.recipe.train_spatial:
        ae.requires_grad_(False)
        for p in ae.temporal_parameters():
            p.requires_grad_(True)
    rc = cfg.recipe
    disc = PatchDiscriminator(in_channels=cfg.model.out_channels, ndf=rc.disc_channels, n_layers=rc.disc_layers,
                              norm_groups=rc.disc_norm_groups, video=True)
    return VideoDecoderTrainModule(ae, disc)


class VideoDecoderStage(Stage):
    name = "video_decoder"
    default_model = "video_movq"
    recipe_schema = VideoDecoderRecipe

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        if cfg.data.num_frames < 2:
            raise ValueError(f"stage video_decoder trains on clips: data.num_frames must be >= 2, got {cfg.data.num_frames}")
        self.lpips = LPIPS(self.rc.lpips_weights).to(device) if self.rc.lpips_weights else None
        self._recon: Dict[int, torch.Tensor] = {}

    def build_model(self) -> nn.Module:
        return build_video_decoder(self.cfg)

    def phases(self, model: VideoDecoderTrainModule) -> List[Phase]:
        ae = Phase.new_layers_faster("ae", model.ae, model.ae.temporal_parameters(), self.rc.spatial_lr_scale)
        return [ae, Phase("disc", model.disc, lr=self.rc.disc_lr, betas=tuple(self.rc.disc_betas))]

    def phase_active(self, phase: str, step: int) -> bool:
        return phase == "ae" or step >= self.rc.gan_start

    def loss(self, model: VideoDecoderTrainModule, parts, batch, step, phase) -> Tuple[torch.Tensor, Dict[str, float]]:
        video = batch["video"].to(self.device, non_blocking=True)  # (b, 3, f, H, W)
        b, _, f = video.shape[:3]
        if phase == "disc":
            recon = self._recon.pop(id(batch))
            return hinge_d_loss(parts["disc"](video), parts["disc"](recon)), {}
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
            model.disc.requires_grad_(False)
            g_loss = hinge_g_loss(model.disc(recon))
            model.disc.requires_grad_(True)
            weight = torch.tensor(1.0, device=video.device)
            if self.rc.adaptive_gan_weight and torch.is_grad_enabled() and model.ae.last_layer_weight().requires_grad:
                weight = adaptive_gan_weight(rec, g_loss, model.ae.last_layer_weight())
            loss = loss + self.rc.gan_weight * weight * g_loss
            logs.update({"vdec/g_loss": float(g_loss.detach()), "vdec/gan_weight": float(weight)})
            self._recon[id(batch)] = recon.detach()
        return loss, logs

    def after_step(self, model, step: int, batches: List[dict]) -> Dict[str, float]:
        self._recon.clear()
        return {}

    @torch.no_grad()
    def preview(self, model: VideoDecoderTrainModule, batch: dict, out_dir: Path, step: int) -> List[Path]:
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
    def evaluate(self, model: VideoDecoderTrainModule, batches: Iterable[dict]) -> Dict[str, float]:
        out = evaluate_video_decoding(model.ae, batches, self.device)
        return {k: v for k, v in out.items() if k != "flicker_by_distance"}  # the training log takes scalars


def temporal_difference_loss(frames: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Mean |(frame_t - frame_(t-1)) - (true_t - true_(t-1))| over (b, c, f, H, W) clips."""
    return ((frames[:, :, 1:] - frames[:, :, :-1]) - (truth[:, :, 1:] - truth[:, :, :-1])).abs().mean()


FLICKER_BANDS = (1, 2, 4, 8, 16)  # px (chessboard distance) from the nearest pixel that moves


def static_background_flicker(frames: torch.Tensor, truth: torch.Tensor, threshold: float = 1e-3) -> torch.Tensor:
    """Mean |frame_t - frame_(t-1)| of decoded `frames` (b, c, f, H, W) over the pixels that are
    static in `truth` (unchanged, within `threshold`, between the same two frames in every channel)."""
    sums, counts = flicker_by_distance(frames, truth, threshold=threshold)
    return sums.sum() / counts.sum().clamp(min=1)


def flicker_by_distance(frames: torch.Tensor, truth: torch.Tensor, bands=FLICKER_BANDS,
                        threshold: float = 1e-3) -> Tuple[torch.Tensor, torch.Tensor]:
    """Static-background flicker split by distance from motion: (sums, counts), each of length
    len(bands) + 1, over the static pixels at distance (0, bands[0]], (bands[0], bands[1]], ...
    and beyond the last band (or in a frame pair where nothing moves). Where the flicker sits
    says what causes it: next to a moving edge, the decoder's blur moving with the object; far
    from any motion, frames decoded inconsistently."""
    d_truth = (truth[:, :, 1:] - truth[:, :, :-1]).abs().amax(dim=1)  # (b, f - 1, H, W)
    moving = (d_truth > threshold).to(frames.dtype)
    change = (frames[:, :, 1:] - frames[:, :, :-1]).abs().mean(dim=1)
    static = 1.0 - moving
    sums, counts, inner = [], [], moving
    for r in bands:
        near = F.max_pool2d(moving.flatten(0, 1)[:, None], 2 * r + 1, stride=1, padding=r).view_as(moving)
        band = (near - inner).clamp(min=0) * static
        sums.append((change * band).sum())
        counts.append(band.sum())
        inner = torch.maximum(inner, near)
    rest = (1.0 - inner) * static
    return torch.stack(sums + [(change * rest).sum()]), torch.stack(counts + [rest.sum()])


@torch.no_grad()
def evaluate_video_decoding(ae: nn.Module, batches: Iterable[dict], device: torch.device,
                            window: Optional[int] = None, overlap: int = 4,
                            image_decoder: Optional[nn.Module] = None) -> Dict[str, float]:
    """PSNR and static-background flicker of the video decoder and of an image decoder on real
    clips, through the continuous latent of `ae`'s (frozen) encoder. The image decoder is
    `image_decoder.decode` (the image MoVQ the run started from, sharing that encoder) or, by
    default, `ae.decode`: the same weights without the temporal layers."""
    image = ae if image_decoder is None else image_decoder
    sums = {"psnr_video": 0.0, "psnr_image": 0.0, "flicker_video": 0.0, "flicker_image": 0.0}
    band_sums = {"video": 0.0, "image": 0.0}
    band_counts = 0.0
    n = 0
    for batch in batches:
        video = batch["video"].to(device)
        b, _, f = video.shape[:3]
        z = rearrange(ae.encode(rearrange(video, "b c f h w -> (b f) c h w")), "(b f) c h w -> b c f h w", b=b)
        vid = ae.decode_video(z, window=window, overlap=overlap).clamp(-1, 1)
        img = rearrange(image.decode(rearrange(z, "b c f h w -> (b f) c h w")), "(b f) c h w -> b c f h w", b=b).clamp(-1, 1)
        for name, out in (("video", vid), ("image", img)):
            sums[f"psnr_{name}"] += float(psnr(rearrange(out, "b c f h w -> (b f) c h w"),
                                               rearrange(video, "b c f h w -> (b f) c h w")).mean()) * b
            band_sum, band_count = flicker_by_distance(out, video)  # static_background_flicker, by band
            sums[f"flicker_{name}"] += float(band_sum.sum() / band_count.sum().clamp(min=1)) * b
            band_sums[name] = band_sums[name] + band_sum
        band_counts = band_counts + band_count
        n += b
    if n == 0:
        raise ValueError("evaluate_video_decoding: no decodable clips")
    out = {k: v / n for k, v in sums.items()}
    out["flicker_reduction"] = 1.0 - out["flicker_video"] / max(out["flicker_image"], 1e-12)
    out["clips"] = float(n)
    names = [f"<= {r} px" for r in FLICKER_BANDS] + [f"> {FLICKER_BANDS[-1]} px"]
    total_image = float(band_sums["image"].sum())
    out["flicker_by_distance"] = [
        {"band": name, "static_share": float(band_counts[i] / band_counts.sum()),
         "flicker_video": float(band_sums["video"][i] / band_counts[i].clamp(min=1)),
         "flicker_image": float(band_sums["image"][i] / band_counts[i].clamp(min=1)),
         "share_of_image_flicker": float(band_sums["image"][i]) / max(total_image, 1e-12)}
        for i, name in enumerate(names)]
    return out


def load_video_movq(path: Union[str, Path], which: str = "ema", device: Union[torch.device, str] = "cpu"):
    """The VideoMoVQ of a video_decoder-stage checkpoint, in eval mode."""
    from kvideo.train.checkpoint import load_stage_weights

    state, cfg = load_stage_weights(path, "video_decoder", which)
    module = build_video_decoder(cfg, load_init=False)
    module.load_state_dict(state)
    return module.ae.to(device).eval()
