"""The whole cascade at inference: prompts -> first frame -> keyframes -> interpolation -> frames.

    pipe = Pipeline.from_config("configs/pipeline/shapes.yaml")
    out = pipe(["a red circle moving left slowly on a white background"], seed=0, fps="medium")
    out.frames  # (b, 3, f, H, W) in [-1, 1], played at out.fps

The stages, as the release runs them (../shared/reference/kandinsky_video.md, "The cascade at
inference"):

1. first frame: the t2i model at `first_frame_scale` times the video size, decoded, resized,
   centre-cropped and re-encoded with the keyframe model's MoVQ; or a user image (image-to-video);
2. keyframes: the keyframe model from that latent, with the motion score, the
   noise-augmentation level and three-way text / image guidance;
3. interpolation: 0, 1 or 2 passes (an fps preset or a pass count), each turning N frames into
   4N - 3;
4. decoding: the temporal video decoder over overlapping windows, or the MoVQ's image decoder
   frame by frame when the pipeline has no video decoder.

Unlike the release, the negative prompt is used (it replaces the null text of every guided
stage), any motion preset the keyframe model defines is accepted (and nothing else), and one
seed (or generator) fixes the whole video. Every stage's setting is an argument of `__call__`,
defaulting to that stage's `recipe.sampling`, whose keys the pipeline config's `sampling` can
replace per stage (`sampling: {keyframe: {spacing: trailing}}`); `pipe.settings(**arguments)`
resolves them without sampling (what the call would run, as `VideoOutput.settings`).
Checkpoints are checked against each other when the pipeline is built: each must be of its
stage, and the keyframe, interpolation and video decoder stages must share one latent space
(the same MoVQ encoder), or it is a ValueError that names the files.
"""

from __future__ import annotations

import inspect
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from omegaconf import OmegaConf, read_write
from omegaconf.errors import ValidationError

from kvideo.data.latent_cache import fingerprint
from kvideo.stages.interpolation import frames_after_passes, interpolate, load_interpolation
from kvideo.stages.keyframe import (decode_video, load_keyframe, resolve_motion_score, sample_keyframes,
                                    sampling_noise_level)
from kvideo.stages.t2i import load_t2i, make_schedule, sample_images

FPS_PRESETS: Dict[str, int] = {"low": 0, "medium": 1, "high": 2}  # interpolation passes (the release's fps=...)


@dataclass
class PipelineConfig:
    """configs/pipeline/*.yaml: the checkpoint of each stage (run dir, checkpoint dir or file)."""

    t2i: Optional[str] = None  # optional when every call gives an image
    keyframe: str = ""
    interpolation: Optional[str] = None  # none: keyframes only ("low")
    video_decoder: Optional[str] = None  # none: the keyframe MoVQ's image decoder
    which: str = "ema"  # ema | model weights of every checkpoint
    device: str = "cpu"
    first_frame_scale: int = 2  # the t2i image is this many times the video size (release: 2)
    fps: str = "medium"  # default fps preset
    decode_window: Optional[int] = 16  # video-decoder window (frames); none: the whole clip at once
    decode_overlap: int = 4
    # Per stage (t2i, keyframe, interpolation), keys of that checkpoint's recipe.sampling to replace,
    # e.g. {keyframe: {spacing: trailing}}: the defaults every __call__ argument falls back to.
    sampling: Dict[str, Dict[str, Any]] = field(default_factory=dict)


SAMPLING_STAGES = ("t2i", "keyframe", "interpolation")


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


