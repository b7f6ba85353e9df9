"""Render a ShapesWorld v1 split (see /work/shared/specs/shapesworld.md).

    python tools/make_shapesworld.py --out data/shapes/train --num-clips 10000
    python tools/make_shapesworld.py --out data/shapes/val --num-clips 512 --split val
    python tools/make_shapesworld.py --out data/shapes/raw --num-clips 16 --raw

Default output: webdataset shards DIR/shard-000000.tar ... with KEY.mp4 (H.264) + KEY.json
(metadata incl. motion_score); --raw writes DIR/clip_XXXXXXX.mp4 + DIR/captions.jsonl.
Always writes DIR/test_prompts.jsonl and DIR/dataset.json. Deterministic given the arguments;
held-out (color, shape) pairs never appear in any split written here.
"""

from __future__ import annotations

import argparse
import json

from kvideo.data.shapesworld import SPLIT_IDS, ShapesWorldSpec, write_shapesworld


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-clips", type=int, required=True)
    p.add_argument("--size", type=int, default=64, help="canvas side S in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--num-frames", type=int, default=48)
    p.add_argument("--split", choices=sorted(SPLIT_IDS), default="train",
                   help="'val' draws a disjoint seed stream with the same distribution")
    p.add_argument("--raw", action="store_true", help="plain mp4 files + captions.jsonl")
    p.add_argument("--clips-per-shard", type=int, default=256)
    p.add_argument("--crf", type=int, default=14, help="x264 quality (lower is better)")
    p.add_argument("--pix-fmt", default="yuv444p", help="yuv444p keeps chroma at full resolution")
    p.add_argument("--paraphrase", action="store_true",
                   help="captions are sometimes paraphrases (attributes in the json are exact)")
    p.add_argument("--workers", type=int, default=1, help="parallel render/encode processes")
    args = p.parse_args(argv)
    spec = ShapesWorldSpec(
        args.num_clips, size=args.size, seed=args.seed, fps=args.fps, num_frames=args.num_frames,
        split=args.split, raw=args.raw, clips_per_shard=args.clips_per_shard, crf=args.crf,
        pix_fmt=args.pix_fmt, paraphrase=args.paraphrase,
    )
    summary = write_shapesworld(args.out, spec, workers=args.workers)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
