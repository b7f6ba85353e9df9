"""The MoVQ around the diffusion stages: encode clips to latents, decode latents, load a (video) MoVQ.

Latents are scaled for diffusion: `latent = latent_scale * MoVQ.encode(frames)` (Kandinsky uses
scale 1). A stage's sampler returns scaled latents; `decode_latents` undoes the scale.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Tuple, Union

import torch
from einops import rearrange
from torch import nn

from kvideo.data.latent_cache import fingerprint
from kvideo.inference.checkpoints import load_stage_weights
from kvideo.registry import build_model, model_config


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


class LatentMemo:
    """MoVQ latents of images met before, for a small set of images a run sees again every epoch
    (the identity references): keyed by each image's bytes, kept on the CPU up to `max_mb`, the
    least recently used dropped first. A miss is encoded alone, so an image's latent does not depend
    on which images shared its batch: a resumed run, whose memo starts empty, gets the latents a
    run that went straight through had."""

    def __init__(self, movq: nn.Module, max_mb: float):
        self.movq, self.max_bytes = movq, int(max_mb * 2**20)
        self.entries: OrderedDict = OrderedDict()
        self.bytes = self.hits = self.misses = 0

    @torch.no_grad()
    def encode(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(n, 3, H, W) frames -> (n, c, h, w) unscaled latents (float32) on `device`."""
        images = images.detach().cpu().contiguous()
        out = []
        for image in images:
            key = hashlib.blake2b(f"{image.dtype}{tuple(image.shape)}".encode() + image.numpy().tobytes(),
                                  digest_size=16).digest()
            z = self.entries.get(key)
            if z is None:
                self.misses += 1
                z = self.movq.encode(image[None].to(device))[0].float().cpu()
                self.entries[key] = z
                self.bytes += z.nbytes
                while self.bytes > self.max_bytes and self.entries:
                    self.bytes -= self.entries.popitem(last=False)[1].nbytes
            else:
                self.hits += 1
                self.entries.move_to_end(key)
            out.append(z)
        return torch.stack(out).to(device)


def decode_latents(movq: nn.Module, latents: torch.Tensor, latent_scale: float) -> torch.Tensor:
    """(b, c, f, h, w) scaled latents -> (b, 3, f, H, W) frames in [-1, 1], frame by frame with the
    image decoder."""
    b = latents.shape[0]
    frames = movq.decode(rearrange(latents, "b c f h w -> (b f) c h w") / latent_scale).clamp(-1, 1)
    return rearrange(frames, "(b f) c h w -> b c f h w", b=b)


def latent_space(movq: nn.Module) -> Tuple[str, str]:
    """What makes a latent mean the same thing: fingerprints of the encoder and quant_conv."""
    return fingerprint(movq.encoder), fingerprint(movq.quant_conv)


def load_movq(path: Union[str, Path], which: str = "ema", device: Union[torch.device, str] = "cpu") -> nn.Module:
    """The autoencoder of a movq-stage checkpoint (a checkpoint dir, a run dir or a weights
    file), in eval mode. Later stages use it frozen to encode frames and decode latents."""
    from kvideo.models.movq import MoVQ

    state, cfg = load_stage_weights(path, "movq", which)
    ae = MoVQ(model_config(cfg))
    ae.load_state_dict({k[len("ae."):]: v for k, v in state.items() if k.startswith("ae.")})
    return ae.to(device).eval()


def load_video_movq(path: Union[str, Path], which: str = "ema", device: Union[torch.device, str] = "cpu") -> nn.Module:
    """The VideoMoVQ of a video_decoder-stage checkpoint, in eval mode (its `decode_video` decodes
    long clips in overlapping windows)."""
    from kvideo.models.video_movq import VideoMoVQ

    state, cfg = load_stage_weights(path, "video_decoder", which)
    ae = build_model(cfg)
    if not isinstance(ae, VideoMoVQ):
        raise ValueError(f"checkpoint '{path}': stage video_decoder needs model.name: video_movq; got {cfg.model.name}")
    ae.load_state_dict({k[len("ae."):]: v for k, v in state.items() if k.startswith("ae.")})
    return ae.to(device).eval()