def load_pipeline_config(path: Union[str, Path], overrides: Sequence[str] = ()) -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pipeline config '{path}' does not exist")
    merged = OmegaConf.merge(OmegaConf.structured(PipelineConfig), OmegaConf.load(path),
                             OmegaConf.from_dotlist(list(overrides)))
    cfg = OmegaConf.to_object(merged)
    if not cfg.keyframe:
        raise ValueError(f"pipeline config '{path}': 'keyframe' (the keyframe checkpoint) is required")
    if cfg.fps not in FPS_PRESETS:
        raise ValueError(f"pipeline config '{path}': fps must be one of {list(FPS_PRESETS)}; got {cfg.fps!r}")
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
        self.keyframe, self.movq, self.kf_cfg = load_keyframe(cfg.keyframe, cfg.which, device)
        self.t2i = self.t2i_cfg = None
        if cfg.t2i:
            self.t2i, self.t2i_movq, self.t2i_cfg = load_t2i(cfg.t2i, cfg.which, device)
        latent = fingerprint(self.movq.encoder), fingerprint(self.movq.quant_conv)
        self.interp = self.ip_cfg = None
        if cfg.interpolation:
            self.interp, interp_movq, self.ip_cfg = load_interpolation(cfg.interpolation, cfg.which, device)
            if (fingerprint(interp_movq.encoder), fingerprint(interp_movq.quant_conv)) != latent:
                raise ValueError(f"interpolation checkpoint '{cfg.interpolation}' works in the latent space of "
                                 f"'{self.ip_cfg.recipe.movq}', the keyframe checkpoint '{cfg.keyframe}' in that of "
                                 f"'{self.kf_cfg.recipe.movq}': train them on one MoVQ")
            c = self.keyframe.unet.cfg.out_channels
            if self.interp.unet.cfg.out_channels != c * self.ip_cfg.recipe.frames_per_gap:
                raise ValueError(f"interpolation checkpoint '{cfg.interpolation}' predicts "
                                 f"{self.interp.unet.cfg.out_channels} channels per gap; keyframe latents have {c}")
        self.decoder = None
        if cfg.video_decoder:
            from kvideo.stages.video_decoder import load_video_movq

            self.decoder = load_video_movq(cfg.video_decoder, cfg.which, device)
            if (fingerprint(self.decoder.encoder), fingerprint(self.decoder.quant_conv)) != latent:
                raise ValueError(f"video decoder checkpoint '{cfg.video_decoder}' has another MoVQ encoder than the "
                                 f"keyframe checkpoint '{cfg.keyframe}' ('{self.kf_cfg.recipe.movq}'): its decoder "
                                 "would misread the latents")
        stage_cfgs = {"t2i": self.t2i_cfg, "keyframe": self.kf_cfg, "interpolation": self.ip_cfg}
        for stage, overrides in cfg.sampling.items():
            if stage_cfgs.get(stage) is None:
                raise ValueError(f"pipeline config: sampling.{stage} is given but the pipeline has no {stage} checkpoint")
            override_sampling(stage_cfgs[stage], overrides, stage, getattr(cfg, stage))

    @classmethod
    def from_config(cls, path: Union[str, Path], overrides: Sequence[str] = ()) -> "Pipeline":
        return cls(load_pipeline_config(path, overrides))

    @property
    def max_passes(self) -> int:
        return len(self.ip_cfg.recipe.passes) if self.interp is not None else 0

    def _passes(self, fps: Optional[str], passes: Optional[int]) -> int:
        if passes is None:
            fps = fps or self.cfg.fps
            if fps not in FPS_PRESETS:
                raise ValueError(f"unknown fps preset {fps!r}; choose from {', '.join(FPS_PRESETS)}")
            passes = FPS_PRESETS[fps]
        if not 0 <= passes <= self.max_passes:
            have = (f"the interpolation checkpoint '{self.cfg.interpolation}' was trained for {self.max_passes} "
                    "pass(es) (recipe.passes)") if self.interp is not None else "the pipeline has no interpolation stage"
            raise ValueError(f"{passes} interpolation pass(es) requested (fps={fps!r}); {have}")
        return passes

    def settings(self, *, image: bool = False, first_frame: bool = True, size: Optional[Sequence[int]] = None,
                 num_keyframes: Optional[int] = None, fps: Optional[str] = None, passes: Optional[int] = None,
                 motion_score: Union[str, float, Sequence[Union[str, float]], None] = None,
                 noise_aug_level: Optional[int] = None, t2i_sampler: Optional[str] = None,
                 t2i_steps: Optional[int] = None, t2i_guidance: Optional[float] = None,
                 keyframe_sampler: Optional[str] = None, keyframe_steps: Optional[int] = None,
                 text_guidance: Optional[float] = None, image_guidance: Optional[float] = None,
                 interpolation_sampler: Optional[str] = None, interpolation_steps: Optional[int] = None,
                 interpolation_guidance: Optional[float] = None, decode_window: Optional[int] = None,
                 negative_prompt: Optional[str] = None, seed: Optional[int] = 0) -> Dict[str, Any]:
        """What a call with these arguments runs, every stage's setting resolved against its
        checkpoint's `recipe.sampling` (and the pipeline config), without sampling anything:
        `__call__` runs exactly this and returns it as `VideoOutput.settings`. `image`: whether
        the call gives a first-frame image. Bad arguments are the ValueError the call would raise."""
        kf = self.kf_cfg
        rc, ks = kf.recipe, kf.recipe.sampling
        height, width = (int(v) for v in (size or kf.data.size))
        factor = self.movq.downsample_factor
        if height % factor or width % factor:
            raise ValueError(f"size {height}x{width} is not a multiple of the MoVQ's downsampling factor {factor}")
        n_passes = self._passes(fps, passes)
        if isinstance(motion_score, (list, tuple)):  # one per prompt
            motion = [resolve_motion_score(rc.motion, m) for m in motion_score]
        else:
            motion = resolve_motion_score(rc.motion, motion_score)

        if not first_frame:  # plain text-to-video keyframes: the model's image-dropped branch
            if image:
                raise ValueError("an image was given with first_frame=False")
            first = {"source": "none"}
        elif image:
            first = {"source": "image"}
        else:
            if self.t2i is None:
                raise ValueError("no first frame: the pipeline config has no t2i checkpoint and no image was given")
            ts, s = self.t2i_cfg.recipe.sampling, self.cfg.first_frame_scale
            first = {"source": "t2i", "sampler": t2i_sampler or ts.sampler, "steps": t2i_steps or ts.steps,
                     "spacing": ts.spacing, "timestep_shift": ts.timestep_shift,
                     "guidance": ts.guidance if t2i_guidance is None else t2i_guidance,
                     "size": [height * s, width * s]}
        keyframes = {"sampler": keyframe_sampler or ks.sampler, "steps": keyframe_steps or ks.steps,
                     "spacing": ks.spacing, "timestep_shift": ks.timestep_shift,
                     "text_guidance": ks.text_guidance if text_guidance is None else text_guidance,
                     "image_guidance": ks.image_guidance if image_guidance is None else image_guidance,
                     "noise_aug_level": sampling_noise_level(rc.noise_aug) if noise_aug_level is None
                     else int(noise_aug_level),
                     "motion_score": motion, "num_keyframes": int(num_keyframes or kf.data.num_frames)}
        interp: Dict[str, object] = {"passes": n_passes}
        if n_passes:
            isc = self.ip_cfg.recipe.sampling
            interp.update(sampler=interpolation_sampler or isc.sampler, steps=interpolation_steps or isc.steps,
                          spacing=isc.spacing, timestep_shift=isc.timestep_shift,
                          guidance=isc.guidance if interpolation_guidance is None else interpolation_guidance,
                          skip_frames=[p.skip_frames for p in self.ip_cfg.recipe.passes][:n_passes])
        return {"first_frame": first, "keyframes": keyframes, "interpolation": interp,
                "decoder": "video" if self.decoder is not None else "image",
                "decode_window": decode_window if decode_window is not None else self.cfg.decode_window,
                "size": [height, width], "negative_prompt": negative_prompt, "seed": seed}

    @torch.no_grad()
    def __call__(self, prompts: Union[str, Sequence[str]], *, image: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None, seed: Optional[int] = 0, progress: bool = True,
                 motion_score: Union[str, float, Sequence[Union[str, float]], None] = None,
                 **arguments: Any) -> VideoOutput:
        """Videos for `prompts` (one per prompt). `arguments` are those of `settings` (size,
        num_keyframes, fps or passes, noise_aug_level, each stage's sampler / steps / guidance,
        decode_window, first_frame, negative_prompt). `image` (b or 1, 3, h, w) in [-1, 1]
        replaces the t2i first frame (resized and centre-cropped). `motion_score`: a number or
        preset name, or a list of them (one per prompt). `first_frame=False` samples plain
        text-to-video keyframes (no first frame; `first_frames` is then the first keyframe).
        `generator` wins over `seed`; the same seed and arguments give the same video."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts")
        b = len(prompts)
        if isinstance(motion_score, (list, tuple)) and len(motion_score) != b:
            raise ValueError(f"{len(motion_score)} motion scores for {b} prompts")
        settings = self.settings(image=image is not None, motion_score=motion_score,
                                 seed=seed if generator is None else None, **arguments)
        first_settings, kf_settings, ip_settings = (settings[k] for k in ("first_frame", "keyframes", "interpolation"))
        negative_prompt = settings["negative_prompt"]
        height, width = settings["size"]
        rc = self.kf_cfg.recipe
        motion = kf_settings["motion_score"]
        motion = torch.tensor(motion) if isinstance(motion, list) else motion
        gen = generator if generator is not None else torch.Generator().manual_seed(0 if seed is None else seed)
        timings: Dict[str, float] = {}
        bars = _Progress(progress, timings)

        # 1. first frame
        first = None
        if first_settings["source"] == "image":
            first = _fit(image.to(self.device).float(), height, width)
            if first.shape[0] == 1 and b > 1:
                first = first.expand(b, -1, -1, -1)
            if first.shape[0] != b:
                raise ValueError(f"{first.shape[0]} images for {b} prompts")
        elif first_settings["source"] == "t2i":
            ts = self.t2i_cfg.recipe.sampling
            big_h, big_w = first_settings["size"]
            with bars.stage("first frame", first_settings["steps"]) as cb:
                big = sample_images(self.t2i, self.t2i_movq, make_schedule(self.t2i_cfg.recipe.diffusion, ts), prompts,
                                    height=big_h, width=big_w, target=self.t2i_cfg.recipe.diffusion.target,
                                    latent_scale=self.t2i_cfg.recipe.latent_scale, sampler=first_settings["sampler"],
                                    steps=first_settings["steps"], spacing=ts.spacing,
                                    guidance=first_settings["guidance"], negative_prompt=negative_prompt,
                                    dynamic_threshold=ts.dynamic_threshold, generator=gen, callback=cb)
                first = _fit(big, height, width)
        if first is not None:
            first_latent = self.movq.encode(first).float() * rc.latent_scale  # re-encoded at the video size
        else:
            c, factor = self.keyframe.unet.cfg.out_channels, self.movq.downsample_factor
            first_latent = torch.zeros(b, c, height // factor, width // factor, device=self.device)

        # 2. keyframes
        ks = self.kf_cfg.recipe.sampling
        with bars.stage("keyframes", kf_settings["steps"]) as cb:
            latents = sample_keyframes(
                self.keyframe, make_schedule(rc.diffusion, ks), prompts, first_latent,
                num_frames=kf_settings["num_keyframes"], target=rc.diffusion.target, motion_score=motion,
                motion_scale=rc.motion.scale, noise_aug_level=kf_settings["noise_aug_level"],
                sampler=kf_settings["sampler"], steps=kf_settings["steps"], spacing=ks.spacing,
                text_guidance=kf_settings["text_guidance"], image_guidance=kf_settings["image_guidance"],
                latent_scale=rc.latent_scale, negative_prompt=negative_prompt, dynamic_threshold=ks.dynamic_threshold,
                use_image=first is not None, generator=gen, callback=cb)
        keyframes = decode_video(self.movq, latents, rc.latent_scale)
        if first is None:
            first = keyframes[:, :, 0]
        z = latents / rc.latent_scale  # unscaled MoVQ latents (b, c, n, h, w)

        # 3. interpolation
        out_fps = float(self.kf_cfg.data.fps)
        n_passes = ip_settings["passes"]
        if n_passes:
            ir, isc = self.ip_cfg.recipe, self.ip_cfg.recipe.sampling
            with bars.stage("interpolation", ip_settings["steps"] * n_passes) as cb:
                z = interpolate(self.interp, make_schedule(ir.diffusion, isc), z * ir.latent_scale, prompts,
                                passes=ip_settings["skip_frames"], frames_per_gap=ir.frames_per_gap,
                                target=ir.diffusion.target, sampler=ip_settings["sampler"],
                                steps=ip_settings["steps"], spacing=isc.spacing, guidance=ip_settings["guidance"],
                                latent_scale=ir.latent_scale, negative_prompt=negative_prompt,
                                dynamic_threshold=isc.dynamic_threshold, residual=ir.residual, generator=gen,
                                callback=cb) / ir.latent_scale
            assert z.shape[2] == frames_after_passes(kf_settings["num_keyframes"], n_passes, ir.frames_per_gap)
            out_fps *= (ir.frames_per_gap + 1) ** n_passes

        # 4. decoding
        with bars.stage("decode", 1) as cb:
            if self.decoder is not None:
                frames = self.decoder.decode_video(z, window=settings["decode_window"],
                                                   overlap=self.cfg.decode_overlap).clamp(-1, 1)
            else:
                frames = decode_video(self.movq, z, 1.0)
            if cb:
                cb()
        return VideoOutput(frames=frames, fps=out_fps, first_frames=first, keyframes=keyframes, timings=timings,
                           settings=settings)


def call_arguments(items: Iterable[str], exclude: Sequence[str] = ()) -> Dict[str, Any]:
    """Command-line `key=value` items -> keyword arguments of a pipeline call, values typed as
    YAML (`3` an int, `false` a bool, `[fast, 0.1]` a list). A key that is not an argument of
    `Pipeline.settings` (or is in `exclude`) is a ValueError naming it and the allowed keys."""
    allowed = set(inspect.signature(Pipeline.settings).parameters) - {"self", "image", *exclude}
    kwargs: Dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"--call '{item}': expected key=value")
        key, value = item.split("=", 1)
        if key not in allowed:
            raise ValueError(f"--call {key}: not a pipeline argument here; choose from {', '.join(sorted(allowed))}")
        kwargs[key] = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={value}"]))["v"]
    return kwargs


def _fit(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(b, 3, h, w) in [-1, 1] -> resized to cover (height, width) and centre-cropped, as the
    release turns its 2x first frame into the video's."""
    from kvideo.data.shards import resize_and_crop

    return resize_and_crop(images, (height, width), None).clamp(-1, 1)


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
