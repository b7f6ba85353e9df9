"""Render a ShapesWorld split (see /work/shared/specs/shapesworld.md): v1 shapes or v2 characters.

    python tools/make_shapesworld.py --out data/shapes/train --num-clips 10000
    python tools/make_shapesworld.py --out data/shapes/val --num-clips 512 --split val
    python tools/make_shapesworld.py --out data/shapes/raw --num-clips 16 --raw
    python tools/make_shapesworld.py --world characters --out data/characters/train --num-clips 10000 \\
        --kinds single=0.5,two_shots=0.25,two_characters=0.25
    python tools/make_shapesworld.py --world characters --out data/characters/test --num-clips 512 --split test

Default output: webdataset shards DIR/shard-000000.tar ... with KEY.mp4 (H.264) + KEY.json
(metadata incl. motion_score); --raw writes DIR/clip_XXXXXXX.mp4 + DIR/captions.jsonl.
Always writes DIR/dataset.json. Deterministic given the arguments, so re-running a killed
run rewrites the same files.

--world shapes (v1): also DIR/test_prompts.jsonl; held-out (color, shape) pairs never appear in
any split written here; splits train and val.
--world characters (v2): a sample of one character also carries its reference KEY.ref.png;
also DIR/characters.json (the bank) and DIR/references/NAME.png; splits train and val never show
the held-out characters (Milo, Nova, Otto, Pip), test draws from all 16; --kinds sets the shares
of the clip kinds (weights, normalised; a kind left out gets none).
"""

from __future__ import annotations

import argparse
import json

from kvideo.data.characters import CHARACTER_SPLITS, CLIP_KINDS, DEFAULT_KIND_SHARES, CharactersSpec, write_characters
from kvideo.data.shapesworld import SPLIT_IDS, ShapesWorldSpec, write_shapesworld


def parse_kinds(text: str) -> tuple[float, ...]:
    """'single=2,two_shots=1' -> weights in CLIP_KINDS order (a kind left out: 0)."""
    shares = dict.fromkeys(CLIP_KINDS, 0.0)
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, sep, value = item.partition("=")
        if not sep or kind not in shares:
            raise argparse.ArgumentTypeError(f"{item!r}: expected KIND=WEIGHT with KIND one of {list(CLIP_KINDS)}")
        try:
            shares[kind] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: the weight {value!r} is not a number") from None
    return tuple(shares.values())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", choices=("shapes", "characters"), default="shapes",
                   help="shapes: ShapesWorld v1; characters: v2 (named characters, shots, lanes, references)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-clips", type=int, required=True)
    p.add_argument("--size", type=int, default=64, help="canvas side S in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--num-frames", type=int, default=48)
    p.add_argument("--split", choices=sorted(CHARACTER_SPLITS), default="train",
                   help="'val' draws a disjoint seed stream with the same distribution; 'test' (characters "
                        "only) draws from every character, held-out ones included")
    p.add_argument("--raw", action="store_true", help="plain mp4 files + captions.jsonl")
    p.add_argument("--clips-per-shard", type=int, default=256)
    p.add_argument("--crf", type=int, default=14, help="x264 quality (lower is better)")
    p.add_argument("--pix-fmt", default="yuv444p", help="yuv444p keeps chroma at full resolution")
    p.add_argument("--paraphrase", action="store_true",
                   help="shapes only: captions are sometimes paraphrases (attributes in the json are exact)")
    p.add_argument("--kinds", type=parse_kinds, default=DEFAULT_KIND_SHARES,
                   help="characters only: shares of the clip kinds, e.g. single=0.5,two_shots=0.25,two_characters=0.25"
                        " (the default)")
    p.add_argument("--workers", type=int, default=1, help="parallel render/encode processes")
    args = p.parse_args(argv)
    common = dict(size=args.size, seed=args.seed, fps=args.fps, num_frames=args.num_frames, split=args.split,
                  raw=args.raw, clips_per_shard=args.clips_per_shard, crf=args.crf, pix_fmt=args.pix_fmt)
    if args.world == "characters":
        if args.paraphrase:
            p.error("--paraphrase is for --world shapes (v2 captions are canonical)")
        summary = write_characters(args.out, CharactersSpec(args.num_clips, **common, kind_shares=args.kinds),
                                   workers=args.workers)
    else:
        if args.split not in SPLIT_IDS:
            p.error(f"--world shapes has the splits {sorted(SPLIT_IDS)}, not {args.split!r}")
        if args.kinds != DEFAULT_KIND_SHARES:
            p.error("--kinds is for --world characters")
        summary = write_shapesworld(args.out, ShapesWorldSpec(args.num_clips, **common, paraphrase=args.paraphrase),
                                    workers=args.workers)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
