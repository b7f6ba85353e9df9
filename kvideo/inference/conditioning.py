"""Named conditioning: one dataclass per kind, and one function per kind that makes the network call.

    cond = KeyframeCondition(text=Prompts(captions), first=first_latent, has_image=ones, ...)
    prediction = denoiser(x_t, t, cond)          # -> keyframe_call(denoiser, x_t, t, cond)

A condition is validated once, when it is made. The training loss and every guidance branch call
the same function through `TextDenoiser.forward`; condition dropout makes a condition
(`KeyframeCondition.dropped`), not a separate path; guidance stacks the branches' conditions along
the batch axis (`kvideo.diffusion.stack_branches`). Adding a kind of conditioning means adding a
dataclass here and a function registered for it with `@network_call(TheCondition)`. A kind that
adds an input to others wraps them: `IdentityCondition(base, references)` makes identity tokens
and calls the base kind's function with `identity=` (`call_network(..., **unet_inputs)`).

The text of a condition is either `Prompts` (strings, encoded inside the denoiser's forward, as
training does so the text projection gets its gradient under DDP) or a `TextContext` (tokens
already encoded, as the samplers do once per call).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Union

import torch
import torch.nn.functional as F

from kvideo.diffusion import Schedule
from kvideo.models.identity import IdentityTokens

# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------


@dataclass
class TextContext:
    """Encoded text: tokens (b, n, d) and their mask (b, n)."""

    tokens: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self):
        if self.tokens.dim() != 3 or self.mask.shape != self.tokens.shape[:2]:
            raise ValueError(f"TextContext: tokens (b, n, d) and mask (b, n) expected; got "
                             f"{tuple(self.tokens.shape)} and {tuple(self.mask.shape)}")

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def padded(self, num_tokens: int) -> "TextContext":
        """This context with padding tokens (zeros, masked out) appended up to `num_tokens`."""
        extra = num_tokens - self.tokens.shape[1]
        if extra < 0:
            raise ValueError(f"TextContext: cannot pad {self.tokens.shape[1]} tokens to {num_tokens}")
        if extra == 0:
            return self
        return TextContext(F.pad(self.tokens, (0, 0, 0, extra)), F.pad(self.mask, (0, extra), value=False))


@dataclass
class Prompts:
    """Prompts to encode; rows where `drop` (b,) is True get the null context (condition dropout)."""

    texts: List[str]
    drop: Optional[torch.Tensor] = None

    def __post_init__(self):
        self.texts = list(self.texts)
        if self.drop is not None and self.drop.shape != (len(self.texts),):
            raise ValueError(f"Prompts: drop must be ({len(self.texts)},); got {tuple(self.drop.shape)}")

    @property
    def batch_size(self) -> int:
        return len(self.texts)

    def select(self, rows: torch.Tensor) -> "Prompts":
        """The prompts of the samples where `rows` (b,) bool holds."""
        keep = rows.cpu().tolist()
        drop = None if self.drop is None else self.drop[rows.to(self.drop.device)]
        return Prompts([t for t, k in zip(self.texts, keep) if k], drop)


Text = Union[TextContext, Prompts]


def encode_text(denoiser, text: Text) -> TextContext:
    """The condition's text as tokens: `Prompts` through the denoiser's text encoder, a
    `TextContext` as it is."""
    return denoiser.context(text.texts, text.drop) if isinstance(text, Prompts) else text


def _check_batch(kind: str, b: int, **tensors: torch.Tensor) -> None:
    for name, value in tensors.items():
        if value.shape[0] != b:
            raise ValueError(f"{kind}: {name} has batch size {value.shape[0]}, the text {b}")


# ----------------------------------------------------------------------------------------------
# The conditions
# ----------------------------------------------------------------------------------------------


@dataclass
class ImageCondition:
    """The first-frame (text-to-image) model: text only."""

    text: Text


@dataclass
class KeyframeCondition:
    """The keyframe model (Kandinsky Video 1.1): text; the first frame's latent (b, c, h, w), already
    noise-augmented to `noise_level` (b,); `has_image` (b,), 0 where no first frame is given (its
    latent and mask are then zeroed in the input); the motion score (b,) in the shards' unit, which
    the UNet sees times `motion_scale`."""

    text: Text
    first: torch.Tensor
    has_image: torch.Tensor
    noise_level: torch.Tensor
    motion_score: torch.Tensor
    motion_scale: float = 1.0
    # (b,) bool: these samples run the temporal layers with nothing crossing frames (the branch
    # motion-free guidance drops; trained at recipe.motion_free); None: none of them
    motion_free: Optional[torch.Tensor] = None
    # every sample a single image, every temporal layer bypassed (joint image-video training,
    # first frames from the keyframe model): x_t is (b, c, 1, h, w)
    image_mode: bool = False

    def __post_init__(self):
        if self.first.dim() != 4:
            raise ValueError(f"KeyframeCondition: first must be a (b, c, h, w) latent; got {tuple(self.first.shape)}")
        _check_batch("KeyframeCondition", self.text.batch_size, first=self.first, has_image=self.has_image,
                     noise_level=self.noise_level, motion_score=self.motion_score)
        if self.motion_free is not None:
            _check_batch("KeyframeCondition", self.text.batch_size, motion_free=self.motion_free)

    def dropped(self, text: torch.Tensor, image: torch.Tensor) -> "KeyframeCondition":
        """The condition with the text dropped where `text` (b,) is True and the first frame where
        `image` (b,) is True (its noise level then 0, as a branch without an image samples)."""
        if not isinstance(self.text, Prompts):
            raise ValueError("KeyframeCondition.dropped needs Prompts (training); samplers build their branches")
        drop_text = text if self.text.drop is None else self.text.drop | text
        image = image.to(self.noise_level.device)
        return replace(self, text=Prompts(self.text.texts, drop_text),
                       has_image=self.has_image * ~image,  # bool stays bool, float stays float
                       noise_level=torch.where(image, torch.zeros_like(self.noise_level), self.noise_level))


@dataclass
class TextVideoCondition:
    """A plain text-to-video keyframe model (`recipe.conditioning: text`, no first-frame input
    channels): text and the motion score; optionally an anchor, the clean latent (b, c, h, w) of
    frame `anchor_frame` given in place of that frame of x_t at every call (anchor-grounding
    training, Factorized Video Generation; `has_anchor` (b,) 0 where none), whose timestep becomes
    0 when `anchor_timestep` (per-frame timesteps mark the frame clean). Anchors injected only
    into x_T, or re-noised at every step, are the sampler's business (`AnchorOptions`)."""

    text: Text
    motion_score: torch.Tensor
    motion_scale: float = 1.0
    anchor: Optional[torch.Tensor] = None
    has_anchor: Optional[torch.Tensor] = None
    anchor_frame: int = 0
    anchor_timestep: bool = False

    def __post_init__(self):
        _check_batch("TextVideoCondition", self.text.batch_size, motion_score=self.motion_score)
        if (self.anchor is None) != (self.has_anchor is None):
            raise ValueError("TextVideoCondition: anchor and has_anchor go together")
        if self.anchor is not None:
            if self.anchor.dim() != 4:
                raise ValueError(f"TextVideoCondition: anchor must be a (b, c, h, w) latent; got {tuple(self.anchor.shape)}")
            _check_batch("TextVideoCondition", self.text.batch_size, anchor=self.anchor, has_anchor=self.has_anchor)


