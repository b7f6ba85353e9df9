"""Score a video_decoder checkpoint: flicker and PSNR against the image decoder on real clips.

    python tools/evaluate_video_decoder.py --checkpoint RUN_OR_CKPT --shards data/shapes/val
        [--all-checkpoints [--minutes 10 20 40]] [--frames N] [--fps F] [--window W --overlap O]
        [--max-clips N] [--image-decoder start|same] [--by-distance] [--out results.json]

Every clip of `--shards` (the first `--frames` frames at `--fps`, default the run's data
section, centre crop at the run's data.size) is encoded with the frozen encoder and decoded twice
from the same continuous latents: by the video decoder (in windows of `--window` frames when
given) and by an image decoder: `start` (default), the image MoVQ the run started from (its
recipe.movq, the decoder a user would otherwise decode with), or `same`, the checkpoint's own
weights without the temporal layers (which moved with the fine-tuning).
Reported: PSNR of each against the true frames, and static-background flicker, the mean
absolute change between consecutive decoded frames over the pixels that do not change in the
true clip (kvideo.metrics.reconstruction.static_background_flicker), with the reduction
1 - flicker_video / flicker_image. Prints a markdown table; `--by-distance` adds, per
checkpoint, the flicker in bands of distance from the nearest moving pixel (next to a moving
edge it is the decoder's blur travelling with the object; far from motion, frame-to-frame
inconsistency).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kvideo.evaluation import add_checkpoint_arguments, checkpoints_from_args, score_checkpoints


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(ap)
    ap.add_argument("--shards", required=True, help="held-out shards (a directory, glob or list)")
    ap.add_argument("--frames", type=int, help="frames per clip (default: the run's data.num_frames)")
    ap.add_argument("--fps", type=float, help="default: the run's data.fps")
    ap.add_argument("--window", type=int, help="decode in windows of this many frames (default: whole clip)")
    ap.add_argument("--overlap", type=int, default=4)
    ap.add_argument("--max-clips", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--image-decoder", choices=["start", "same"], default="start",
                    help="the baseline: the run's recipe.movq (start) or the checkpoint without temporal layers (same)")
    ap.add_argument("--by-distance", action="store_true",
                    help="also print the flicker by distance from the nearest moving pixel, per checkpoint")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    import torch

    from kvideo.data.shards import ClipDataset, ClipFormat, ShardIndex, eval_batches
    from kvideo.inference.autoencoder import load_movq, load_video_movq
    from kvideo.inference.checkpoints import read_config
    from kvideo.metrics.reconstruction import evaluate_video_decoding

    if (ckpts := checkpoints_from_args(args)) is None:
        return 2
    try:
        index = ShardIndex(args.shards, key="--shards")
    except (FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    image_decoders = {}

    def score(ckpt):
        cfg = read_config(ckpt)
        frames = args.frames or int(cfg["data"]["num_frames"])
        clip = ClipFormat(frames, args.fps or float(cfg["data"]["fps"]), tuple(cfg["data"]["size"]))
        dataset = ClipDataset(index, clip, seed=0, train=False)
        ae = load_video_movq(ckpt)
        image = None
        if args.image_decoder == "start":
            try:
                movq = cfg["recipe"]["movq"]  # loaded once for all the checkpoints of a run
                if movq not in image_decoders:
                    image_decoders[movq] = load_movq(movq)
                image = image_decoders[movq]
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{ckpt}: its recipe.movq, the image decoder to compare against, is missing: "
                                        f"{e} (or pass --image-decoder same)") from e
        t0 = time.perf_counter()
        with torch.no_grad():
            r = evaluate_video_decoding(ae, eval_batches(dataset, args.batch_size, -(-args.max_clips // args.batch_size)),
                                        torch.device("cpu"), window=args.window, overlap=args.overlap,
                                        image_decoder=image)
        r.update({"checkpoint": str(ckpt), "frames": frames, "window": args.window,
                  "image_decoder": args.image_decoder, "seconds": round(time.perf_counter() - t0, 1)})
        return r

    def cells(r):
        return [f"{int(r['clips'])} x {r['frames']}", f"{r['psnr_video']:.2f} dB", f"{r['psnr_image']:.2f} dB",
                f"{r['flicker_video']:.5f}", f"{r['flicker_image']:.5f}", f"{r['flicker_reduction']:.1%}",
                str(r["seconds"])]

    try:
        results = score_checkpoints(ckpts, score, ["clips x frames", "PSNR video decoder", "PSNR image decoder",
                                                   "flicker video", "flicker image", "flicker reduction", "s"],
                                    cells, Path(args.out) if args.out else None)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in results if args.by_distance else []:
        name, bands = Path(r["checkpoint"]).name, r["flicker_by_distance"]
        print(f"\n{name}: static-background flicker by distance from the nearest moving pixel\n")
        print("| distance | share of static pixels | flicker video | flicker image | reduction | share of image flicker |")
        print("|---|---|---|---|---|---|")
        for band in bands:
            reduction = 1.0 - band["flicker_video"] / max(band["flicker_image"], 1e-12)
            print(f"| {band['band']} | {band['static_share']:.1%} | {band['flicker_video']:.5f} | "
                  f"{band['flicker_image']:.5f} | {reduction:.1%} | {band['share_of_image_flicker']:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
