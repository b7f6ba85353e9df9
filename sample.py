"""Sample from trained kvideo stages.

    python sample.py --stage movq --checkpoint RUN_OR_CKPT --input VIDEO.mp4 --out RECON.mp4
        [--size H W] [--max-frames N] [--which ema|model] [--side-by-side]

    python sample.py --stage t2i --checkpoint RUN_OR_CKPT --prompt "..." --out frame.png
        [--seed N] [--steps N] [--sampler ddpm|ddim|dpmpp_2m] [--guidance W]
        [--negative-prompt "..."] [--size H W] [--spacing leading|trailing|linspace]

    python sample.py --stage keyframe --checkpoint RUN_OR_CKPT --prompt "..." --out keyframes.mp4
        [--image first.png] [--motion-score X|PRESET] [--t2i T2I_RUN] [--seed N] [--steps N]
        [--sampler ...] [--text-guidance W] [--image-guidance W] [--noise-aug-level L]

Stages available so far:
  movq   encode a video frame by frame to the continuous latent the diffusion stages use, decode
         it back, and write an H.264 mp4 (with --side-by-side: original | reconstruction);
         prints the PSNR.
  t2i    a first frame for a prompt. Defaults (sampler, steps, guidance) come from the
         checkpoint's `recipe.sampling`; the same seed gives the same image; a negative prompt
         replaces the unconditional branch of guidance.
  keyframe  keyframes for a prompt, from a first frame: a user image (--image, resized and
         centre-cropped to the model's size, encoded with the MoVQ: any picture can be
         animated) or one sampled by the t2i checkpoint (--t2i, default the keyframe model's
         recipe.init_from). Writes an H.264 mp4 at the keyframe rate (data.fps of the run).
         --motion-score takes a number or a preset name of the checkpoint (recipe.motion.presets).
The interpolation and video-decoder stages join as they are built.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from einops import rearrange


def sample_movq(args) -> int:
    from kvideo.data.shards import resize_and_crop
    from kvideo.data.video_io import probe, read_video, write_video
    from kvideo.stages.movq import load_movq, psnr

    ae = load_movq(args.checkpoint, which=args.which)
    frames, _ = read_video(args.input, max_frames=args.max_frames)
    fps = probe(args.input)["fps"] or 24.0
    x = rearrange(torch.from_numpy(frames), "f h w c -> f c h w")
    f = ae.downsample_factor
    if args.size:
        size = tuple(args.size)
    else:  # the largest size divisible by f
        size = (x.shape[-2] // f * f, x.shape[-1] // f * f)
    x = resize_and_crop(x, size, None).float() / 127.5 - 1  # (f, c, h, w) in [-1, 1]
    recon = []
    with torch.no_grad():
        for part in x.split(16):
            recon.append(ae.decode(ae.encode(part)).clamp(-1, 1))
    recon = torch.cat(recon)
    print(f"PSNR {float(psnr(recon, x).mean()):.2f} dB over {len(x)} frames at {size[0]}x{size[1]}")
    out = torch.cat([x, recon], dim=-1) if args.side_by_side else recon
    video = ((rearrange(out, "f c h w -> f h w c") + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_video(args.out, video, fps=fps)
    print(f"wrote {args.out}")
    return 0


def sample_t2i(args) -> int:
    from torchvision.utils import save_image
    from tqdm import tqdm

    from kvideo.stages.t2i import load_t2i, make_schedule, sample_images

    model, movq, cfg = load_t2i(args.checkpoint, which=args.which)
    sc = cfg.recipe.sampling
    steps = args.steps or sc.steps
    height, width = args.size or list(cfg.data.size)
    bar = tqdm(total=steps, desc="t2i")
    images = sample_images(
        model, movq, make_schedule(cfg.recipe.diffusion), [args.prompt] * args.num, height=height, width=width,
        target=cfg.recipe.diffusion.target, latent_scale=cfg.recipe.latent_scale,
        sampler=args.sampler or sc.sampler, steps=steps, spacing=args.spacing or sc.spacing,
        guidance=sc.guidance if args.guidance is None else args.guidance, negative_prompt=args.negative_prompt,
        dynamic_threshold=sc.dynamic_threshold, generator=torch.Generator().manual_seed(args.seed),
        callback=lambda *_: bar.update(1))
    bar.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_image((images + 1) / 2, args.out, nrow=len(images))
    print(f"wrote {args.out}")
    return 0


def load_image(path: str, size) -> torch.Tensor:
    """An image file -> (1, 3, h, w) in [-1, 1], resized (short side) and centre-cropped to `size`."""
    import numpy as np
    from PIL import Image

    from kvideo.data.shards import resize_and_crop

    try:
        rgb = np.asarray(Image.open(path).convert("RGB"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image '{path}': {e}") from e
    x = rearrange(torch.from_numpy(rgb.copy()), "h w c -> 1 c h w")
    return resize_and_crop(x, tuple(size), None).float() / 127.5 - 1


def sample_keyframe(args) -> int:
    from tqdm import tqdm

    from kvideo.data.video_io import write_video
    from kvideo.stages.keyframe import decode_video, load_keyframe, resolve_motion_score, sample_keyframes
    from kvideo.stages.t2i import load_t2i, make_schedule, sample_images

    model, movq, cfg = load_keyframe(args.checkpoint, which=args.which)
    rc, sc = cfg.recipe, cfg.recipe.sampling
    height, width = args.size or list(cfg.data.size)
    generator = torch.Generator().manual_seed(args.seed)
    if args.image:
        first = load_image(args.image, (height, width))
    else:
        t2i_path = args.t2i or rc.init_from
        if not t2i_path:
            raise ValueError("no first frame: give --image, or --t2i with a t2i checkpoint "
                             "(the keyframe run has no recipe.init_from)")
        t2i, t2i_movq, t2i_cfg = load_t2i(t2i_path, which=args.which)
        ts = t2i_cfg.recipe.sampling
        first = sample_images(t2i, t2i_movq, make_schedule(t2i_cfg.recipe.diffusion), [args.prompt], height=height,
                              width=width, target=t2i_cfg.recipe.diffusion.target,
                              latent_scale=t2i_cfg.recipe.latent_scale, sampler=ts.sampler, steps=ts.steps,
                              spacing=ts.spacing, guidance=ts.guidance, negative_prompt=args.negative_prompt,
                              dynamic_threshold=ts.dynamic_threshold, generator=generator)
    with torch.no_grad():
        first_latent = movq.encode(first).float() * rc.latent_scale
    motion = resolve_motion_score(rc.motion, args.motion_score)
    steps = args.steps or sc.steps
    bar = tqdm(total=steps, desc="keyframes")
    latents = sample_keyframes(
        model, make_schedule(rc.diffusion), [args.prompt], first_latent, num_frames=args.frames or cfg.data.num_frames,
        target=rc.diffusion.target, motion_score=motion, motion_scale=rc.motion.scale,
        noise_aug_level=rc.noise_aug.sample_level if args.noise_aug_level is None else args.noise_aug_level,
        sampler=args.sampler or sc.sampler, steps=steps, spacing=args.spacing or sc.spacing,
        text_guidance=sc.text_guidance if args.text_guidance is None else args.text_guidance,
        image_guidance=sc.image_guidance if args.image_guidance is None else args.image_guidance,
        latent_scale=rc.latent_scale, negative_prompt=args.negative_prompt, dynamic_threshold=sc.dynamic_threshold,
        generator=generator, callback=lambda *_: bar.update(1))
    bar.close()
    video = decode_video(movq, latents, rc.latent_scale)[0]  # (3, f, h, w)
    frames = ((rearrange(video, "c f h w -> f h w c") + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_video(args.out, frames, fps=cfg.data.fps)
    print(f"wrote {args.out} ({len(frames)} keyframes at {cfg.data.fps:g} fps, motion score {motion:g})")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", required=True, choices=["movq", "t2i", "keyframe"])
    ap.add_argument("--checkpoint", required=True, help="a run directory, checkpoint directory or .safetensors file")
    ap.add_argument("--which", default="ema", choices=["ema", "model"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"))
    movq = ap.add_argument_group("movq")
    movq.add_argument("--input", help="video to reconstruct")
    movq.add_argument("--max-frames", type=int)
    movq.add_argument("--side-by-side", action="store_true")
    t2i = ap.add_argument_group("t2i and keyframe")
    t2i.add_argument("--prompt")
    t2i.add_argument("--negative-prompt")
    t2i.add_argument("--num", type=int, default=1, help="images for the prompt (one grid)")
    t2i.add_argument("--seed", type=int, default=0)
    t2i.add_argument("--steps", type=int)
    t2i.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp_2m"])
    t2i.add_argument("--spacing", choices=["leading", "trailing", "linspace"])
    t2i.add_argument("--guidance", type=float)
    kf = ap.add_argument_group("keyframe")
    kf.add_argument("--image", help="first frame to animate (any picture); default: sampled by the t2i model")
    kf.add_argument("--t2i", help="t2i checkpoint for the first frame (default: the run's recipe.init_from)")
    kf.add_argument("--motion-score", help="a number (shard motion-score units) or a preset name")
    kf.add_argument("--frames", type=int, help="keyframes (default: the run's data.num_frames)")
    kf.add_argument("--text-guidance", type=float)
    kf.add_argument("--image-guidance", type=float)
    kf.add_argument("--noise-aug-level", type=int)
    args = ap.parse_args(argv)
    needed = {"movq": "input", "t2i": "prompt", "keyframe": "prompt"}[args.stage]
    if getattr(args, needed) is None:
        ap.error(f"--stage {args.stage} needs --{needed}")
    try:
        return {"movq": sample_movq, "t2i": sample_t2i, "keyframe": sample_keyframe}[args.stage](args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
