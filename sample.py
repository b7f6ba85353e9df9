"""Sample from trained kvideo stages.

    python sample.py --stage movq --checkpoint RUN_OR_CKPT --input VIDEO.mp4 --out RECON.mp4
        [--size H W] [--max-frames N] [--which ema|model] [--side-by-side]

Stages available so far:
  movq   encode a video frame by frame to the continuous latent the diffusion stages use, decode
         it back, and write an H.264 mp4 (with --side-by-side: original | reconstruction);
         prints the PSNR.
The text-to-video stages (t2i, keyframe, interpolation, video_decoder) join as they are built.
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", required=True, choices=["movq"])
    ap.add_argument("--checkpoint", required=True, help="a run directory, checkpoint directory or .safetensors file")
    ap.add_argument("--which", default="ema", choices=["ema", "model"])
    ap.add_argument("--input", required=True, help="video to reconstruct")
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"))
    ap.add_argument("--max-frames", type=int)
    ap.add_argument("--side-by-side", action="store_true")
    args = ap.parse_args(argv)
    try:
        return sample_movq(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
