"""Score keyframe videos of a keyframe checkpoint on the canonical ShapesWorld prompts.

    python tools/evaluate_keyframes.py --checkpoint RUN_OR_CKPT [--all-checkpoints [--minutes 10 20 30 60]]
        [--sampler dpmpp_2m] [--steps 15] [--spacing leading|trailing|linspace]
        [--dynamic-threshold P|none] [--timestep-shift S] [--text-guidance W] [--image-guidance W]
        [--noise-aug-level L] [--motion-score X|PRESET] [--motion-guidance W] [--limit N] [--out DIR]

For every canonical test prompt (seen and held-out pairs, kvideo.data.shapesworld) a ground-truth
clip is rendered (seeded by the prompt's position), its first frame is encoded with the run's
MoVQ, and keyframes are sampled from it and the prompt, at the run's keyframe rate (data.fps).
The motion score is the run's preset named after the prompt's speed (still / slow / fast, as
in configs/keyframe/shapes.yaml) unless --motion-score fixes one for every prompt (a sweep).
--motion-guidance W samples with motion-free guidance (a model trained with recipe.motion_free).
Each video is scored with the ShapesWorld scorer: direction, speed (slow / fast; moving prompts
only), background, colour, shape, the measured speed in px per 24-fps frame, and the PSNR of
the decoded frame 0 against the conditioning frame. Prints a markdown table; --out writes
results.json and a contact sheet per checkpoint (rows: videos, columns: keyframes).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from kvideo.data.shapes_scorer import CONSISTENCY
from kvideo.data.shapesworld import SPEEDS
from kvideo.diffusion.schedule import SPACINGS
from kvideo.evaluation import (add_checkpoint_arguments, add_prompt_arguments, canonical_prompts,
                               checkpoints_from_args, mean_present, motion_preset, pct, score_checkpoints)

ATTRS = ("direction", "speed", "background", "color", "shape")


def measured_speed(rows: list, asked: str) -> float | None:
    """The mean measured speed (px per 24-fps frame) of the videos in `rows` asked to go `asked`."""
    return mean_present(r["speed_px_per_24fps_frame"] for r in rows if r["asked_speed"] == asked)


def motion_for(prompt: str, presets, fixed) -> float:
    from kvideo.inference.sampling import resolve_motion_score

    if fixed is not None:
        return resolve_motion_score(presets, fixed)
    name = motion_preset(prompt)
    if name not in presets.presets:
        raise ValueError(f"the run's recipe.motion.presets has no '{name}' preset; give --motion-score")
    return float(presets.presets[name])


@torch.no_grad()
def evaluate(ckpt_dir: Path, prompts: list, args, out: Path | None) -> dict:
    from kvideo.data.shapes_scorer import score_clip
    from kvideo.data.shapesworld import prompt_clip
    from kvideo.inference.autoencoder import decode_latents
    from kvideo.inference.loading import load_bundle
    from kvideo.inference.sampling import KeyframeOptions, sample_keyframes
    from kvideo.metrics.reconstruction import psnr

    kf = load_bundle(ckpt_dir, "keyframe")
    movq, cfg = kf.movq, kf.cfg
    rc = cfg.recipe
    options = KeyframeOptions.from_recipe(cfg, sampler=args.sampler, steps=args.steps, spacing=args.spacing,
                                          timestep_shift=args.timestep_shift, text_guidance=args.text_guidance,
                                          image_guidance=args.image_guidance, noise_aug_level=args.noise_aug_level,
                                          keep_first_frame=args.keep_first_frame, motion_guidance=args.motion_guidance)
    if args.dynamic_threshold is not None:  # "none" disables the recipe's thresholding
        threshold = None if args.dynamic_threshold == "none" else float(args.dynamic_threshold)
        options = dataclasses.replace(options, spec=dataclasses.replace(options.spec, dynamic_threshold=threshold))
    spec = options.spec
    h, w = cfg.data.size
    fps, num_frames = float(cfg.data.fps), int(cfg.data.num_frames)
    rows, sheets = [], []
    t0 = time.perf_counter()
    for i, item in enumerate(prompts):
        prompt = item["prompt"]
        clip = prompt_clip(prompt, i, h)
        first = torch.from_numpy(clip[0]).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, h, w)
        latent = movq.encode(first).float() * rc.latent_scale
        motion = motion_for(prompt, rc.motion, args.motion_score)
        latents = sample_keyframes(kf, [prompt], latent, motion, options,
                                   generator=torch.Generator().manual_seed(args.seed + i))
        video = decode_latents(movq, latents, rc.latent_scale)[0]  # (3, f, h, w) in [-1, 1]
        frames = ((rearrange(video, "c f h w -> f h w c") + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        r = score_clip(frames, fps, prompt)
        speed_pf = r["speed_measured_px_per_frame"]
        rows.append({
            "prompt": prompt, "split": item["split"], "moving": r["target"]["direction"] != "still",
            "asked_speed": motion_preset(prompt),
            "motion_score": motion, **{a: bool(r["correct"][a]) for a in ATTRS},
            "pred_direction": r["pred"]["direction"], "pred_speed": r["pred"]["speed"],
            # px per 24-fps frame, comparable with the ShapesWorld spec whatever the keyframe rate
            "speed_px_per_24fps_frame": None if speed_pf is None else speed_pf * fps / 24.0,
            "frame0_psnr": float(psnr(video[:, 0][None], first)[0]),
            # the scorer's temporal consistency: the object's area and colour, the background's flicker
            **{key: r[key] for key in CONSISTENCY},
        })
        sheets.append(video.transpose(0, 1))  # (f, 3, h, w)
    seconds = time.perf_counter() - t0
    result = {"checkpoint": str(ckpt_dir), "sampler": spec.sampler, "steps": spec.steps, "spacing": spec.spacing,
              "timestep_shift": spec.timestep_shift,
              "dynamic_threshold": spec.dynamic_threshold,
              "videos": len(rows),
              "keyframes": num_frames, "fps": fps, "sampling_s": round(seconds, 1),
              "text_guidance": options.text_guidance,
              "image_guidance": options.image_guidance,
              "noise_aug_level": options.noise_aug_level,
              "keep_first_frame": options.keep_first_frame,
              "motion_guidance": options.motion_guidance,
              "motion_score": args.motion_score}
    for split in ("seen", "held_out", "all"):
        sel = [r for r in rows if split == "all" or r["split"] == split]
        if not sel:
            continue
        moving = [r for r in sel if r["moving"]]
        summary = {"n": len(sel), "n_moving": len(moving)}
        for a in ("direction", "background", "color", "shape"):
            summary[a] = float(np.mean([r[a] for r in sel]))
        summary["speed"] = float(np.mean([r["speed"] for r in moving])) if moving else None  # slow / fast
        speeds = [r["speed_px_per_24fps_frame"] for r in sel if r["speed_px_per_24fps_frame"] is not None]
        summary["mean_speed_px_per_24fps_frame"] = float(np.mean(speeds)) if speeds else None
        # the measured speed of the videos asked to go slow and fast, against the asked one
        # (ShapesWorld: slow 0.1 S, fast 0.3 S px per second)
        summary["speed_by_asked"] = {name: measured_speed(sel, name) for name in SPEEDS}
        summary["frame0_psnr"] = float(np.mean([r["frame0_psnr"] for r in sel]))
        for key in CONSISTENCY:
            summary[f"mean_{key}"] = mean_present(r[key] for r in sel)
        result[split] = summary
    result["videos_detail"] = rows
    result["asked_px_per_24fps_frame"] = {name: fraction * w / 24.0 for name, fraction in SPEEDS.items()}
    if out is not None:
        from torchvision.utils import save_image

        out.mkdir(parents=True, exist_ok=True)
        save_image((torch.cat(sheets) + 1) / 2, out / f"{ckpt_dir.name}_{spec.sampler}{spec.steps}_{spec.spacing}.png", nrow=num_frames)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(ap)
    ap.add_argument("--sampler", default="dpmpp_2m", choices=["ddpm", "ddim", "dpmpp_2m"])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--spacing", choices=SPACINGS, help="inference timestep spacing (default: the run's recipe.sampling)")
    ap.add_argument("--dynamic-threshold", help="percentile of x0 thresholding, or 'none' (default: the run's)")
    ap.add_argument("--timestep-shift", type=float,
                    help="shift of the inference timesteps (default: the run's recipe.sampling.timestep_shift)")
    ap.add_argument("--text-guidance", type=float)
    ap.add_argument("--image-guidance", type=float)
    ap.add_argument("--noise-aug-level", type=int)
    ap.add_argument("--keep-first-frame", action=argparse.BooleanOptionalAction, default=None,
                    help="hold frame 0 to the given first frame at every step (default: the run's recipe.sampling)")
    ap.add_argument("--motion-guidance", type=float, help="w_M of motion-free guidance (default: the run's)")
    ap.add_argument("--motion-score", help="one motion score (number or preset) for every prompt: a sweep point")
    add_prompt_arguments(ap)
    args = ap.parse_args(argv)

    if (ckpts := checkpoints_from_args(args)) is None:
        return 2
    prompts = canonical_prompts(args.limit)
    out = Path(args.out) if args.out else None

    def cells(r):
        s, h = r["seen"], r.get("held_out", {})
        measured = r["all"]["speed_by_asked"]
        speeds = " / ".join("-" if measured[n] is None else f"{measured[n]:.3f}" for n in SPEEDS)
        asked = " / ".join(f"{v:.3f}" for v in r["asked_px_per_24fps_frame"].values())
        return [pct(s["direction"]), pct(s["speed"]), f"{s['frame0_psnr']:.1f} dB", pct(h.get("direction")),
                pct(h.get("speed")), f"{speeds} (asked {asked})", str(r["sampling_s"])]

    try:
        score_checkpoints(ckpts, lambda ckpt: evaluate(ckpt, prompts, args, out),
                          ["seen direction", "seen slow/fast", "seen frame-0 PSNR", "held-out direction",
                           "held-out slow/fast", "measured slow / fast px/frame", "sampling s"],
                          cells, out / "results.json" if out else None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
