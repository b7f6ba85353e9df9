"""Sample from trained kvideo stages.

    python sample.py --stage movq --checkpoint RUN_OR_CKPT --input VIDEO.mp4 --out RECON.mp4
        [--size H W] [--max-frames N] [--which ema|model] [--side-by-side]

    python sample.py --stage t2i --checkpoint RUN_OR_CKPT --prompt "..." --out frame.png
        [--seed N] [--steps N] [--sampler ddpm|ddim|dpmpp_2m] [--guidance W]
        [--negative-prompt "..."] [--size H W] [--spacing leading|trailing|linspace]

Stages available so far:
  movq   encode a video frame by frame to the continuous latent the diffusion stages use, decode
         it back, and write an H.264 mp4 (with --side-by-side: original | reconstruction);
         prints the PSNR.
  t2i    a first frame for a prompt. Defaults (sampler, steps, guidance) come from the
         checkpoint's `recipe.sampling`; the same seed gives the same image; a negative prompt
         replaces the unconditional branch of guidance.
The video stages (keyframe, interpolation, video_decoder) join as they are built.
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", required=True, choices=["movq", "t2i"])
    ap.add_argument("--checkpoint", required=True, help="a run directory, checkpoint directory or .safetensors file")
    ap.add_argument("--which", default="ema", choices=["ema", "model"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"))
    movq = ap.add_argument_group("movq")
    movq.add_argument("--input", help="video to reconstruct")
    movq.add_argument("--max-frames", type=int)
    movq.add_argument("--side-by-side", action="store_true")
    t2i = ap.add_argument_group("t2i")
    t2i.add_argument("--prompt")
    t2i.add_argument("--negative-prompt")
    t2i.add_argument("--num", type=int, default=1, help="images for the prompt (one grid)")
    t2i.add_argument("--seed", type=int, default=0)
    t2i.add_argument("--steps", type=int)
    t2i.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp_2m"])
    t2i.add_argument("--spacing", choices=["leading", "trailing", "linspace"])
    t2i.add_argument("--guidance", type=float)
    args = ap.parse_args(argv)
    needed = {"movq": "input", "t2i": "prompt"}[args.stage]
    if getattr(args, needed) is None:
        ap.error(f"--stage {args.stage} needs --{needed}")
    try:
        return sample_movq(args) if args.stage == "movq" else sample_t2i(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
