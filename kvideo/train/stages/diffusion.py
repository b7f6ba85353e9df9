"""The base of the latent-diffusion stages (t2i, keyframe, interpolation).

Each trains a `TextDenoiser` (kvideo.inference.denoiser) in the continuous latent space of a frozen
MoVQ (`recipe.movq`): a batch's frames become scaled latents (`clip_latents`, or the latent cache),
the stage builds the batch's condition (kvideo.inference.conditioning), with its dropout, and the
denoising loss runs the network through that condition. Previews sample through the inference
layer (`self.bundle(model)` and the samplers of kvideo.inference.sampling), so a preview shows
what `sample.py` would make.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from kvideo.diffusion import training_loss
from kvideo.inference.autoencoder import LatentMemo, clip_latents, load_movq
from kvideo.inference.conditioning import IdentityCondition, Names, References
from kvideo.inference.checkpoints import load_stage_weights
from kvideo.inference.denoiser import TextDenoiser, loss_spec, make_schedule
from kvideo.inference.identity import without_names
from kvideo.inference.loading import Bundle, build_stage_denoiser, with_text_tower
from kvideo.inference.sampling import check_sampling
from kvideo.train import dist
from kvideo.train.dist import autocast_context
from kvideo.train.stages.base import Phase, Stage, check_size

log = logging.getLogger(__name__)


class LatentDiffusionStage(Stage):
    """A stage that trains a text-conditioned denoiser on MoVQ latents; subclasses build the
    condition (`loss`) and may initialise the model from another checkpoint (`initialise`)."""

    reads_latents = True
    reads_fields = ("caption",)

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.movq = load_movq(self.rc.movq, device=device).requires_grad_(False)
        for shape in self.shapes:  # before any encoding
            check_size(shape.data.size, self.movq.downsample_factor, "the MoVQ's downsampling")
        for data in {tuple(s.data.size): s.data for s in self.shapes}.values():  # a cache per frame size
            ensure_latent_cache(cfg, data, self.movq, device)
        check_sampling(cfg)
        self.schedule = make_schedule(self.rc.diffusion)
        self.loss_spec = loss_spec(self.rc.diffusion)
        self.identity = any(cfg.model.get("identity_attention") or ())  # reference conditioning (issue 28)
        self.reference_memo = None
        if self.identity:
            self.reads_fields = (*self.reads_fields, "references")
            if self.rc.identity.latent_memo_mb > 0:
                self.reference_memo = LatentMemo(self.movq, self.rc.identity.latent_memo_mb)
        self.identity_encoder = self._identity_encoder(device)

    def begin_step(self, step: int) -> None:
        end = self.rc.diffusion.get("timestep_shift_end")
        if end is not None:  # recipe.diffusion.timestep_shift_end: the shift at this step
            start, total = float(self.rc.diffusion.timestep_shift), max(1, int(self.cfg.train.max_steps))
            self.loss_spec = replace(self.loss_spec, timestep_shift=start * (end / start) ** min(1.0, step / total))

    def build_model(self) -> nn.Module:
        model = build_stage_denoiser(self.cfg)
        self.initialise(model)
        return model

    def size_multiple(self, model: TextDenoiser) -> int:
        return self.movq.downsample_factor * model.unet.downsample_factor

    def initialise(self, model: TextDenoiser) -> None:
        """Training-only initialisation of a freshly built model (e.g. `recipe.init_from`)."""

    def latents(self, batch: dict) -> torch.Tensor:
        """The batch's clips as (b, c, f, h, w) scaled MoVQ latents."""
        return clip_latents(self.movq, batch, self.rc.latent_scale, self.device)

    def references(self, batch: dict, repeats: int = 1) -> Optional[References]:
        """The batch's reference images (data.references, KEY.ref.png) as `References`: their MoVQ
        latents, scaled; present where the data has them, except for the share
        `recipe.identity.dropout` of the samples, drawn here, which get none; tagged with their
        names (`recipe.identity.names`). Each sample's `repeats` times in a row (a t2i batch's
        frames). None without identity attention."""
        if not self.identity:
            return None
        images = batch["references"]  # (b, r, 3, H, W)
        b, r = images.shape[:2]
        if self.reference_memo is not None:
            z = self.reference_memo.encode(rearrange(images, "b r c h w -> (b r) c h w"), self.device)
            z = z * self.rc.latent_scale
        else:
            z = clip_latents(self.movq, {"video": rearrange(images, "b r c h w -> (b r) c 1 h w")},
                             self.rc.latent_scale, self.device)[:, :, 0]
        latents = rearrange(z, "(b r) c h w -> b r c h w", b=b)
        dropped = torch.rand(b) < self.rc.identity.dropout
        present = batch["reference_present"].to(self.device) & ~dropped.to(self.device)[:, None]
        names = batch["reference_names"]
        if repeats > 1:
            latents, present = latents.repeat_interleave(repeats, 0), present.repeat_interleave(repeats, 0)
            names = [row for row in names for _ in range(repeats)]
        return References(latents, present, Names(names) if self.rc.identity.names else None)

    def unnamed(self, captions: Sequence[str], batch: dict, refs: Optional[References]) -> Sequence[str]:
        """`captions` (each sample's repeated in a row, as `references` repeats them) with the
        names of the sample's present references replaced by `recipe.identity.name_word`, for a
        share `recipe.identity.name_dropout` of the samples that keep a reference (drawn here;
        no draw at 0): those learn identity from the reference alone."""
        rate = self.rc.identity.name_dropout if refs is not None else 0.0
        if rate <= 0:
            return captions
        repeats = len(captions) // len(batch["reference_names"])
        rows = [row for row in batch["reference_names"] for _ in range(repeats)]
        present = refs.present.cpu()
        chosen = ((torch.rand(len(captions)) < rate) & present.any(1)).tolist()
        word = self.rc.identity.name_word
        return [without_names(c, [n for n, p in zip(row, keep) if p and n], word) if k else c
                for c, row, keep, k in zip(captions, rows, present.tolist(), chosen)]

    def with_unnamed(self, cond, batch: dict, refs: Optional[References]):
        """`cond` (a condition whose text is `Prompts`) with its captions `unnamed`; `cond` itself
        when name dropout is off."""
        texts = self.unnamed(cond.text.texts, batch, refs)
        return cond if texts is cond.text.texts else replace(cond, text=replace(cond.text, texts=texts))

    def bundle(self, model: TextDenoiser) -> Bundle:
        """The model being trained, as the inference layer's samplers take it."""
        return Bundle(self.name, model, self.movq, self.cfg, self.schedule, str(self.cfg.run_dir))

    def diffusion_loss(self, net: nn.Module, x0: torch.Tensor, cond,
                       mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The mean denoising loss of `net` (the possibly DDP-wrapped denoiser) on x0 under `cond`
        (over the elements where `mask` holds, when given), and its per-sample MSE for the log;
        plus the identity loss times its weight when the recipe sets one and `cond` has references."""
        outputs = []

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            outputs.append(net(x_t, t, cond))
            return outputs[-1]

        loss, info = training_loss(model_fn, self.schedule, x0, self.loss_spec, mask=mask)
        total, logs = loss.mean(), {f"{self.name}/mse": float(info["mse"].mean())}
        if self.identity_encoder is not None and isinstance(cond, IdentityCondition):
            id_loss, n = self.identity_loss(info["x_t"], info["t"], outputs[0], cond.references)
            total = total + self.rc.identity.loss_weight * id_loss
            logs[f"{self.name}/identity_loss"], logs[f"{self.name}/identity_samples"] = float(id_loss.detach()), n
        return total, logs

    def _identity_encoder(self, device: torch.device) -> Optional[nn.Module]:
        """The frozen identity encoder of the identity loss (recipe.identity.loss_weight > 0), or None."""
        identity = self.rc.get("identity")
        if identity is None or identity.loss_weight == 0:
            return None
        if not self.identity:
            raise ValueError("recipe.identity.loss_weight needs reference conditioning (model.identity_attention)")
        if not identity.encoder_weights:
            raise ValueError("recipe.identity.loss_weight > 0 needs recipe.identity.encoder_weights (a file of "
                             "tools/train_identity_encoder.py)")
        if self.cfg.model.get("anchor_first_frame"):
            raise ValueError("recipe.identity.loss_weight: with model.anchor_first_frame frame 0 is given, not "
                             "predicted; the identity loss reads frame 0")
        from kvideo.weights import load_identity_encoder

        return load_identity_encoder(identity.encoder_weights).to(device)

    def identity_loss(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor,
                      refs: References) -> Tuple[torch.Tensor, int]:
        """(mean of 1 - cos(E(decoded x0 prediction of frame 0), E(decoded reference)), samples)
        over the samples at t < recipe.identity.loss_max_t with exactly one reference present
        (a frame of one character against that character's reference); E is the frozen identity
        encoder, given both resized to the size it was trained at. Zero, still in the graph, when
        no sample qualifies."""
        present = refs.present > 0
        keep = (t < self.rc.identity.loss_max_t) & (present.sum(dim=1) == 1) & present[:, 0]
        if not bool(keep.any()):
            return out.sum() * 0.0, 0
        x0 = self.schedule.predict_x0(x_t[keep], t[keep], out[keep], self.rc.diffusion.target)
        x0 = x0[:, :, 0] if x0.dim() == 5 else x0  # a clip's first frame
        encoder, scale = self.identity_encoder, self.rc.latent_scale

        def embed(latents: torch.Tensor) -> torch.Tensor:  # at the encoder's size: it reads size in pixels
            images = self.movq.decode(latents.float() / scale).clamp(-1, 1)
            size = encoder.cfg.image_size
            if images.shape[-2:] != (size, size):
                images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            return encoder.embed(images)

        with torch.no_grad():
            reference = embed(refs.latents[keep, 0])
        cosine = (embed(x0) * reference).sum(dim=1)
        return (1 - cosine).mean(), int(keep.sum())


def ensure_latent_cache(cfg, data, movq: nn.Module, device: torch.device) -> None:
    """Build `data.latent_cache` (when set) from `data.shards` at `data.size` with the stage's
    frozen MoVQ (`data`: cfg.data, or one bucket's); a no-op when it is complete, an error when it
    holds another MoVQ's latents."""
    if not data.get("latent_cache"):
        return
    from kvideo.data.latent_cache import LatentCacheSpec, build_latent_cache

    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) \
        if torch.distributed.is_initialized() else (0, 1)
    spec = LatentCacheSpec(data.latent_cache, data.shards, cfg.recipe.movq, data.size)
    build_latent_cache(spec, movq, device=device,
                       autocast=autocast_context(cfg.train.precision, device, logging.getLogger(__name__)),
                       rank=rank, world_size=world)
    dist.barrier()


def init_from_t2i(model: TextDenoiser, cfg, keep_new: Sequence[str] = ()) -> Dict[str, torch.Tensor]:
    """Load the t2i checkpoint `cfg.recipe.init_from` into a video stage's model: its UNet as the
    spatial layers (`kvideo.models.video_unet.load_image_weights`; `keep_new` prefixes stay
    freshly initialised) and its text encoder, which must have the same `recipe.text_encoder`, and
    its reference encoder and identity attentions when both have them (a model without them leaves
    the t2i model's out).
    Returns the t2i UNet's weights (for a stage that derives its new layers from them)."""
    from kvideo.models.video_unet import load_image_weights

    state, t2i_cfg = load_stage_weights(cfg.recipe.init_from, "t2i")
    if dict(t2i_cfg.recipe.text_encoder) != dict(cfg.recipe.text_encoder):
        raise ValueError(f"recipe.text_encoder differs from the one of recipe.init_from '{cfg.recipe.init_from}': "
                         f"{dict(cfg.recipe.text_encoder)} vs {dict(t2i_cfg.recipe.text_encoder)}")
    unet_state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    if model.reference is None:  # a model without identity (interpolation) takes no identity layers
        unet_state = {k: v for k, v in unet_state.items() if ".identity_attention." not in k}
    report = load_image_weights(model.unet, unet_state, keep_new=keep_new)
    state = with_text_tower(state, model, cfg.recipe.init_from)
    model.text.load_state_dict({k[len("text."):]: v for k, v in state.items() if k.startswith("text.")})
    reference = {k[len("reference."):]: v for k, v in state.items() if k.startswith("reference.")}
    if reference and model.reference is not None:  # a t2i model with identity: its reference encoder too
        model.reference.load_state_dict(reference)
    log.info("%s: loaded %d spatial tensors from %s (%d widened, %d new)", cfg.stage, len(report["loaded"]),
             cfg.recipe.init_from, len(report["widened"]), len(report["new"]))
    return unet_state


def with_identity(cond, refs: Optional[References]):
    """`cond` with the references `refs` (an IdentityCondition), or `cond` itself when None."""
    return cond if refs is None else IdentityCondition(cond, refs)


def video_phase(model: TextDenoiser, spatial_lr_scale: float) -> Phase:
    """The one optimizer phase of a video stage initialised from t2i: the spatial layers and the
    text encoder (everything but the new layers: `model.unet.temporal_parameters()` and the
    identity layers, `model.identity_parameters()`) train at `spatial_lr_scale` times train.lr,
    the new layers at train.lr."""
    new = [*model.unet.temporal_parameters(), *model.identity_parameters()]
    return Phase.new_layers_faster("main", model, new, spatial_lr_scale)
