"""Score an interpolation checkpoint on ShapesWorld: interpolated frames against linear blending.

    python tools/evaluate_interpolation.py --checkpoint RUN_OR_CKPT [--all-checkpoints [--minutes 10 20 40]]
        [--sampler ddim] [--steps N] [--guidance W] [--raw-references | --pix-fmt F] [--limit N]
        [--seed N] [--out DIR]

For every canonical test prompt (seen and held-out pairs) a ground-truth clip is rendered at
24 fps and H.264-coded as the run's training clips are (crf 14, the pixel format of the first
clip of its data.shards, or --pix-fmt; `--raw-references`: the raw render). The MoVQ learned the
coded frames: with 4:2:0 shards it reconstructs sharp-chroma frames at about 34 dB against 42-46
dB for its own kind, only about 1 dB above blending, which leaves no room to measure a model.
The run's finest pass (the last of `recipe.passes`, stride s) gives the frames:
`gaps * (k + 1) + 1` frames at stride s, of which every (k + 1)-th is a keyframe. The true
keyframes are encoded with the run's MoVQ, the k frames of every gap are sampled, decoded, and
compared with the true in-between frames:

  model     PSNR of the decoded interpolated frames;
  blend     PSNR of linear blending of the two neighbouring true keyframes (pixels, weights
            j / (k + 1)), the baseline the issue names;
  ceiling   PSNR of the MoVQ reconstruction of the true in-between frames (what a perfect
            latent interpolation would score through this autoencoder).

PSNR is 10 log10(4 / MSE) on [-1, 1] pixels with the MSE pooled over every in-between frame of
the split (a still clip blends perfectly: a per-clip PSNR would be infinite). Rows by split
and by motion (still / slow / fast). Prints a markdown table; --out writes results.json and a
contact sheet (per clip: truth, blend, model).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from kvideo.evaluation import (add_checkpoint_arguments, add_prompt_arguments, canonical_prompts,
                               checkpoints_from_args, score_checkpoints, shards_pix_fmt)


def psnr_from_mse(mse: float) -> float:
    return float("inf") if mse <= 0 else 10.0 * math.log10(4.0 / mse)


def linear_blend(keys: torch.Tensor, k: int) -> torch.Tensor:
    """(c, N, h, w) keyframes -> (c, (N - 1) * k, h, w): the k in-between frames of every gap,
    blended linearly from the gap's two keyframes (`gap_blend`, in frame order)."""
    from kvideo.inference.gaps import gap_blend

    return rearrange(gap_blend(keys[None], k), "1 (k c) g h w -> c (g k) h w", k=k)