@dataclass
class InterpolationCondition:
    """The interpolation model: text; the keyframe latents (b, c, g + 1, h, w) around the g gaps;
    `keep` (b,), 0 for the unconditional branch (zeroed keyframes, temporal mask 0); the pass's
    `skip_frames` (what the model is told about the frame distance)."""

    text: Text
    keys: torch.Tensor
    keep: torch.Tensor
    skip_frames: int

    def __post_init__(self):
        if self.keys.dim() != 5:
            raise ValueError(f"InterpolationCondition: keys must be (b, c, g + 1, h, w); got {tuple(self.keys.shape)}")
        _check_batch("InterpolationCondition", self.text.batch_size, keys=self.keys, keep=self.keep)


@dataclass
class Names:
    """The names of each sample's reference entries, `rows`: b lists of r strings ("" for an entry
    without one), encoded into name tags inside the forward (`TextDenoiser.name_embeddings`), as
    `Prompts` are in training; samplers give the tags encoded, a (b, r, d) tensor."""

    rows: List[List[str]]

    def __post_init__(self):
        self.rows = [list(row) for row in self.rows]
        if len({len(row) for row in self.rows}) > 1:
            raise ValueError(f"Names: every sample needs the same number of entries; got {[len(r) for r in self.rows]}")

    def select(self, rows: torch.Tensor) -> "Names":
        return Names([r for r, k in zip(self.rows, rows.cpu().tolist()) if k])


