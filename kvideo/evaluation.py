"""What the evaluation tools (tools/evaluate_*.py) share: which checkpoints, which prompts.

    ap = argparse.ArgumentParser(...)
    add_checkpoint_arguments(ap)          # --checkpoint, --all-checkpoints, --minutes
    args = ap.parse_args()
    if (ckpts := checkpoints_from_args(args)) is None:  # [(checkpoint dir, step, minutes or None)]
        return 2
    prompts = canonical_prompts(args.limit)
    score_checkpoints(ckpts, lambda ckpt: evaluate(ckpt, prompts), ["seen all", ...],
                      lambda r: [pct(r["seen"]["all"]), ...], out=Path(args.out) / "results.json")
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Optional

from kvideo.train.logging import checkpoints_on_time_axis


def add_checkpoint_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--checkpoint", required=True, help="a run directory, checkpoint directory or weights file")
    ap.add_argument("--all-checkpoints", action="store_true", help="every checkpoint of the run, on its time axis")
    ap.add_argument("--minutes", type=float, nargs="+",
                    help="with --all-checkpoints: the last checkpoint within each training-time budget")


def add_prompt_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--limit", type=int, help="only the first N prompts of each split")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")


def checkpoints_from_args(args: argparse.Namespace) -> Optional[list]:
    """[(checkpoint dir, step, training minutes or None)], or None (the reason printed to stderr)
    when there is none: `if (ckpts := checkpoints_from_args(args)) is None: return 2`."""
    try:
        return checkpoints_on_time_axis(args.checkpoint, args.all_checkpoints, args.minutes)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def score_checkpoints(ckpts: list, score: Callable[[Path], dict], columns: list,
                      cells: Callable[[dict], list], out: Optional[Path] = None) -> list:
    """Score each checkpoint of `ckpts` (from `checkpoints_from_args`) and print a markdown table
    as it goes, one row a checkpoint: its name, its training minutes, then `cells(result)` under
    `columns`. `score(ckpt)` returns the checkpoint's results; each gets "step" and
    "train_minutes". Returns the results, also written to `out` as JSON when it is given."""
    print("| checkpoint | train min | " + " | ".join(columns) + " |")
    print("|" + "---|" * (len(columns) + 2))
    results = []
    for ckpt, step, minutes in ckpts:
        r = score(ckpt)
        r["step"], r["train_minutes"] = step, minutes
        results.append(r)
        print("| " + " | ".join([ckpt.name, "?" if minutes is None else f"{minutes:.1f}", *cells(r)]) + " |",
              flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    return results


def canonical_prompts(limit: Optional[int] = None) -> list:
    """The canonical ShapesWorld test prompts ({"prompt", "split"}), the first `limit` of each split."""
    from kvideo.data.shapesworld import canonical_test_prompts

    prompts = canonical_test_prompts()
    if limit:
        prompts = [p for s in ("seen", "held_out") for p in [q for q in prompts if q["split"] == s][:limit]]
    return prompts


def mean_present(values) -> Optional[float]:
    """The mean of the values that are not None; None when there are none."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def pct(v: Optional[float]) -> str:
    """A rate as a table cell: "93%", or "-" when it was not measured."""
    return "-" if v is None else f"{v:.0%}"


def motion_preset(prompt: str) -> str:
    """The motion preset a ShapesWorld prompt asks for: "still", "slow" or "fast" (the preset
    names of configs/keyframe/shapes.yaml)."""
    from kvideo.data.shapesworld import parse_caption

    speed = parse_caption(prompt)["speed"]
    return "still" if speed in ("none", None) else speed


def shards_pix_fmt(shards: str) -> str:
    """The pixel format of the first clip of `shards` (e.g. a run's data.shards), so evaluation
    references can be coded as the training clips were."""
    from kvideo.data.shards import ShardIndex
    from kvideo.data.video_io import probe

    return probe(ShardIndex(shards, key="data.shards").read(0, "mp4"))["pix_fmt"]