@torch.no_grad()
def evaluate(ckpt_dir: Path, prompts: list, args, out: Path | None) -> dict:
    from kvideo.data.shapesworld import parse_caption, prompt_clip
    from kvideo.inference.autoencoder import decode_latents
    from kvideo.inference.loading import load_bundle
    from kvideo.inference.sampling import InterpolationOptions, interpolate

    ip = load_bundle(ckpt_dir, "interpolation")
    movq, cfg = ip.movq, ip.cfg
    rc = cfg.recipe
    k, gaps = int(rc.frames_per_gap), int(rc.gaps)
    last = rc.passes[-1]
    span = gaps * (k + 1) + 1
    h = int(cfg.data.size[0])
    options = InterpolationOptions.from_recipe(cfg, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                                               skip_frames=[last.skip_frames])
    pix_fmt = None if args.raw_references else args.pix_fmt or shards_pix_fmt(cfg.data.shards)
    sums: dict = {}
    sheets = []
    t0 = time.perf_counter()
    for i, item in enumerate(prompts):
        clip = prompt_clip(item["prompt"], i, h, coded=not args.raw_references, pix_fmt=pix_fmt)[:: last.stride][:span]
        if len(clip) < span:
            raise ValueError(f"the 48-frame reference clip has {len(clip)} frames at stride {last.stride}, "
                             f"the pass needs {span}")
        truth = rearrange(torch.from_numpy(clip), "f h w c -> c f h w").float() / 127.5 - 1  # (3, span, h, w)
        key_idx = list(range(0, span, k + 1))
        new_idx = [j for j in range(span) if j % (k + 1)]
        keys = truth[:, key_idx]
        z = rearrange(movq.encode(rearrange(keys, "c f h w -> f c h w")).float(), "f c h w -> c f h w")[None]
        latents = interpolate(ip, z * rc.latent_scale, [item["prompt"]], options,
                              generator=torch.Generator().manual_seed(args.seed + i))
        video = decode_latents(movq, latents, rc.latent_scale)[0]  # (3, span, h, w)
        recon = movq.decode(movq.encode(rearrange(truth[:, new_idx], "c f h w -> f c h w"))).clamp(-1, 1)
        blend = linear_blend(keys, k)
        target = truth[:, new_idx]
        errors = {"model": float(((video[:, new_idx] - target) ** 2).mean()),
                  "blend": float(((blend - target) ** 2).mean()),
                  "ceiling": float(((rearrange(recon, "f c h w -> c f h w") - target) ** 2).mean())}
        attrs = parse_caption(item["prompt"])
        motion = "still" if attrs["direction"] == "still" else attrs["speed"]
        for group in ("all", item["split"], motion):
            acc = sums.setdefault(group, {"n": 0, "model": 0.0, "blend": 0.0, "ceiling": 0.0})
            acc["n"] += 1
            for name, e in errors.items():
                acc[name] += e
        if len(sheets) < 8:
            full_blend = truth.clone()
            full_blend[:, new_idx] = blend
            sheets.append(torch.stack([truth, full_blend, video]).transpose(1, 2))  # (3 rows, span, 3, h, w)
    seconds = time.perf_counter() - t0
    result = {"checkpoint": str(ckpt_dir), "sampler": options.spec.sampler, "steps": options.spec.steps,
              "guidance": options.guidance, "clips": len(prompts),
              "references": "raw" if args.raw_references else f"h264 {pix_fmt}",
              "stride": last.stride, "skip_frames": last.skip_frames, "frames_per_gap": k, "gaps": gaps,
              "sampling_s": round(seconds, 1)}
    for group, acc in sums.items():
        row = {"n": acc["n"]}
        for name in ("model", "blend", "ceiling"):
            row[f"{name}_psnr"] = psnr_from_mse(acc[name] / acc["n"])
        row["model_minus_blend_db"] = row["model_psnr"] - row["blend_psnr"]
        result[group] = row
    if out is not None:
        from torchvision.utils import save_image

        out.mkdir(parents=True, exist_ok=True)
        grid = rearrange(torch.stack(sheets), "n r f c h w -> (n r f) c h w")
        save_image((grid + 1) / 2, out / f"{ckpt_dir.name}.png", nrow=span)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(ap)
    ap.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp_2m"], help="default: the run's recipe.sampling")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--guidance", type=float)
    ap.add_argument("--raw-references", action="store_true",
                    help="score against the raw renders instead of their H.264-coded version (as in the shards)")
    ap.add_argument("--pix-fmt", help="pixel format of the coded references (default: that of the run's data.shards)")
    add_prompt_arguments(ap)
    args = ap.parse_args(argv)

    if (ckpts := checkpoints_from_args(args)) is None:
        return 2
    prompts = canonical_prompts(args.limit)
    out = Path(args.out) if args.out else None

    def cells(r):
        a = r["all"]
        by_motion = " / ".join(f"{r[m]['model_minus_blend_db']:+.1f}" if m in r and np.isfinite(r[m]["blend_psnr"])
                               else "-" for m in ("still", "slow", "fast"))
        return [str(a["n"]), f"{a['model_psnr']:.2f} dB", f"{a['blend_psnr']:.2f} dB",
                f"{a['model_minus_blend_db']:+.2f} dB", f"{a['ceiling_psnr']:.2f} dB", by_motion, str(r["sampling_s"])]

    score_checkpoints(ckpts, lambda ckpt: evaluate(ckpt, prompts, args, out),
                      ["clips", "model PSNR", "linear blend PSNR", "model - blend", "MoVQ ceiling",
                       "still / slow / fast (model - blend)", "sampling s"], cells, out / "results.json" if out else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