@dataclass
class References:
    """The reference images of the identities a clip shows (issue 28): `latents` (b, r, c, h, w),
    their MoVQ latents scaled like the training latents; `present` (b, r), 0 where an entry is
    absent (padding, a dropped reference, the branch of reference guidance without them); `names`
    each entry's name tag: `Names` to encode, or the tags (b, r, d) already encoded; None: untagged."""

    latents: torch.Tensor
    present: torch.Tensor
    names: Union[None, Names, torch.Tensor] = None

    def __post_init__(self):
        if self.latents.dim() != 5 or self.present.shape != self.latents.shape[:2]:
            raise ValueError(f"References: latents (b, r, c, h, w) and present (b, r) expected; got "
                             f"{tuple(self.latents.shape)} and {tuple(self.present.shape)}")
        b, r = self.present.shape
        shape = (len(self.names.rows), len(self.names.rows[0]) if self.names.rows else r) \
            if isinstance(self.names, Names) else None if self.names is None else tuple(self.names.shape[:2])
        if self.names is not None and (shape != (b, r) or (torch.is_tensor(self.names) and self.names.dim() != 3)):
            raise ValueError(f"References: names must be ({b}, {r}) entries (Names, or (b, r, d) tags); "
                             f"got {shape}")

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    def dropped(self, rows: Optional[torch.Tensor] = None) -> "References":
        """These references with every entry of the samples where `rows` (b,) is True absent (None: all)."""
        keep = torch.zeros_like(self.present) if rows is None else self.present * ~rows.to(self.present.device)[:, None]
        return replace(self, present=keep)


@dataclass
class IdentityCondition:
    """Any condition plus identity (issue 28): `base` (an ImageCondition, KeyframeCondition or
    TextVideoCondition) as it is, and identity tokens made from `references` by the denoiser's
    reference encoder, which the UNet's identity attentions read at strength `scale` (1 in
    training, the sampling scale). A sample without a present reference is exactly the base
    condition's prediction (the identity attention's weight is 0 there)."""

    base: Any
    references: References
    scale: float = 1.0

    def __post_init__(self):
        _check_batch("IdentityCondition", self.base.text.batch_size, references=self.references.latents)

    @property
    def text(self) -> Text:
        return self.base.text

    def without_references(self) -> "IdentityCondition":
        """The condition with no reference present: the branch reference guidance pushes away from."""
        return replace(self, references=self.references.dropped())


def select_rows(cond, rows: torch.Tensor):
    """The condition of the samples where `rows` (b,) bool holds: every tensor field (and text
    still to encode: `Prompts`, `Names`, by their `select`) indexed along the batch axis, every
    other field as it is."""
    if isinstance(cond, (Prompts, Names)):
        return cond.select(rows)
    if isinstance(cond, torch.Tensor):
        return cond[rows.to(cond.device)]
    if is_dataclass(cond):
        return replace(cond, **{f.name: select_rows(getattr(cond, f.name), rows) for f in fields(cond) if f.init})
    return cond


# ----------------------------------------------------------------------------------------------
# Input layouts
# ----------------------------------------------------------------------------------------------


