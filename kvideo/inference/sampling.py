"""The samplers of the three diffusion stages: first frames, keyframes, interpolation.

Each takes a `Bundle` (kvideo.inference.loading), the prompts, the condition inputs, one options
dataclass and a generator and callback:

    options = KeyframeOptions.from_recipe(bundle.cfg, steps=15)      # the recipe's defaults, changed
    latents = sample_keyframes(bundle, prompts, first_latents, motion_score=0.03, options=options)

`Options.from_recipe(cfg, **changes)` is the one place that turns a checkpoint's recipe into
sampler arguments: the pipeline, `sample.py --stage`, the evaluate tools and the training previews
all call it. A change of None keeps the recipe's value.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from omegaconf import DictConfig

from kvideo.diffusion import GuidanceTerm, SamplerSpec, plan_timesteps, sample, text_guided, text_image_guided, with_known
from kvideo.inference.conditioning import (
    NOISES, IdentityCondition, ImageCondition, InterpolationCondition, KeyframeCondition, TextVideoCondition, given_frames,
    noise_augment,
)
from kvideo.inference.denoiser import make_schedule
from kvideo.inference.gaps import gap_blend, merge_gaps
from kvideo.inference.identity import ReferenceSet, encode_references
from kvideo.inference.loading import Bundle

Callback = Optional[Callable[..., None]]
SPEC_FIELDS = ("sampler", "steps", "spacing", "timestep_shift", "dynamic_threshold", "threshold_max")

# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------


def sampler_spec(sampling_cfg) -> SamplerSpec:
    """The SamplerSpec of a recipe's `sampling` section."""
    return SamplerSpec(**{k: sampling_cfg[k] for k in SPEC_FIELDS})


def check_sampling(cfg: DictConfig) -> None:
    """A recipe whose sampling plan its model cannot follow (an eps model asked to start at the
    zero-SNR timestep) is an error when the stage starts, not at the first preview."""
    rc = cfg.recipe
    try:
        plan_timesteps(make_schedule(rc.diffusion), sampler_spec(rc.sampling), rc.diffusion.target)
    except ValueError as e:
        raise ValueError(f"recipe.sampling (spacing '{rc.sampling.spacing}') with recipe.diffusion "
                         f"(target '{rc.diffusion.target}'): {e}") from None


def _need(name: str, value: Any, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"sampling setting '{name}' = {value!r}: must be {rule}")


def _changed(options: Any, changes: dict) -> Any:
    """`options` with `changes` applied: SamplerSpec fields to `options.spec`, the rest to the
    options; None keeps a value; an unknown name is a ValueError naming the valid ones."""
    own = {f.name for f in fields(options)} - {"spec"}
    unknown = sorted(set(changes) - own - set(SPEC_FIELDS))
    if unknown:
        raise ValueError(f"{type(options).__name__}: unknown setting '{unknown[0]}'; "
                         f"valid: {', '.join(sorted(own | set(SPEC_FIELDS)))}")
    spec = {k: v for k, v in changes.items() if k in SPEC_FIELDS and v is not None}
    rest = {k: v for k, v in changes.items() if k in own and v is not None}
    return replace(options, spec=replace(options.spec, **spec), **rest)


@dataclass(frozen=True)
class FirstFrameOptions:
    """How first frames are sampled: the sampler, text guidance w ((w + 1) c - w u), the image size,
    and the negative prompt that replaces the null text of the unconditional branch."""

    spec: SamplerSpec = field(default_factory=SamplerSpec)
    guidance: float = 5.0
    height: int = 64
    width: int = 64
    negative_prompt: Optional[str] = None
    identity_scale: float = 1.0  # the identity attention's strength (with references)
    reference_guidance: float = 0.0  # w_R: + w_R (eps - eps_without references), one more branch; 0: none

    def __post_init__(self):
        for name in ("guidance", "identity_scale", "reference_guidance"):
            _need(name, getattr(self, name), getattr(self, name) >= 0, ">= 0")
        for name in ("height", "width"):
            _need(name, getattr(self, name), getattr(self, name) >= 1, ">= 1")

    @classmethod
    def from_recipe(cls, cfg: DictConfig, **changes) -> "FirstFrameOptions":
        s = cfg.recipe.sampling
        height, width = (int(v) for v in cfg.data.size)
        # a keyframe checkpoint makes first frames in image mode, with its text guidance w_T
        guidance = s.text_guidance if cfg.stage == "keyframe" else s.guidance
        return _changed(cls(sampler_spec(s), guidance, height, width, None, *identity_settings(cfg.recipe)), changes)


ANCHOR_MODES = ("first_step", "every_step", "clean")


