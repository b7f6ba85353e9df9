"""Stage `keyframe`: the Kandinsky Video 1.1 keyframe model.

Trains a video UNet (`kvideo.models.video_unet`) on clips of `data.num_frames` keyframes at
`data.fps`, in the latent space of a frozen MoVQ, conditioned on

- the text (the t2i stage's text encoder and null context),
- the first frame: the UNet input is [x_t | first-frame latent in frame 0, zeros elsewhere |
  mask, 1 at frame 0 when a first frame is given], and frame 0 is still denoised;
- the noise-augmentation level: the first-frame latent is noised with Gaussian noise to a
  level drawn from `recipe.noise_aug` (the release draws uniform noise, a bug) and the level is
  given to the temporal layers; sampling uses a small fixed level (default 20);
- the motion score of the clip (shard metadata `motion_score`, times `recipe.motion.scale`).

With `model.anchor_first_frame` the first-frame latent is also frame 0 of x_t, marked by its own
timestep (`kvideo.inference.conditioning.anchored_input`), and the loss leaves frame 0 out
where a first frame is given.

These are a `KeyframeCondition` (kvideo.inference.conditioning). Training drops the text, the
image, or both, at `recipe.dropout` rates (`KeyframeCondition.dropped`), so one model gives the
three branches of `text_image_guided`: [text + image, null text + image, null text + no image].

Joint image-video training (`recipe.images.share`): a share of each batch's clips give one
random frame each (or, with `recipe.images.source: shards`, their places go to images of
`recipe.images.shards`, KEY.png|jpg + KEY.json, drawn by step so a resume is exact), trained as text-to-image samples in image mode (every temporal layer
bypassed, no first frame) in the same step; the loss is reported per kind (`keyframe/mse_video`,
`keyframe/mse_image`) and their sample-weighted mean is trained. Each sample is an image with
probability `share`, but every batch keeps at least one clip (every step trains the temporal
layers, as DDP needs every parameter's gradient; train.batch_size >= 2); under DDP the image pass
runs through the unwrapped model, so each rank makes one DDP forward a step. `recipe.motion_free`: a share of
the video samples run motion-free (nothing crosses frames), the branch motion-free guidance
(`recipe.sampling.motion_guidance`) pushes away from.

Reference conditioning (issue 28, `model.identity_attention`): every sample also gets its
clip's reference images (`LatentDiffusionStage.references`, dropped at `recipe.identity.dropout`),
an `IdentityCondition` around the sample's condition; image samples drawn from image shards get
none.

`recipe.init_from` names a t2i checkpoint: its UNet becomes the spatial layers (new input
channels start at zero, temporal layers are new) and its text encoder is taken over.
`recipe.train_spatial: false` freezes the spatial layers and the text encoder (the 1.0 recipe);
true trains everything (1.1), the loaded layers at `recipe.spatial_lr_scale` times train.lr.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

import torch
from einops import rearrange
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel

from kvideo.inference.autoencoder import decode_latents
from kvideo.inference.conditioning import (
    KeyframeCondition, Prompts, TextVideoCondition, given_frames, noise_augment, select_rows,
)
from kvideo.inference.denoiser import TextDenoiser
from kvideo.inference.sampling import KeyframeOptions, sample_keyframes
from kvideo.recipes import ConditionDropout, NoiseAugConfig
from kvideo.train.stages.base import Phase
from kvideo.train.stages.diffusion import LatentDiffusionStage, init_from_t2i, video_phase, with_identity

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Condition dropout and noise augmentation
# ----------------------------------------------------------------------------------------------


def draw_noise_levels(cfg: NoiseAugConfig, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Training levels (n,) long from the configured distribution; zeros when disabled."""
    if not cfg.enabled:
        return torch.zeros(n, dtype=torch.long)
    lo, hi = int(cfg.min_level), int(cfg.max_level)
    if not 0 <= lo <= hi:
        raise ValueError(f"recipe.noise_aug: need 0 <= min_level <= max_level; got {lo}, {hi}")
    if cfg.distribution == "uniform":
        return torch.randint(lo, hi + 1, (n,), generator=generator)
    if cfg.distribution == "log_uniform":  # favours small levels: log(level + 1) uniform
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        a, b = torch.log(torch.tensor(lo + 1.0, dtype=torch.float64)), torch.log(torch.tensor(hi + 1.0, dtype=torch.float64))
        return (torch.exp(a + u * (b - a)) - 1).round().long().clamp(lo, hi)
    raise ValueError(f"recipe.noise_aug.distribution must be 'uniform' or 'log_uniform'; got {cfg.distribution!r}")