def conditioned_input(x_t: torch.Tensor, first: torch.Tensor, has_image: torch.Tensor,
                      everywhere: bool = False) -> torch.Tensor:
    """[x_t | first-frame latent in frame 0, zeros elsewhere | mask, 1 at frame 0]: (b, c, f, h, w) ->
    (b, 2c + 1, f, h, w); with `everywhere` the latent fills every frame's slot (the mask is the same).

    first (b, c, h, w): the (noise-augmented) first-frame latent; has_image (b,) bool or float:
    where 0 the first frame and the mask are zeros (no image).
    """
    b, c, f, h, w = x_t.shape
    keep = has_image.to(x_t.dtype).reshape(b, 1, 1, 1)
    cond = torch.zeros_like(x_t)
    if everywhere:
        cond[:] = (first.to(x_t.dtype) * keep)[:, :, None]
    else:
        cond[:, :, 0] = first.to(x_t.dtype) * keep
    mask = torch.zeros(b, 1, f, h, w, dtype=x_t.dtype, device=x_t.device)
    mask[:, :, 0] = keep
    return torch.cat([x_t, cond, mask], dim=1)


def gap_input(x_t: torch.Tensor, keys: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[left keyframe | x_t | right keyframe] per gap: (b, k c, g, ...) -> (b, (k + 2) c, g, ...).
    Samples where `keep` (b,) is 0 get zeroed keyframes (the unconditional branch)."""
    k = keep.to(x_t.dtype).reshape(-1, 1, 1, 1, 1)
    return torch.cat([keys[:, :, :-1] * k, x_t, keys[:, :, 1:] * k], dim=1)


NOISES = ("gaussian", "uniform")


def noise_augment(schedule: Schedule, latent: torch.Tensor, level: torch.Tensor,
                  generator: Optional[torch.Generator] = None, noise: str = "gaussian") -> torch.Tensor:
    """q_sample of the first-frame latent to integer `level` (b,) with Gaussian noise, or with
    U[0, 1) noise (`noise="uniform"`: the release's sampling, torch.rand_like where Gaussian was meant)."""
    if noise not in NOISES:
        raise ValueError(f"noise_augment: noise must be one of {', '.join(NOISES)}; got {noise!r}")
    gen_device = generator.device if generator is not None else latent.device
    draw = torch.randn if noise == "gaussian" else torch.rand
    noise = draw(latent.shape, generator=generator, device=gen_device, dtype=latent.dtype).to(latent.device)
    return schedule.q_sample(latent, level.to(latent.device).long(), noise)


# ----------------------------------------------------------------------------------------------
# The network calls
# ----------------------------------------------------------------------------------------------

NETWORK_CALLS: Dict[type, Callable] = {}


def network_call(kind: type) -> Callable:
    """Register the function that turns (denoiser, x_t, t, condition of `kind`) into the network call."""

    def register(fn: Callable) -> Callable:
        NETWORK_CALLS[kind] = fn
        return fn

    return register


def call_network(denoiser, x_t: torch.Tensor, t: torch.Tensor, cond, **unet_inputs) -> torch.Tensor:
    """The prediction for `cond`, by the function registered for its kind. `unet_inputs` are
    passed on to the UNet as keywords: a condition that adds an input to another kind's call
    (`IdentityCondition`) calls the other kind's function with it."""
    if type(cond) not in NETWORK_CALLS:
        raise TypeError(f"no network call for a condition of kind {type(cond).__name__}; "
                        f"known: {', '.join(k.__name__ for k in NETWORK_CALLS)}")
    return NETWORK_CALLS[type(cond)](denoiser, x_t, t, cond, **unet_inputs)


@network_call(ImageCondition)
def image_call(denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: ImageCondition, **unet_inputs) -> torch.Tensor:
    text = encode_text(denoiser, cond.text)
    return denoiser.unet(x_t, t, text.tokens, text.mask, **unet_inputs)


def given_frames(has_image: torch.Tensor, num_frames: int, frame: int = 0) -> torch.Tensor:
    """Where a model is given a frame instead of predicting it (`anchor_first_frame`'s frame 0, an
    anchor frame): (b, 1, num_frames, 1, 1) bool, True at `frame` of the samples where `has_image`.
    The loss leaves these out; sampling holds them to the given latent."""
    given = torch.zeros(has_image.shape[0], 1, num_frames, 1, 1, dtype=torch.bool, device=has_image.device)
    given[:, 0, frame] = (has_image > 0).reshape(-1, 1, 1)
    return given


def anchored_input(x_t: torch.Tensor, t: torch.Tensor, first: torch.Tensor, has_image: torch.Tensor,
                   level: torch.Tensor, frame: int = 0):
    """(x_t, t (b,)) -> (x_t with frame `frame` replaced by the given latent `first`, per-frame
    timesteps (b, f) with that frame's set to `level` (b,)), where `has_image`; samples without
    one keep their x_t and t on every frame."""
    b, f = x_t.shape[0], x_t.shape[2]
    keep = has_image.to(x_t.device) > 0
    x = x_t.clone()
    x[:, :, frame] = torch.where(keep.reshape(b, 1, 1, 1), first.to(x_t.dtype), x_t[:, :, frame])
    frame_t = t.reshape(b, 1).expand(b, f).clone()
    frame_t[:, frame] = torch.where(keep, level.to(t.device, t.dtype), t)
    return x, frame_t


@network_call(KeyframeCondition)
def keyframe_call(denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: KeyframeCondition, **unet_inputs) -> torch.Tensor:
    text = encode_text(denoiser, cond.text)
    if denoiser.unet.cfg.anchor_first_frame:
        x_t, t = anchored_input(x_t, t, cond.first, cond.has_image, cond.noise_level)
    x = conditioned_input(x_t, cond.first, cond.has_image, denoiser.unet.cfg.first_frame_everywhere)
    if cond.image_mode and x_t.shape[2] != 1:
        raise ValueError(f"KeyframeCondition.image_mode: x_t must hold one frame; got {x_t.shape[2]}")
    return denoiser.unet(x, t, text.tokens, text.mask, noise_aug_level=cond.noise_level,
                         motion_score=cond.motion_score * cond.motion_scale, temporal=not cond.image_mode,
                         motion_free=cond.motion_free, **unet_inputs)


@network_call(TextVideoCondition)
def text_video_call(denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: TextVideoCondition,
                    **unet_inputs) -> torch.Tensor:
    text = encode_text(denoiser, cond.text)
    if cond.anchor is not None:
        x_anchored, frame_t = anchored_input(x_t, t, cond.anchor, cond.has_anchor, torch.zeros_like(t),
                                             cond.anchor_frame)
        x_t, t = x_anchored, (frame_t if cond.anchor_timestep else t)
    return denoiser.unet(x_t, t, text.tokens, text.mask, motion_score=cond.motion_score * cond.motion_scale,
                         **unet_inputs)


@network_call(InterpolationCondition)
def interpolation_call(denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: InterpolationCondition,
                       **unet_inputs) -> torch.Tensor:
    text = encode_text(denoiser, cond.text)
    skip = torch.full((x_t.shape[0],), cond.skip_frames, dtype=torch.long, device=x_t.device)
    return denoiser.unet(gap_input(x_t, cond.keys, cond.keep), t, text.tokens, text.mask, skip_frames=skip,
                         temporal_mask=cond.keep, **unet_inputs)


def identity_tokens(denoiser, refs: References, scale: float) -> IdentityTokens:
    """The identity tokens of `refs`: each entry's latent through the denoiser's reference encoder
    (tagged with its name), the entries' tokens side by side, (b, r * n, d); an absent entry's
    tokens are masked out; the weight is `scale` for every sample."""
    encoder = getattr(denoiser, "reference", None)
    if encoder is None:
        raise ValueError("IdentityCondition needs a model with identity attention (model.identity_attention) and "
                         "its reference encoder; this denoiser has none")
    b, r = refs.present.shape
    names = denoiser.name_embeddings(refs.names.rows) if isinstance(refs.names, Names) else refs.names
    names = None if names is None else names.flatten(0, 1)
    tokens, _ = encoder(refs.latents.flatten(0, 1), names)  # (b r, n, d)
    n = tokens.shape[1]
    mask = (refs.present > 0).repeat_interleave(n, dim=1)  # (b, r n): entry-major, as the tokens
    weight = torch.full((b,), float(scale), dtype=tokens.dtype, device=tokens.device)
    return IdentityTokens(tokens.reshape(b, r * n, -1), mask, weight)


@network_call(IdentityCondition)
def identity_call(denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: IdentityCondition, **unet_inputs) -> torch.Tensor:
    return call_network(denoiser, x_t, t, cond.base, identity=identity_tokens(denoiser, cond.references, cond.scale),
                        **unet_inputs)