@dataclass(frozen=True)
class KeyframeOptions:
    """How keyframes are sampled: the sampler, three-way guidance (w_T, w_I), the first frame's
    noise-augmentation level, the number of keyframes, whether the first frame is used (False:
    plain text-to-video, the model's image-dropped branch), the negative prompt, and whether
    frame 0 is held to the given first frame at every step (`keep_first_frame`, replacement
    sampling; the release denoises frame 0 freely)."""

    spec: SamplerSpec = field(default_factory=SamplerSpec)
    text_guidance: float = 5.0
    image_guidance: float = 2.0
    noise_aug_level: int = 20
    noise_aug_noise: str = "gaussian"  # gaussian | uniform (the release's U[0, 1) draw; recipe.noise_aug.sample_noise)
    num_frames: int = 12
    use_image: bool = True
    negative_prompt: Optional[str] = None
    keep_first_frame: bool = False
    motion_guidance: float = 0.0  # w_M of motion-free guidance (a fourth branch); 0: none
    # a text-to-video model's anchor frame (recipe.sampling.anchor): first_step | every_step | clean
    anchor: str = "first_step"
    anchor_frame: int = 0
    identity_scale: float = 1.0  # the identity attention's strength (with references)
    reference_guidance: float = 0.0  # w_R: + w_R (eps_TI - eps_TI,without references), one more branch; 0: none

    def __post_init__(self):
        for name in ("text_guidance", "image_guidance", "noise_aug_level", "motion_guidance", "identity_scale",
                     "reference_guidance"):
            _need(name, getattr(self, name), getattr(self, name) >= 0, ">= 0")
        _need("num_frames", self.num_frames, self.num_frames >= 1, ">= 1")
        _need("noise_aug_noise", self.noise_aug_noise, self.noise_aug_noise in NOISES, f"one of {', '.join(NOISES)}")
        _need("anchor", self.anchor, self.anchor in ANCHOR_MODES, f"one of {', '.join(ANCHOR_MODES)}")
        _need("anchor_frame", self.anchor_frame, 0 <= self.anchor_frame < self.num_frames,
              f"a frame of the {self.num_frames} keyframes")

    @classmethod
    def from_recipe(cls, cfg: DictConfig, **changes) -> "KeyframeOptions":
        rc = cfg.recipe
        s = rc.sampling
        options = cls(sampler_spec(s), s.text_guidance, s.image_guidance, sampling_noise_level(rc.noise_aug),
                      str(rc.noise_aug.sample_noise), int(cfg.data.num_frames), keep_first_frame=bool(s.keep_first_frame),
                      motion_guidance=float(s.motion_guidance), anchor=str(s.anchor), anchor_frame=int(s.anchor_frame))
        scale, guidance = identity_settings(rc)
        return _changed(replace(options, identity_scale=scale, reference_guidance=guidance), changes)


@dataclass(frozen=True)
class InterpolationOptions:
    """How frames are interpolated: the sampler, text guidance, the skip_frames of each pass in
    order (e.g. (3, 1): two passes), whether the model predicts residuals over the keyframe blend (its
    recipe.residual) and the negative prompt."""

    spec: SamplerSpec = field(default_factory=lambda: SamplerSpec("ddim", steps=10, spacing="trailing"))
    guidance: float = 0.5
    skip_frames: Tuple[int, ...] = (3, 1)
    residual: bool = False
    negative_prompt: Optional[str] = None

    def __post_init__(self):
        _need("guidance", self.guidance, self.guidance >= 0, ">= 0")
        _need("skip_frames", self.skip_frames, all(s >= 0 for s in self.skip_frames), "a list of integers >= 0")

    @classmethod
    def from_recipe(cls, cfg: DictConfig, **changes) -> "InterpolationOptions":
        rc = cfg.recipe
        s = rc.sampling
        options = cls(sampler_spec(s), s.guidance, tuple(p.skip_frames for p in rc.passes), bool(rc.residual))
        if changes.get("skip_frames") is not None:
            changes = {**changes, "skip_frames": tuple(changes["skip_frames"])}
        return _changed(options, changes)


def identity_settings(recipe) -> Tuple[float, float]:
    """(identity_scale, reference_guidance) of a recipe's `identity` section (1, 0 without one)."""
    identity = recipe.get("identity")
    return (1.0, 0.0) if identity is None else (float(identity.scale), float(identity.guidance))