def draw_dropout(cfg: ConditionDropout, n: int, generator: Optional[torch.Generator] = None):
    """(drop_text, drop_image) bool (n,): disjoint events text-only, image-only and both."""
    rates = [float(cfg.text), float(cfg.image), float(cfg.both)]
    if any(r < 0 for r in rates) or sum(rates) > 1:
        raise ValueError(f"recipe.dropout: text, image and both must be >= 0 and sum to at most 1; got {rates}")
    u = torch.rand(n, generator=generator)
    text_only = u < rates[0]
    image_only = (u >= rates[0]) & (u < rates[0] + rates[1])
    both = (u >= rates[0] + rates[1]) & (u < sum(rates))
    return text_only | both, image_only | both


def load_lora_base(model: TextDenoiser, cfg) -> None:
    """The keyframe checkpoint `cfg.recipe.lora.base` into a model whose UNet holds LoRA adapters
    (its base weights under the adapters' `base_layer`)."""
    from kvideo.inference.checkpoints import load_stage_weights
    from kvideo.inference.loading import with_text_tower
    from kvideo.inference.lora import base_key

    state, base_cfg = load_stage_weights(cfg.recipe.lora.base, "keyframe")
    for key in ("model", "recipe.conditioning"):
        if OmegaConf.select(base_cfg, key) != OmegaConf.select(cfg, key):
            raise ValueError(f"recipe.lora.base '{cfg.recipe.lora.base}' has another {key} than this config: "
                             "LoRA fine-tunes the base model as it is")
    own = model.state_dict()
    mapped = dict(with_text_tower(state, model, cfg.recipe.lora.base))
    for key in own:
        if ".base_layer." in key:
            mapped[key] = state[base_key(key)]
            mapped.pop(base_key(key), None)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if unexpected or any("lora_" not in k for k in missing):
        bad = unexpected[0] if unexpected else next(k for k in missing if "lora_" not in k)
        raise ValueError(f"recipe.lora.base '{cfg.recipe.lora.base}': weight '{bad}' does not fit the model")
    log.info("keyframe: LoRA over %s, %d adapter tensors train", cfg.recipe.lora.base,
             sum(1 for n, _ in model.named_parameters() if "lora_" in n))


def freeze_untrained(model: TextDenoiser, rc) -> None:
    """Freeze what the recipe `rc` does not train: with `lora`, everything but the adapters; with
    `train_spatial: false` (the 1.0 recipe), everything but the new layers (temporal, identity)
    and the input conv (its new conditioning channels must learn). The text tower is frozen by
    its own config."""
    if rc.lora.enabled:
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    elif not rc.train_spatial:
        model.requires_grad_(False)
        for p in [*model.unet.temporal_parameters(), *model.identity_parameters()]:
            p.requires_grad_(True)
        model.unet.in_layer.requires_grad_(True)


# ----------------------------------------------------------------------------------------------
# Stage
# ----------------------------------------------------------------------------------------------


