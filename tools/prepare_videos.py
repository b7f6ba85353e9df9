"""Raw videos to training shards, the Kandinsky Video 1.1 way.

    python tools/prepare_videos.py INPUT [INPUT ...] --out DIR [--captions FILE] [--workers N]
        [--num-shards K --shard-id I] [--config prepare.yaml ...] [key=value ...]
    python tools/prepare_videos.py merge DIR_OR_JOURNAL [...] --out DIR [--allow-partial]

INPUT is a video file, a directory (searched recursively for video extensions) or a .txt/.lst
file listing paths. Scenes are cut with PySceneDetect, filtered (>= 2 s, >= 256x256 area, sides
>= 128 px, source >= 23 fps), black borders cropped, resized to <= 1080 px on the short side,
resampled to 24 fps, encoded H.264, motion-scored and captioned. DIR receives webdataset shards
(KEY.mp4 + KEY.json), manifest.jsonl, rejects.jsonl and report.json; data.shards=DIR trains on it.

Across machines, each runs the same command with --num-shards/--shard-id (or under torchrun /
SLURM, which set RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS) and writes its own part; then
`merge DIR --out DIR` joins the parts' manifests. Re-running a command resumes it: finished
files are skipped, and a run killed at any moment loses and duplicates nothing.
Config keys and their defaults: configs/prepare/default.yaml.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _run(argv) -> int:
    from kvideo.data.prepare import load_prepare_config, prepare
    from kvideo.data.prepare.captions import CaptionFileError
    from kvideo.data.prepare.config import ConfigError
    from kvideo.data.prepare.runner import install_sigterm_exit

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="video files, directories, lists of paths; and key=value overrides")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--captions", help="CSV or JSONL of captions keyed by source path (captions.file)")
    p.add_argument("--workers", type=int, help="worker processes (run.workers)")
    p.add_argument("--num-shards", type=int, help="machines the inputs are split across")
    p.add_argument("--shard-id", type=int, help="this machine's number in [0, num-shards)")
    p.add_argument("--config", action="append", default=[], help="prepare YAML config(s), merged in order")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_intermixed_args(argv)
    overrides = [a for a in args.inputs if "=" in a and not Path(a).exists()]
    inputs = [a for a in args.inputs if a not in overrides]
    if args.captions is not None:
        overrides.append(f"captions.file={args.captions}")
    if args.workers is not None:
        overrides.append(f"run.workers={args.workers}")
    if not inputs:
        p.error("no INPUT given")
    try:
        cfg = load_prepare_config(args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    install_sigterm_exit()
    try:
        report = prepare(inputs, args.out, cfg, num_shards=args.num_shards, shard_id=args.shard_id,
                         progress=not args.no_progress)
    except (ConfigError, CaptionFileError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing committed is lost; run the same command again to resume", file=sys.stderr)
        return 130
    print(json.dumps({k: v for k, v in report.items() if k != "parts"}, indent=2))
    return 0


def _merge(argv) -> int:
    from kvideo.data.prepare import merge

    p = argparse.ArgumentParser(prog="prepare_videos.py merge", description="join the parts of a multi-machine run")
    p.add_argument("parts", nargs="+", metavar="DIR_OR_JOURNAL")
    p.add_argument("--out", required=True)
    p.add_argument("--allow-partial", action="store_true", help="merge even if parts are missing or unfinished")
    args = p.parse_args(argv)
    try:
        report = merge(args.parts, args.out, allow_partial=args.allow_partial)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in report.items() if k != "parts"}, indent=2))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "merge":
        return _merge(argv[1:])
    return _run(argv)


if __name__ == "__main__":
    sys.exit(main())
