"""Reconstruction metrics of the autoencoders: PSNR and static-background flicker.

Used by the movq and video_decoder stages' evaluation, `sample.py --stage movq|video_decoder` and
the evaluate tools.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def frames_of(batch: dict) -> torch.Tensor:
    """The batch's frames as images: (b, c, f, h, w) -> (b f) c h w."""
    return rearrange(batch["video"], "b c f h w -> (b f) c h w")


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(4.0 / mse)


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