class KeyframeStage(LatentDiffusionStage):
    name = "keyframe"
    reads_fields = ("caption", "motion_score")

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        draw_dropout(self.rc.dropout, 0)  # validate the rates now, not at the first step
        draw_noise_levels(self.rc.noise_aug, 0)
        if self.rc.conditioning == "text" and (self.rc.images.share > 0 or self.rc.motion_free > 0):
            raise ValueError("recipe.conditioning: text trains plain text-to-video clips; recipe.images.share and "
                             "recipe.motion_free work with recipe.conditioning: first_frame only (for now)")
        if self.rc.anchor.enabled and self.rc.conditioning != "text":
            raise ValueError("recipe.anchor trains a text-to-video model (recipe.conditioning: text); a first-frame "
                             "model takes its first frame as an anchor with model.anchor_first_frame")
        if self.rc.lora.enabled and (not self.rc.lora.base or self.rc.init_from):
            raise ValueError("recipe.lora fine-tunes a trained keyframe model: set recipe.lora.base to its checkpoint "
                             "and leave recipe.init_from empty (the base holds every weight)")
        if self.rc.images.share > 0 and min(s.batch_size for s in self.shapes) < 2:
            raise ValueError("recipe.images.share needs train.batch_size >= 2: every batch keeps a clip")
        if self.rc.images.share > 0 and cfg.data.buckets:
            raise ValueError("recipe.images.share with data.buckets: image samples take data.size, which buckets "
                             "replace; not supported yet")
        self.image_shards = None
        if self.rc.images.source == "shards":
            if not self.rc.images.shards:
                raise ValueError("recipe.images.source: shards needs recipe.images.shards (a directory, glob or "
                                 "comma-separated list of tar shards of KEY.png|jpg + KEY.json)")
            from kvideo.data.image_shards import ImageShards

            self.image_shards = ImageShards(self.rc.images.shards, tuple(cfg.data.size), int(cfg.seed))

    def initialise(self, model: TextDenoiser) -> None:
        """The t2i checkpoint `recipe.init_from` loaded in; with `recipe.train_spatial: false` only
        the temporal layers and the input conv (the new conditioning channels) train. With
        `recipe.lora`, the keyframe checkpoint `recipe.lora.base` is loaded under the adapters and
        only the adapters train (`freeze_untrained`)."""
        if self.rc.lora.enabled:
            load_lora_base(model, self.cfg)
        elif self.rc.init_from:
            init_from_t2i(model, self.cfg)
        freeze_untrained(model, self.rc)

    def check_data(self, data) -> None:
        super().check_data(data)
        if data.num_frames < 2:
            raise ValueError(f"stage keyframe needs data.num_frames >= 2 (keyframes per clip); got {data.num_frames}")
        if self.rc.anchor.frame >= data.num_frames:
            raise ValueError(f"recipe.anchor.frame {self.rc.anchor.frame} is not a frame of a "
                             f"{data.num_frames}-frame clip (data.num_frames)")

    def phases(self, model: TextDenoiser) -> List[Phase]:
        return [video_phase(model, self.rc.spatial_lr_scale)]

    def loss(self, model, parts, batch, step, phase):
        x0 = self.latents(batch)
        if self.rc.conditioning == "text":
            return self._text_video_loss(parts, batch, x0)
        b, device = x0.shape[0], self.device
        drop_text, drop_image = draw_dropout(self.rc.dropout, b)
        level = draw_noise_levels(self.rc.noise_aug, b).to(device)
        first = noise_augment(self.schedule, x0[:, :, 0], level)
        motion_free = (torch.rand(b) < self.rc.motion_free).to(device) if self.rc.motion_free > 0 else None
        cond = KeyframeCondition(Prompts(batch["caption"]), first, torch.ones(b, dtype=torch.bool, device=device),
                                 level, batch["motion_score"].to(device), self.rc.motion.scale, motion_free)
        cond = cond.dropped(text=drop_text, image=drop_image.to(device))
        refs = self.references(batch)
        cond = self.with_unnamed(cond, batch, refs)
        logs = {"keyframe/latent_std": float(x0.std())}
        # these clips give one frame each (no draw at share 0: the random stream stays the old one)
        images = (torch.rand(b) < self.rc.images.share).to(device) if self.rc.images.share > 0 else None
        if images is not None and bool(images.all()):  # keep one clip: every step trains the temporal
            images[int(torch.randint(0, b, ()))] = False  # layers (DDP needs every parameter's gradient)
        if images is None or not bool(images.any()):
            loss, mse = self.diffusion_loss(parts["main"], x0, with_identity(cond, refs), self._loss_mask(model, cond, x0))
            return loss, {**logs, **mse}
        video, clips = select_rows(cond, ~images), x0[~images]
        loss, mse = self.diffusion_loss(parts["main"], clips, with_identity(video, select_rows(refs, ~images)),
                                        self._loss_mask(model, video, clips))
        total = loss * len(clips) / b
        logs["keyframe/mse_video"] = mse["keyframe/mse"]
        image = select_rows(cond, images)
        image = replace(image, first=torch.zeros_like(image.first), has_image=torch.zeros_like(image.has_image),
                        noise_level=torch.zeros_like(image.noise_level), motion_free=None, image_mode=True)
        pictures, image = self._pictures(x0, images, image, step)
        # the image pass through the unwrapped model: DDP sees one forward a step on every rank (its
        # collectives match), and the shared parameters' gradients, summed by autograd over both
        # passes before they are ready, are all-reduced once
        net = parts["main"].module if isinstance(parts["main"], DistributedDataParallel) else parts["main"]
        image_refs = select_rows(refs, images)  # images of the image shards show no clip's characters
        image_refs = image_refs.dropped() if image_refs is not None and self.image_shards is not None else image_refs
        loss, mse = self.diffusion_loss(net, pictures, with_identity(image, image_refs))
        logs["keyframe/mse_image"] = mse["keyframe/mse"]
        total = total + loss * len(pictures) / b
        n_video = b - len(pictures)  # the step's mse over both kinds, as video-only steps log it
        logs["keyframe/mse"] = (logs["keyframe/mse_video"] * n_video + logs["keyframe/mse_image"] * len(pictures)) / b
        if self.image_shards is not None:
            logs["data/skipped_images"] = sum(self.image_shards.skipped.values())
        return total, {**logs, "keyframe/image_share": float(images.float().mean())}

    def _text_video_loss(self, parts, batch, x0: torch.Tensor):
        """Plain text-to-video: text dropped at the dropout's text + both rates; with recipe.anchor,
        one frame of each clip (but a `drop` share) given clean, and left out of the loss."""
        b, f, device = x0.shape[0], x0.shape[2], self.device
        drop_text, _ = draw_dropout(self.rc.dropout, b)
        cond = TextVideoCondition(Prompts(batch["caption"], drop_text.to(device)), batch["motion_score"].to(device),
                                  self.rc.motion.scale)
        mask, logs = None, {"keyframe/latent_std": float(x0.std())}
        a = self.rc.anchor
        if a.enabled:
            k = int(torch.randint(0, f, ())) if a.frame < 0 else a.frame
            has = (torch.rand(b) >= a.drop).to(device)
            cond = replace(cond, anchor=x0[:, :, k], has_anchor=has, anchor_frame=k, anchor_timestep=a.timestep)
            if a.loss == "others":
                mask = ~given_frames(has, f, k)
            logs["keyframe/anchor_frame"] = k
        refs = self.references(batch)
        cond = self.with_unnamed(cond, batch, refs)
        loss, mse = self.diffusion_loss(parts["main"], x0, with_identity(cond, refs), mask)
        return loss, {**logs, **mse}

    def _pictures(self, x0: torch.Tensor, images: torch.Tensor, cond: KeyframeCondition, step: int):
        """The image samples' latents (n, c, 1, h, w) and condition: one random frame of each
        chosen clip, or (recipe.images.source: shards) images of the image shards with their captions."""
        n = int(images.sum())
        if self.image_shards is None:
            frame = torch.randint(0, x0.shape[2], (n,))
            return x0[images][torch.arange(n), :, frame][:, :, None], cond
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) \
            if torch.distributed.is_initialized() else (0, 1)
        frames, captions = self.image_shards.draw(step, n, per_step=x0.shape[0], rank=rank, world=world)
        latents = self.latents({"video": frames[:, :, None]})
        return latents, replace(cond, text=Prompts(captions, cond.text.drop))

    @staticmethod
    def _loss_mask(model, cond: KeyframeCondition, x0: torch.Tensor) -> Optional[torch.Tensor]:
        """With anchor_first_frame, frame 0 is the given first frame: no prediction to train."""
        return ~given_frames(cond.has_image, x0.shape[2]) if model.unet.cfg.anchor_first_frame else None

    @torch.no_grad()
    def preview(self, model: TextDenoiser, batch: dict, out_dir: Path, step: int) -> List[Path]:
        """Keyframes for the first clips of `batch` from their true first frame, caption and motion
        score: one row per clip, the true keyframes above the sampled ones."""
        from torchvision.utils import save_image

        n = min(4, len(batch["caption"]))
        x0 = self.latents({k: batch[k][:n] for k in ("video", "latents") if k in batch})
        options = KeyframeOptions.from_recipe(self.cfg, sampler="dpmpp_2m", steps=self.rc.preview_steps,
                                              num_frames=x0.shape[2])
        latents = sample_keyframes(self.bundle(model), batch["caption"][:n], x0[:, :, 0], batch["motion_score"][:n],
                                   options, generator=torch.Generator().manual_seed(0))
        fake = decode_latents(self.movq, latents, self.rc.latent_scale)
        real = batch["video"][:n].to(fake.device) if "video" in batch \
            else decode_latents(self.movq, x0, self.rc.latent_scale)  # cached latents: their reconstruction
        rows = torch.stack([real, fake], dim=1)  # (n, 2, 3, f, H, W)
        grid = rearrange(rows, "n r c f h w -> (n r f) c h w")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"step_{step:07d}.png"
        save_image((grid + 1) / 2, path, nrow=x0.shape[2])
        return [path]