def identity_guided(bundle: Bundle, branches: Sequence[Any], references: Optional[ReferenceSet],
                    scale: float, guidance: float) -> Tuple[List[Any], List[GuidanceTerm]]:
    """The guidance branches with identity: each an `IdentityCondition` around it with the
    references encoded for this stage, at strength `scale`; and the reference guidance term (the
    first branch without its references, at w_R = `guidance`). Without references, the branches
    as they are and no term."""
    if references is None:
        return list(branches), []
    if references.batch_size != branches[0].text.batch_size:
        raise ValueError(f"{branches[0].text.batch_size} prompts but references for {references.batch_size}")
    refs = encode_references(bundle, references, bool(bundle.recipe.identity.names))
    wrapped = [IdentityCondition(c, refs, scale) for c in branches]
    return wrapped, [GuidanceTerm(wrapped[0].without_references(), guidance)] if guidance else []


def sampling_noise_level(noise_aug_cfg) -> int:
    """The first frame's noise-augmentation level at sampling: `sample_level`, or 0 for a model
    trained without augmentation (it has only ever seen a clean first frame at level 0)."""
    return int(noise_aug_cfg.sample_level) if noise_aug_cfg.enabled else 0


def resolve_motion_score(motion_cfg, value: Union[str, float, None]) -> float:
    """A number, a number as text or a preset name of recipe.motion -> motion score (shard units)."""
    if value is None:
        value = motion_cfg.default
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except ValueError:
        pass
    if value not in motion_cfg.presets:
        raise ValueError(f"unknown motion preset {value!r}; presets of this model: "
                         f"{', '.join(f'{k}={v:g}' for k, v in motion_cfg.presets.items())} (or give a number)")
    return float(motion_cfg.presets[value])


# ----------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------


