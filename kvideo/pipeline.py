"""The whole cascade at inference: prompts -> first frame -> keyframes -> interpolation -> frames.

    pipe = Pipeline.from_config("configs/pipeline/shapes.yaml")
    out = pipe(["a red circle moving left slowly on a white background"], seed=0, fps_preset="medium")
    out.frames  # (b, 3, f, H, W) in [-1, 1], played at out.fps frames per second

The stages, as the release runs them (../shared/reference/kandinsky_video.md, "The cascade at
inference"):

1. first frame: the t2i model at `first_frame_scale` times the video size, decoded, resized,
   centre-cropped and re-encoded with the keyframe model's MoVQ; or a user image (image-to-video);
2. keyframes: the keyframe model from that latent, with the motion score, the
   noise-augmentation level and three-way text / image guidance;
3. interpolation: 0, 1 or 2 passes (an fps preset, low / medium / high as the release's `fps`
   argument, or a pass count), each turning N frames into 4N - 3;
4. decoding: the temporal video decoder over overlapping windows, or the MoVQ's image decoder
   frame by frame when the pipeline has no video decoder.

Unlike the release, the negative prompt is used (it replaces the null text of every guided
stage), any motion preset the keyframe model defines is accepted (and nothing else), and one
seed (or generator) fixes the whole video. Every stage's setting is an argument of `__call__`,
defaulting to that stage's `recipe.sampling`, whose keys the pipeline config's `sampling` can
replace per stage (`sampling: {keyframe: {spacing: trailing}}`); the arguments are the fields of
`PipelineCall`, and `pipe.settings(**arguments)` resolves them without sampling (what the call
would run, as `VideoOutput.settings`). The stages run through the inference layer
(`kvideo.inference`); nothing here imports training code.
Checkpoints are checked against each other when the pipeline is built: each must be of its
stage, and the keyframe, interpolation and video decoder stages must share one latent space
(the same MoVQ encoder), or it is a ValueError that names the files.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from omegaconf import OmegaConf, read_write
from omegaconf.errors import ValidationError

from kvideo.inference.autoencoder import decode_latents, latent_space, load_video_movq
from kvideo.inference.gaps import frames_after_passes
from kvideo.inference.identity import IdentityBank, ReferenceSet
from kvideo.inference.loading import Bundle, load_bundle
from kvideo.inference.sampling import (FirstFrameOptions, InterpolationOptions, KeyframeOptions, first_frames_at,
                                       fit_frames, interpolate, resolve_motion_score, sample_keyframes)
from kvideo.models.blocks import compile_blocks

FPS_PRESETS: Dict[str, int] = {"low": 0, "medium": 1, "high": 2}  # interpolation passes (the release's fps=...)
RENAMED_KEYS = {"fps": "fps_preset"}  # old pipeline key or call argument -> its name now


@dataclass
class PipelineConfig:
    """configs/pipeline/*.yaml: the checkpoint of each stage (run dir, checkpoint dir or file)."""

    t2i: Optional[str] = None  # optional when every call gives an image
    # "keyframe": the keyframe checkpoint makes the first frames itself, in image mode (the
    # released model's way; train it with recipe.images.share > 0), and `t2i` must be empty;
    # "none": no first frame unless a call gives an image (plain text-to-video keyframes)
    first_frame_model: str = "t2i"
    # the first frame's prompt (kvideo.inference.rewrite): identity | shapesworld | llm:PATH, with
    # the LLM's template (holding {prompt}; none: the default) and token limit
    rewriter: str = "identity"
    rewriter_template: Optional[str] = None
    rewriter_max_new_tokens: int = 64
    keyframe: str = ""
    keyframe_lora: Optional[str] = None  # a LoRA adapter (tools/merge_lora.py --lora-out) over the keyframe checkpoint
    interpolation: Optional[str] = None  # none: keyframes only ("low")
    video_decoder: Optional[str] = None  # none: the keyframe MoVQ's image decoder
    which: str = "ema"  # ema | model weights of every checkpoint
    device: str = "cpu"
    first_frame_scale: int = 2  # the t2i image is this many times the video size (release: 2)
    fps_preset: str = "medium"  # default interpolation preset: low | medium | high = 0 | 1 | 2 passes
    decode_window: Optional[int] = 16  # video-decoder window (frames); none: the whole clip at once
    decode_overlap: int = 4
    # torch.compile every block of every network in place (static shapes: each new size or batch
    # compiles again); pays off over many calls of one shape
    compile: bool = False
    # Per stage (t2i, keyframe, interpolation), keys of that checkpoint's recipe.sampling to replace,
    # e.g. {keyframe: {spacing: trailing}}: the defaults every __call__ argument falls back to.
    sampling: Dict[str, Dict[str, Any]] = field(default_factory=dict)


SAMPLING_STAGES = ("t2i", "keyframe", "interpolation")
MotionScore = Union[str, float, Sequence[Union[str, float]], None]


@dataclass
class PipelineCall:
    """The settings of one pipeline call. None falls back to the stage's `recipe.sampling` (after the
    pipeline config's `sampling` replacements) or the pipeline config."""

    first_frame: bool = True  # False: plain text-to-video keyframes (no first frame)
    size: Optional[List[int]] = None  # (height, width); None: the keyframe model's data.size
    num_keyframes: Optional[int] = None
    fps_preset: Optional[str] = None  # low | medium | high: 0 / 1 / 2 interpolation passes
    passes: Optional[int] = None  # wins over fps_preset
    motion_score: MotionScore = None  # a number or preset name, or one per prompt
    noise_aug_level: Optional[int] = None
    t2i_sampler: Optional[str] = None
    t2i_steps: Optional[int] = None
    t2i_guidance: Optional[float] = None
    keyframe_sampler: Optional[str] = None
    keyframe_steps: Optional[int] = None
    text_guidance: Optional[float] = None
    image_guidance: Optional[float] = None
    keep_first_frame: Optional[bool] = None  # frame 0 held to the first frame (replacement sampling)
    motion_guidance: Optional[float] = None  # w_M of motion-free guidance (0: none)
    anchor: Optional[str] = None  # a text-to-video keyframe model's anchor: first_step | every_step | clean
    anchor_frame: Optional[int] = None  # the keyframe the first frame anchors
    rewrite: Optional[str] = None  # the first frame's prompt rewriter (default: the config's rewriter)
    interpolation_sampler: Optional[str] = None
    interpolation_steps: Optional[int] = None
    interpolation_guidance: Optional[float] = None
    decode_window: Optional[int] = None
    negative_prompt: Optional[str] = None
    identity_scale: Optional[float] = None  # with references: the identity attention's strength
    reference_guidance: Optional[float] = None  # with references: w_R of reference guidance (0: none)
    seed: Optional[int] = 0


@dataclass
class CallPlan:
    """A call's settings resolved against the stages: what `__call__` runs."""

    source: str  # first frame: "t2i" | "keyframe" (its image mode) | "image" | "none"
    first_frame_options: Optional[FirstFrameOptions]  # the generated image's options (source t2i / keyframe)
    keyframes: KeyframeOptions
    motion: Union[float, List[float]]
    interpolation: Optional[InterpolationOptions]  # None: no pass
    decoder: str  # "video" | "image"
    decode_window: Optional[int]
    size: List[int]
    seed: Optional[int]
    rewriter: str = "identity"  # the first frame's prompt (source t2i / keyframe)

    def settings(self) -> Dict[str, Any]:
        """The plan as plain data (VideoOutput.settings, the JSON beside each mp4)."""
        first: Dict[str, Any] = {"source": self.source}
        if self.first_frame_options is not None:
            f = self.first_frame_options
            first.update(_spec_settings(f.spec), guidance=f.guidance, size=[f.height, f.width], rewriter=self.rewriter,
                         identity_scale=f.identity_scale, reference_guidance=f.reference_guidance)
        k = self.keyframes
        keyframes = {**_spec_settings(k.spec), "text_guidance": k.text_guidance, "image_guidance": k.image_guidance,
                     "noise_aug_level": k.noise_aug_level, "noise_aug_noise": k.noise_aug_noise,
                     "motion_score": self.motion, "num_keyframes": k.num_frames,
                     "keep_first_frame": k.keep_first_frame, "motion_guidance": k.motion_guidance,
                     "anchor": k.anchor, "anchor_frame": k.anchor_frame, "identity_scale": k.identity_scale,
                     "reference_guidance": k.reference_guidance}
        interp: Dict[str, Any] = {"passes": 0}
        if self.interpolation is not None:
            i = self.interpolation
            interp = {"passes": len(i.skip_frames), **_spec_settings(i.spec), "guidance": i.guidance,
                      "skip_frames": list(i.skip_frames)}
        return {"first_frame": first, "keyframes": keyframes, "interpolation": interp, "decoder": self.decoder,
                "decode_window": self.decode_window, "size": list(self.size),
                "negative_prompt": self.keyframes.negative_prompt, "seed": self.seed}


def _spec_settings(spec) -> Dict[str, Any]:
    return {k: asdict(spec)[k] for k in ("sampler", "steps", "spacing", "timestep_shift", "dynamic_threshold",
                                         "threshold_max")}


def override_sampling(stage_cfg, overrides: Dict[str, Any], stage: str, checkpoint: str) -> None:
    """Replace keys of `stage_cfg.recipe.sampling` in place; an unknown key is a ValueError naming it."""
    sampling = stage_cfg.recipe.sampling
    for key, value in overrides.items():
        if key not in sampling:
            raise ValueError(f"pipeline config: sampling.{stage}.{key} is not a sampling setting of the {stage} "
                             f"checkpoint '{checkpoint}' (it has: {', '.join(sampling)})")
        if isinstance(sampling[key], float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # `timestep_shift=2` on the command line
        try:
            with read_write(sampling):
                sampling[key] = value
        except ValidationError as e:
            raise ValueError(f"pipeline config: sampling.{stage}.{key} = {value!r}: {e.msg}") from None


@dataclass
class VideoOutput:
    frames: torch.Tensor  # (b, 3, f, H, W) in [-1, 1]
    fps: float
    first_frames: torch.Tensor  # (b, 3, H, W): what the keyframes were conditioned on (or keyframe 0)
    keyframes: torch.Tensor  # (b, 3, n, H, W): the keyframes through the image decoder
    timings: Dict[str, float] = field(default_factory=dict)  # seconds per stage
    settings: Dict[str, object] = field(default_factory=dict)  # what every stage ran with
    first_frame_prompts: Optional[List[str]] = None  # what the first frames were drawn from (the rewriter's output)


def load_pipeline_config(path: Union[str, Path], overrides: Sequence[str] = ()) -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pipeline config '{path}' does not exist")
    raw = [("", OmegaConf.load(path)), ("override ", OmegaConf.from_dotlist(list(overrides)))]
    for source, values in raw:
        for old, new in RENAMED_KEYS.items():
            if old in values:
                raise ValueError(f"pipeline config '{path}': {source}key '{old}' is now '{new}' "
                                 f"(an interpolation preset: {', '.join(FPS_PRESETS)})")
    merged = OmegaConf.merge(OmegaConf.structured(PipelineConfig), *[values for _, values in raw])
    cfg = OmegaConf.to_object(merged)
    if not cfg.keyframe:
        raise ValueError(f"pipeline config '{path}': 'keyframe' (the keyframe checkpoint) is required")
    if cfg.fps_preset not in FPS_PRESETS:
        raise ValueError(f"pipeline config '{path}': fps_preset must be one of {list(FPS_PRESETS)}; "
                         f"got {cfg.fps_preset!r}")
    if unknown := sorted(set(cfg.sampling) - set(SAMPLING_STAGES)):
        raise ValueError(f"pipeline config '{path}': sampling.{unknown[0]} is not a stage; "
                         f"expected some of {', '.join(SAMPLING_STAGES)}")
    return cfg


class _Progress:
    """One tqdm bar per stage (or none), and the stage's wall time."""

    def __init__(self, enabled: bool, timings: Dict[str, float]):
        self.enabled, self.timings = enabled, timings

    @contextmanager
    def stage(self, name: str, total: int):
        bar = None
        if self.enabled:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=name, leave=True)
        t0 = time.perf_counter()
        try:
            yield (lambda *_: bar.update(1)) if bar is not None else None
        finally:
            self.timings[name] = time.perf_counter() - t0
            if bar is not None:
                bar.close()


class Pipeline:
    """The trained stages of one cascade (see the module docstring)."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.device = device = torch.device(cfg.device)
        self._rewriters: Dict[str, Any] = {}
        self.keyframe: Bundle = load_bundle(cfg.keyframe, "keyframe", cfg.which, device)
        if cfg.keyframe_lora:  # base + adapter (Factorized Video Generation's anchor grounding)
            from kvideo.inference.lora import load_lora

            load_lora(self.keyframe.denoiser.unet, cfg.keyframe_lora)
            self.keyframe.denoiser.to(device).eval()
        self.movq = self.keyframe.movq  # the latent space of the keyframes and everything after them
        if cfg.first_frame_model not in ("t2i", "keyframe", "none"):
            raise ValueError(f"pipeline config: first_frame_model must be t2i, keyframe or none; "
                             f"got {cfg.first_frame_model!r}")
        if cfg.first_frame_model != "t2i" and cfg.t2i:
            raise ValueError(f"pipeline config: first_frame_model: {cfg.first_frame_model} uses no t2i checkpoint; "
                             f"remove t2i ('{cfg.t2i}') or set first_frame_model: t2i")
        self.t2i: Optional[Bundle] = load_bundle(cfg.t2i, "t2i", cfg.which, device) if cfg.t2i else None
        if cfg.first_frame_model == "keyframe":
            self.t2i = self.keyframe  # its video UNet in image mode (sample_first_frames)
        latent = latent_space(self.movq)
        self.interpolation: Optional[Bundle] = None
        if cfg.interpolation:
            self.interpolation = load_bundle(cfg.interpolation, "interpolation", cfg.which, device)
            if latent_space(self.interpolation.movq) != latent:
                raise ValueError(f"interpolation checkpoint '{cfg.interpolation}' works in the latent space of "
                                 f"'{self.interpolation.recipe.movq}', the keyframe checkpoint '{cfg.keyframe}' in "
                                 f"that of '{self.keyframe.recipe.movq}': train them on one MoVQ")
            c = self.keyframe.denoiser.unet.cfg.out_channels
            predicted = self.interpolation.denoiser.unet.cfg.out_channels
            if predicted != c * self.interpolation.recipe.frames_per_gap:
                raise ValueError(f"interpolation checkpoint '{cfg.interpolation}' predicts {predicted} channels per "
                                 f"gap; keyframe latents have {c}")
        self.decoder = None
        if cfg.video_decoder:
            self.decoder = load_video_movq(cfg.video_decoder, cfg.which, device)
            if latent_space(self.decoder) != latent:
                raise ValueError(f"video decoder checkpoint '{cfg.video_decoder}' has another MoVQ encoder than the "
                                 f"keyframe checkpoint '{cfg.keyframe}' ('{self.keyframe.recipe.movq}'): its decoder "
                                 "would misread the latents")
        bundles = {"t2i": self.t2i, "keyframe": self.keyframe, "interpolation": self.interpolation}
        for stage, overrides in cfg.sampling.items():
            if bundles.get(stage) is None:
                raise ValueError(f"pipeline config: sampling.{stage} is given but the pipeline has no {stage} checkpoint")
            override_sampling(bundles[stage].cfg, overrides, stage, getattr(cfg, stage))
        if cfg.compile:
            networks = [n for b in bundles.values() if b is not None for n in (b.denoiser, b.movq)] + [self.decoder]
            for net in {id(n): n for n in networks if n is not None}.values():  # t2i may be the keyframe's
                compile_blocks(net)

    @classmethod
    def from_config(cls, path: Union[str, Path], overrides: Sequence[str] = ()) -> "Pipeline":
        return cls(load_pipeline_config(path, overrides))

    @property
    def max_passes(self) -> int:
        return len(self.interpolation.recipe.passes) if self.interpolation is not None else 0

    def _passes(self, fps_preset: Optional[str], passes: Optional[int]) -> int:
        if passes is None:
            fps_preset = fps_preset or self.cfg.fps_preset
            if fps_preset not in FPS_PRESETS:
                raise ValueError(f"unknown fps preset {fps_preset!r}; choose from {', '.join(FPS_PRESETS)}")
            passes = FPS_PRESETS[fps_preset]
        if not 0 <= passes <= self.max_passes:
            have = (f"the interpolation checkpoint '{self.cfg.interpolation}' was trained for {self.max_passes} "
                    "pass(es) (recipe.passes)") if self.interpolation is not None \
                else "the pipeline has no interpolation stage"
            raise ValueError(f"{passes} interpolation pass(es) requested (fps_preset={fps_preset!r}); {have}")
        return passes

    def plan(self, call: PipelineCall, image: bool = False) -> CallPlan:
        """What a call with these settings runs, every stage's options resolved against its
        checkpoint's recipe (and the pipeline config), without sampling anything. `image`: whether
        the call gives a first-frame image. Bad settings are the ValueError the call would raise."""
        keyframe_cfg = self.keyframe.cfg
        height, width = (int(v) for v in (call.size or keyframe_cfg.data.size))
        factor = self.movq.downsample_factor
        if height % factor or width % factor:
            raise ValueError(f"size {height}x{width} is not a multiple of the MoVQ's downsampling factor {factor}")
        n_passes = self._passes(call.fps_preset, call.passes)
        if isinstance(call.motion_score, (list, tuple)):  # one per prompt
            motion = [resolve_motion_score(keyframe_cfg.recipe.motion, m) for m in call.motion_score]
        else:
            motion = resolve_motion_score(keyframe_cfg.recipe.motion, call.motion_score)

        rewriter = call.rewrite or self.cfg.rewriter
        if rewriter not in ("identity", "shapesworld") and not rewriter.startswith("llm:"):
            raise ValueError(f"unknown first-frame rewriter {rewriter!r}: identity, shapesworld or llm:PATH")
        first_frame_options = None
        if not call.first_frame or (self.cfg.first_frame_model == "none" and not image):
            # plain text-to-video keyframes: the model's image-dropped branch
            if image:
                raise ValueError("an image was given with first_frame=False")
            source = "none"
        elif image:
            source = "image"
        else:
            if self.t2i is None:
                raise ValueError("no first frame: the pipeline config has no t2i checkpoint and no image was given")
            source, scale = self.cfg.first_frame_model, self.cfg.first_frame_scale
            first_frame_options = FirstFrameOptions.from_recipe(self.t2i.cfg, sampler=call.t2i_sampler, steps=call.t2i_steps,
                                                  guidance=call.t2i_guidance, height=height * scale,
                                                  width=width * scale, negative_prompt=call.negative_prompt,
                                                  identity_scale=call.identity_scale,
                                                  reference_guidance=call.reference_guidance)
        keyframes = KeyframeOptions.from_recipe(
            keyframe_cfg, sampler=call.keyframe_sampler, steps=call.keyframe_steps, text_guidance=call.text_guidance,
            image_guidance=call.image_guidance, noise_aug_level=call.noise_aug_level, num_frames=call.num_keyframes,
            use_image=source != "none", negative_prompt=call.negative_prompt, keep_first_frame=call.keep_first_frame,
            motion_guidance=call.motion_guidance, anchor=call.anchor, anchor_frame=call.anchor_frame,
            identity_scale=call.identity_scale, reference_guidance=call.reference_guidance)
        interp = None
        if n_passes:
            interp = InterpolationOptions.from_recipe(
                self.interpolation.cfg, sampler=call.interpolation_sampler, steps=call.interpolation_steps,
                guidance=call.interpolation_guidance,
                skip_frames=[p.skip_frames for p in self.interpolation.recipe.passes][:n_passes],
                negative_prompt=call.negative_prompt)
        return CallPlan(source, first_frame_options, keyframes, motion, interp, "video" if self.decoder is not None else "image",
                        call.decode_window if call.decode_window is not None else self.cfg.decode_window,
                        [height, width], call.seed, rewriter)

    def settings(self, *, image: bool = False, **arguments: Any) -> Dict[str, Any]:
        """`plan(PipelineCall(**arguments), image).settings()`: what a call with these arguments runs,
        as plain data; an unknown argument is a ValueError naming it."""
        return self.plan(_pipeline_call(arguments), image).settings()

    @torch.no_grad()
    def __call__(self, prompts: Union[str, Sequence[str]], *, image: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None, seed: Optional[int] = 0, progress: bool = True,
                 motion_score: MotionScore = None, references: Optional[ReferenceSet] = None,
                 **arguments: Any) -> VideoOutput:
        """Videos for `prompts` (one per prompt). `arguments` are the fields of `PipelineCall` (size,
        num_keyframes, fps_preset or passes, noise_aug_level, each stage's sampler / steps / guidance,
        decode_window, first_frame, negative_prompt). `image` (b or 1, 3, h, w) in [-1, 1]
        replaces the t2i first frame (resized and centre-cropped). `motion_score`: a number or
        preset name, or a list of them (one per prompt). `first_frame=False` samples plain
        text-to-video keyframes (no first frame; `first_frames` is then the first keyframe).
        `generator` wins over `seed`; the same seed and arguments give the same video.
        `references`: the characters' reference images (`IdentityBank.references_for`), given to
        every stage trained with identity attention (the first frame's, the keyframes'); a
        pipeline with neither is a ValueError."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts")
        b = len(prompts)
        if isinstance(motion_score, (list, tuple)) and len(motion_score) != b:
            raise ValueError(f"{len(motion_score)} motion scores for {b} prompts")
        call = _pipeline_call({**arguments, "motion_score": motion_score, "seed": seed if generator is None else None})
        plan = self.plan(call, image is not None)
        identity = self._identity_stages(plan, references, b)
        height, width = plan.size
        motion = torch.tensor(plan.motion) if isinstance(plan.motion, list) else plan.motion
        gen = generator if generator is not None else torch.Generator().manual_seed(0 if seed is None else seed)
        timings: Dict[str, float] = {}
        bars = _Progress(progress, timings)

        # 1. first frame
        first_frames = None
        if plan.source == "image":
            first_frames = fit_frames(image.to(self.device).float(), height, width)
            if first_frames.shape[0] == 1 and b > 1:
                first_frames = first_frames.expand(b, -1, -1, -1)
            if first_frames.shape[0] != b:
                raise ValueError(f"{first_frames.shape[0]} images for {b} prompts")
        elif plan.source in ("t2i", "keyframe"):
            first_prompts = self.rewriter(plan.rewriter)(prompts)  # the first frame alone (Factorized Video Generation)
            with bars.stage("first frame", plan.first_frame_options.spec.steps) as cb:
                first_frames = first_frames_at(self.t2i, first_prompts, plan.first_frame_options, (height, width),
                                               generator=gen, callback=cb,
                                               references=references if "first_frame" in identity else None)
        scale = self.keyframe.recipe.latent_scale
        if first_frames is not None:
            first_latent = self.movq.encode(first_frames).float() * scale  # re-encoded at the video size
        else:
            c, factor = self.keyframe.denoiser.unet.cfg.out_channels, self.movq.downsample_factor
            first_latent = torch.zeros(b, c, height // factor, width // factor, device=self.device)

        # 2. keyframes
        with bars.stage("keyframes", plan.keyframes.spec.steps) as cb:
            latents = sample_keyframes(self.keyframe, prompts, first_latent, motion, plan.keyframes, generator=gen,
                                       callback=cb, references=references if "keyframes" in identity else None)
        keyframes = decode_latents(self.movq, latents, scale)
        if first_frames is None:
            first_frames = keyframes[:, :, 0]
        z = latents / scale  # unscaled MoVQ latents (b, c, n, h, w)

        # 3. interpolation
        fps = float(self.keyframe.cfg.data.fps)  # frames per second of the output
        if plan.interpolation is not None:
            recipe, passes = self.interpolation.recipe, len(plan.interpolation.skip_frames)
            with bars.stage("interpolation", plan.interpolation.spec.steps * passes) as cb:
                z = interpolate(self.interpolation, z * recipe.latent_scale, prompts, plan.interpolation,
                                generator=gen, callback=cb) / recipe.latent_scale
            assert z.shape[2] == frames_after_passes(plan.keyframes.num_frames, passes, recipe.frames_per_gap)
            fps *= (recipe.frames_per_gap + 1) ** passes

        # 4. decoding
        with bars.stage("decode", 1) as cb:
            if self.decoder is not None:
                frames = self.decoder.decode_video(z, window=plan.decode_window,
                                                   overlap=self.cfg.decode_overlap).clamp(-1, 1)
            else:
                frames = decode_latents(self.movq, z, 1.0)
            if cb:
                cb()
        settings = plan.settings()
        if references is not None:
            settings["identity"] = {"stages": identity, "names": references.names}
        return VideoOutput(frames=frames, fps=fps, first_frames=first_frames, keyframes=keyframes, timings=timings,
                           settings=settings,
                           first_frame_prompts=first_prompts if plan.source in ("t2i", "keyframe") else None)

    def _identity_stages(self, plan: CallPlan, references: Optional[ReferenceSet], b: int) -> List[str]:
        """The stages the references go to: the first frame's model (when it samples one) and the
        keyframe model, each when it has identity attention; references none takes are a ValueError."""
        if references is None:
            return []
        if references.batch_size != b:
            raise ValueError(f"references for {references.batch_size} prompts; the call has {b}")
        takes = {"first_frame": plan.source in ("t2i", "keyframe") and self.t2i.denoiser.reference is not None,
                 "keyframes": self.keyframe.denoiser.reference is not None}
        if not any(takes.values()):
            raise ValueError(f"references were given, but no stage of this pipeline has identity attention "
                             f"(model.identity_attention): keyframe '{self.cfg.keyframe}'"
                             + (f", first frame '{self.t2i.path}'" if plan.source in ("t2i", "keyframe") else ""))
        return [stage for stage, ok in takes.items() if ok]

    def references_from(self, bank: IdentityBank, prompts: Sequence[str]) -> ReferenceSet:
        """Each prompt's references from `bank`: the entries it names, in caption order, in as many
        slots as the keyframe model was trained with (data.max_references)."""
        return bank.references_for(prompts, max_entries=int(self.keyframe.cfg.data.get("max_references", 2)))

    def rewriter(self, spec: str):
        """The first-frame prompt rewriter named `spec` (built once per pipeline: an LLM is loaded once)."""
        from kvideo.inference.rewrite import build_rewriter

        if spec not in self._rewriters:
            llm = {"max_new_tokens": self.cfg.rewriter_max_new_tokens, "device": self.cfg.device}
            if self.cfg.rewriter_template:
                llm["template"] = self.cfg.rewriter_template
            self._rewriters[spec] = build_rewriter(spec, **(llm if spec.startswith("llm:") else {}))
        return self._rewriters[spec]


def _pipeline_call(arguments: Dict[str, Any]) -> PipelineCall:
    for old, new in RENAMED_KEYS.items():
        if old in arguments:
            raise ValueError(f"pipeline argument '{old}' is now '{new}' (an interpolation preset: "
                             f"{', '.join(FPS_PRESETS)})")
    known = {f.name for f in fields(PipelineCall)}
    unknown = sorted(set(arguments) - known)
    if unknown:
        raise ValueError(f"'{unknown[0]}' is not a pipeline argument; choose from {', '.join(sorted(known))}")
    return PipelineCall(**arguments)


def call_arguments(items: Iterable[str], exclude: Sequence[str] = ()) -> Dict[str, Any]:
    """Command-line `key=value` items -> keyword arguments of a pipeline call, values typed as
    YAML (`3` an int, `false` a bool, `[fast, 0.1]` a list). A key that is not an argument of
    `PipelineCall` (or is in `exclude`) is a ValueError naming it and the allowed keys."""
    allowed = {f.name for f in fields(PipelineCall)} - set(exclude)
    kwargs: Dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"--call '{item}': expected key=value")
        key, value = item.split("=", 1)
        if key not in allowed:
            raise ValueError(f"--call {key}: not a pipeline argument here; choose from {', '.join(sorted(allowed))}")
        kwargs[key] = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={value}"]))["v"]
    return kwargs


def video_to_uint8(video: torch.Tensor) -> "numpy.ndarray":  # noqa: F821
    """(3, f, h, w) in [-1, 1] -> uint8 (f, h, w, 3) for writers."""
    return ((rearrange(video, "c f h w -> f h w c") + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


def write_outputs(out: VideoOutput, paths: List[Union[str, Path]], *, gif: bool = False, sheet: bool = False) -> List[Path]:
    """One H.264 mp4 per video at out.fps (PyAV), plus optionally a GIF and a PNG contact sheet
    (first frame, keyframes, then every frame) beside each. Returns the files written."""
    from kvideo.data.video_io import write_video

    if len(paths) != out.frames.shape[0]:
        raise ValueError(f"{len(paths)} output paths for {out.frames.shape[0]} videos")
    written = []
    for i, path in enumerate(paths):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        frames = video_to_uint8(out.frames[i])
        write_video(path, frames, fps=out.fps)
        written.append(path)
        if gif:
            from PIL import Image

            images = [Image.fromarray(f) for f in frames]
            gif_path = path.with_suffix(".gif")
            frame_ms = 10 * max(2, round(100 / out.fps))  # GIF counts centiseconds; players clamp below 2
            images[0].save(gif_path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
            written.append(gif_path)
        if sheet:
            from torchvision.utils import save_image

            rows = [out.first_frames[i][:, None], out.keyframes[i], out.frames[i]]
            n = max(r.shape[1] for r in rows)
            tiles = torch.cat([F.pad(r, (0, 0, 0, 0, 0, n - r.shape[1]), value=1.0) for r in rows], dim=1)
            sheet_path = path.with_suffix(".png")
            save_image((rearrange(tiles, "c f h w -> f c h w") + 1) / 2, sheet_path, nrow=n)
            written.append(sheet_path)
    return written
