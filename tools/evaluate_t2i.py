"""Score first frames of a t2i checkpoint on the canonical ShapesWorld prompts.

    python tools/evaluate_t2i.py --checkpoint RUN_OR_CKPT [--all-checkpoints [--minutes 10 20 30 60]]
        [--per-prompt 2] [--sampler dpmpp_2m] [--steps 15] [--guidance 5] [--spacing trailing]
        [--threshold 0.995|off] [--room-frames 29 --room-fps 24] [--out DIR]

Samples every canonical test prompt (seen and held-out pairs, kvideo.data.shapesworld), scores
each image as a one-frame clip with the ShapesWorld scorer and reports the accuracy of the
attributes a single frame shows: background, colour and shape (and all three at once), for
seen and held-out pairs, and for the moving prompts how often the image leaves the object room for
the motion (`kvideo.data.shapes_scorer.motion_room`) over a video of --room-frames at --room-fps
(default: the ShapesWorld cascade's 29 frames at 24 fps): a first frame for the keyframe stage
must. With --all-checkpoints every checkpoint of the run is scored, with the
training wall time at which it was written (from metrics.jsonl), to show accuracy against
training time; --minutes keeps the last checkpoint within each budget. Prints a markdown table; --out writes results.json and an image grid per
checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kvideo.evaluation import (add_checkpoint_arguments, canonical_prompts, checkpoints_from_args, pct,
                               score_checkpoints)

FRAME_ATTRIBUTES = ("background", "color", "shape")


@torch.no_grad()
def evaluate(ckpt_dir: Path, prompts: list, per_prompt: int, sampler: str, steps: int, guidance: float,
             seed: int, out: Path | None, spacing: str | None = None, threshold: str | None = None,
             room: tuple = (29, 24.0)) -> dict:
    from dataclasses import replace

    from kvideo.data.shapes_scorer import motion_room, score_clip
    from kvideo.inference.loading import load_bundle
    from kvideo.inference.sampling import FirstFrameOptions, sample_first_frames

    t2i = load_bundle(ckpt_dir, "t2i")
    options = FirstFrameOptions.from_recipe(t2i.cfg, sampler=sampler, steps=steps, spacing=spacing, guidance=guidance)
    if threshold is not None:  # "off" disables the recipe's thresholding
        options = replace(options, spec=replace(options.spec, dynamic_threshold=None if threshold == "off"
                                                else float(threshold)))
    spacing, dyn = options.spec.spacing, options.spec.dynamic_threshold
    rows, images = [], []
    t0 = time.perf_counter()
    for i, item in enumerate(prompts):
        imgs = sample_first_frames(t2i, [item["prompt"]] * per_prompt, options,
                                   generator=torch.Generator().manual_seed(seed + i))
        images.append(imgs)
        frames = ((imgs.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        for frame in frames:
            r = score_clip(frame[None], 24.0, item["prompt"])
            fit = motion_room(frame, item["prompt"], num_frames=room[0], fps=room[1])
            rows.append({"split": item["split"], **{k: bool(r["correct"][k]) for k in FRAME_ATTRIBUTES},
                         "fits": None if fit is None else fit["fits"]})
    seconds = time.perf_counter() - t0
    result = {"checkpoint": str(ckpt_dir), "sampler": sampler, "steps": steps, "guidance": guidance,
              "spacing": spacing, "dynamic_threshold": dyn,
              "images": len(rows), "sampling_s": round(seconds, 1)}
    for split in ("seen", "held_out"):
        sel = [r for r in rows if r["split"] == split]
        acc = {k: float(np.mean([r[k] for r in sel])) for k in FRAME_ATTRIBUTES} if sel else {}
        if sel:
            acc["all_three"] = float(np.mean([all(r[k] for k in FRAME_ATTRIBUTES) for r in sel]))
            judged = [r["fits"] for r in sel if r["fits"] is not None]
            acc["room_for_motion"] = float(np.mean(judged)) if judged else None
        result[split] = {"n": len(sel), **acc}
    if out is not None:
        from torchvision.utils import save_image

        out.mkdir(parents=True, exist_ok=True)
        save_image((torch.cat(images) + 1) / 2, out / f"{ckpt_dir.name}_{sampler}{steps}.png", nrow=per_prompt * 6)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(ap)
    ap.add_argument("--per-prompt", type=int, default=2)
    ap.add_argument("--sampler", default="dpmpp_2m", choices=["ddpm", "ddim", "dpmpp_2m"])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--spacing", choices=["leading", "trailing", "linspace"],
                    help="timestep spacing (default: the checkpoint's recipe.sampling.spacing)")
    ap.add_argument("--threshold", help="dynamic-thresholding percentile, or 'off' "
                    "(default: the checkpoint's recipe.sampling.dynamic_threshold)")
    ap.add_argument("--room-frames", type=int, default=29, help="video length for the room-for-motion check")
    ap.add_argument("--room-fps", type=float, default=24.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    if (ckpts := checkpoints_from_args(args)) is None:
        return 2
    prompts = canonical_prompts()
    out = Path(args.out) if args.out else None

    def cells(r):
        s, h = r["seen"], r["held_out"]
        return [pct(s["background"]), pct(s["color"]), pct(s["shape"]), pct(s["all_three"]), pct(h["color"]),
                pct(h["shape"]), pct(h["all_three"]), f"{pct(s['room_for_motion'])} / {pct(h['room_for_motion'])}",
                str(r["sampling_s"])]

    score_checkpoints(
        ckpts, lambda ckpt: evaluate(ckpt, prompts, args.per_prompt, args.sampler, args.steps, args.guidance,
                                     args.seed, out, args.spacing, args.threshold, (args.room_frames, args.room_fps)),
        ["seen bg", "seen colour", "seen shape", "seen all", "held-out colour", "held-out shape", "held-out all",
         "room for motion seen / held-out", "sampling s"], cells, out / "results.json" if out else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