def _noise(shape: tuple, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """x_T drawn on the generator's device, then moved (the same noise on CPU and CUDA)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


@torch.no_grad()
def sample_first_frames(bundle: Bundle, prompts: Sequence[str], options: FirstFrameOptions, *,
                        generator: Optional[torch.Generator] = None, callback: Callback = None,
                        references: Optional[ReferenceSet] = None) -> torch.Tensor:
    """Images (b, 3, height, width) in [-1, 1] for `prompts`, with classifier-free guidance. Noise
    comes from `generator` only. `references`: the characters' reference images (a model with
    identity attention), in every branch, with reference guidance at `options.reference_guidance`. `bundle` is a t2i checkpoint, or a keyframe checkpoint whose
    video UNet then makes the images in image mode (every temporal layer bypassed, no first
    frame), the released model's way, meaningful after joint image-video training."""
    denoiser, movq, rc = bundle.denoiser, bundle.movq, bundle.recipe
    f = movq.downsample_factor
    multiple = f * denoiser.unet.downsample_factor
    _need("height, width", (options.height, options.width), not (options.height % multiple or options.width % multiple),
          f"divisible by {multiple} (the MoVQ's factor {f} times the UNet's {denoiser.unet.downsample_factor})")
    b, device = len(prompts), bundle.device
    shape = (b, movq.cfg.embed_dim, options.height // f, options.width // f)
    video_model = bundle.cfg.stage == "keyframe"
    if video_model:  # one frame of a clip: (b, c, 1, h, w)
        zeros = torch.zeros(b, device=device)
        cond, uncond = (KeyframeCondition(text, torch.zeros(shape, device=device), zeros, zeros.long(), zeros,
                                          rc.motion.scale, image_mode=True)
                        for text in denoiser.guidance_contexts(prompts, options.negative_prompt))
        shape = (*shape[:2], 1, *shape[2:])
    else:
        cond, uncond = (ImageCondition(text) for text in denoiser.guidance_contexts(prompts, options.negative_prompt))
    (cond, uncond), terms = identity_guided(bundle, [cond, uncond], references, options.identity_scale,
                                            options.reference_guidance)
    model_fn = text_guided(denoiser, cond, uncond, options.guidance, terms)
    latents = sample(model_fn, bundle.schedule, _noise(shape, generator, device), options.spec, target=rc.diffusion.target,
                     data_range=rc.latent_scale, generator=generator, callback=callback)
    if video_model:
        latents = latents[:, :, 0]
    return movq.decode(latents / rc.latent_scale).clamp(-1, 1)


@torch.no_grad()
def sample_keyframes(bundle: Bundle, prompts: Sequence[str], first: torch.Tensor,
                     motion_score: Union[float, torch.Tensor], options: KeyframeOptions, *,
                     generator: Optional[torch.Generator] = None, callback: Callback = None,
                     references: Optional[ReferenceSet] = None) -> torch.Tensor:
    """Keyframe latents (b, c, num_frames, h, w) from prompts and first-frame latents `first`
    (b, c, h, w), scaled like the training latents, and motion scores (shard units, one or one per
    prompt), with three-way guidance [text + image, null text + image, null text + no image] in one
    batched forward (a fourth branch, text + image motion-free, with `options.motion_guidance`). `options.use_image=False` gives every branch no first frame (plain
    text-to-video), and the guidance reduces to text guidance with scale w_T.
    `options.keep_first_frame` holds frame 0 to `first` (clean, not noise-augmented) at every step,
    as it always is for a model trained with `anchor_first_frame`. `references`: as for
    `sample_first_frames` (every branch, the motion-free one too; reference guidance one more)."""
    denoiser, rc = bundle.denoiser, bundle.recipe
    b, device = len(prompts), bundle.device
    if rc.get("conditioning", "first_frame") == "text":
        return _text_video_keyframes(bundle, prompts, first if options.use_image else None, motion_score, options,
                                     (generator, callback, references))
    if first.shape[0] != b:
        raise ValueError(f"{b} prompts but {first.shape[0]} first frames")
    levels = bundle.schedule.num_steps
    _need("noise_aug_level", options.noise_aug_level, options.noise_aug_level < levels, f"below the schedule's {levels} steps")
    scores = torch.as_tensor(motion_score, dtype=torch.float32)
    _need("motion_score", motion_score, bool(torch.isfinite(scores).all() and (scores >= 0).all()), "finite and >= 0")
    first = first.to(device)
    text, uncond_text = denoiser.guidance_contexts(prompts, options.negative_prompt)
    level = torch.full((b,), int(options.noise_aug_level), dtype=torch.long, device=device)
    first_aug = noise_augment(bundle.schedule, first, level, generator, options.noise_aug_noise) if options.noise_aug_level > 0 else first
    motion = torch.as_tensor(motion_score, dtype=torch.float32, device=device).expand(b).clone()
    # as in training, a branch without the first frame has noise-augmentation level 0
    with_image = KeyframeCondition(text, first_aug, torch.ones(b, device=device), level, motion, rc.motion.scale)
    without_image = replace(with_image, has_image=torch.zeros(b, device=device), noise_level=torch.zeros_like(level))
    text_image = with_image if options.use_image else without_image
    image_only, neither = replace(text_image, text=uncond_text), replace(without_image, text=uncond_text)
    branches = [text_image, image_only, neither]
    if options.motion_guidance:  # every branch says which samples are motion-free: one stacked batch
        full, free = torch.zeros(b, dtype=torch.bool, device=device), torch.ones(b, dtype=torch.bool, device=device)
        branches = [replace(c, motion_free=full) for c in branches] + [replace(text_image, motion_free=free)]
    branches, terms = identity_guided(bundle, branches, references, options.identity_scale, options.reference_guidance)
    if options.motion_guidance:
        terms.insert(0, GuidanceTerm(branches.pop(3), options.motion_guidance))
    model_fn = text_image_guided(denoiser, *branches, options.text_guidance, options.image_guidance, terms)
    c, h, w = first.shape[1:]
    # a model given its first frame as frame 0 of x_t (model.anchor_first_frame) never learned
    # to predict that frame: it is the first frame
    anchored = denoiser.unet.cfg.anchor_first_frame
    if (options.keep_first_frame or anchored) and options.use_image:
        model_fn = with_known(model_fn, bundle.schedule, rc.diffusion.target, first[:, :, None],
                              given_frames(with_image.has_image, options.num_frames))
    x_T = _noise((b, c, options.num_frames, h, w), generator, device)
    return sample(model_fn, bundle.schedule, x_T, options.spec, target=rc.diffusion.target,
                  data_range=rc.latent_scale, generator=generator, callback=callback)


def _text_video_keyframes(bundle: Bundle, prompts: Sequence[str], anchor: Optional[torch.Tensor],
                          motion_score: Union[float, torch.Tensor], options: KeyframeOptions,
                          run: Tuple[Optional[torch.Generator], Callback, Optional[ReferenceSet]]) -> torch.Tensor:
    """A text-to-video model's keyframes, text-guided, with the anchor latent `anchor` (b, c, h, w)
    (None: plain text-to-video) put in frame `options.anchor_frame` as `options.anchor` says:
    first_step (x_T only), every_step (its x0 held, re-noised each step) or clean (given clean at
    every call, as anchor training gives it; the frame then ends on it, as with every_step).
    `run`: sample_keyframes' generator, callback and references."""
    denoiser, rc, device = bundle.denoiser, bundle.recipe, bundle.device
    generator, callback, references = run
    b, k = len(prompts), options.anchor_frame
    motion = torch.as_tensor(motion_score, dtype=torch.float32, device=device).expand(b).clone()
    _need("motion_score", motion_score, bool(torch.isfinite(motion).all() and (motion >= 0).all()), "finite and >= 0")
    text, uncond_text = denoiser.guidance_contexts(prompts, options.negative_prompt)
    cond = TextVideoCondition(text, motion, rc.motion.scale)
    c, h, w = denoiser.unet.cfg.out_channels, None, None
    if anchor is not None:
        anchor = anchor.to(device)
        if anchor.shape[0] != b:
            raise ValueError(f"{b} prompts but {anchor.shape[0]} anchor frames")
        c, h, w = anchor.shape[1:]
        if options.anchor == "clean":
            cond = replace(cond, anchor=anchor, has_anchor=torch.ones(b, device=device), anchor_frame=k,
                           anchor_timestep=bool(rc.anchor.timestep))
    else:
        h, w = (int(v) // bundle.movq.downsample_factor for v in bundle.cfg.data.size)
    (cond, uncond), terms = identity_guided(bundle, [cond, replace(cond, text=uncond_text)], references,
                                            options.identity_scale, options.reference_guidance)
    model_fn = text_guided(denoiser, cond, uncond, options.text_guidance, terms)
    x_T = _noise((b, c, options.num_frames, h, w), generator, device)
    if anchor is not None:
        if options.anchor == "first_step":
            x_T[:, :, k] = anchor
        else:
            frame = given_frames(torch.ones(b, device=device), options.num_frames, k)
            model_fn = with_known(model_fn, bundle.schedule, rc.diffusion.target, anchor[:, :, None], frame)
    return sample(model_fn, bundle.schedule, x_T, options.spec, target=rc.diffusion.target,
                  data_range=rc.latent_scale, generator=generator, callback=callback)


@torch.no_grad()
def interpolate(bundle: Bundle, keyframes: torch.Tensor, prompts: Sequence[str], options: InterpolationOptions, *,
                generator: Optional[torch.Generator] = None, callback: Callback = None) -> torch.Tensor:
    """Keyframe latents (b, c, N, h, w), scaled -> (b, c, frames_after_passes(N, passes), h, w), one
    pass per entry of `options.skip_frames`.

    Each pass samples all gaps at once; the unconditional branch is null text (or the negative
    prompt), zeroed keyframes and temporal mask 0; a blank prompt is the null text. With
    `options.residual` the model's samples are residuals over `gap_blend`, which is added back."""
    denoiser, rc = bundle.denoiser, bundle.recipe
    b, k, device = keyframes.shape[0], rc.frames_per_gap, bundle.device
    text, uncond_text = denoiser.guidance_contexts(prompts, options.negative_prompt)
    keys = keyframes.to(device)
    data_range = 2 * rc.latent_scale if options.residual else rc.latent_scale
    for skip in options.skip_frames:
        c, n, h, w = keys.shape[1:]
        cond = InterpolationCondition(text, keys, torch.ones(b, device=device), skip)
        uncond = InterpolationCondition(uncond_text, keys, torch.zeros(b, device=device), skip)
        x_T = _noise((b, k * c, n - 1, h, w), generator, device)
        new = sample(text_guided(denoiser, cond, uncond, options.guidance), bundle.schedule, x_T, options.spec,
                     target=rc.diffusion.target, data_range=data_range, generator=generator, callback=callback)
        if options.residual:
            new = new + gap_blend(keys, k)
        keys = merge_gaps(keys, new, k)
    return keys


def fit_frames(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(b, 3, h, w) in [-1, 1] -> resized to cover (height, width) and centre-cropped, as the
    release turns its 2x first frame into the video's."""
    from kvideo.data.shards import resize_and_crop

    return resize_and_crop(images, (height, width), None).clamp(-1, 1)


def first_frames_at(t2i: Bundle, prompts: Sequence[str], options: FirstFrameOptions, size: Sequence[int], *,
                    generator: Optional[torch.Generator] = None, callback: Callback = None,
                    references: Optional[ReferenceSet] = None) -> torch.Tensor:
    """The first frames of videos of `size` (height, width): the t2i images at the options' size
    (the release: twice the video's), fitted to `size` (`fit_frames`)."""
    images = sample_first_frames(t2i, prompts, options, generator=generator, callback=callback, references=references)
    return fit_frames(images, *size)


__all__ = ["FirstFrameOptions", "KeyframeOptions", "InterpolationOptions", "sampler_spec", "check_sampling",
           "sampling_noise_level", "resolve_motion_score", "sample_first_frames", "sample_keyframes", "interpolate",
           "fit_frames", "first_frames_at"]
