"""Motion-score presets measured from a dataset's shards, for `recipe.motion.presets`.

    python tools/motion_presets.py --shards DIR [DIR ...] [--by speed] [--where KEY=VALUE ...]
        [--quantiles low=0.25,medium=0.5,high=0.75,extreme=0.95] [--json FILE]

The keyframe and interpolation models are conditioned on each clip's motion score (the shards'
`motion_score`, `kvideo.data.motion`); sampling turns a preset name into a score, so the presets
should be scores the model saw in training. Two ways to read them off the data:

- `--quantiles` (the default, for any dataset): each preset is that quantile of every clip's score;
- `--by speed` (ShapesWorld v1 and v2): the median score of the clips of each caption speed
  (`still`, `slow`, `fast`; a v2 clip counts by the fastest of its objects), the presets the
  captions' words name at sampling.

`--where kind=single` keeps the clips whose metadata has that top-level value (v2's clip kinds
differ: two characters move more pixels than one). The table gives each preset's clips and the
10th / 50th / 90th percentiles, and the last line is the override to paste into a stage config
or a demo budget: `recipe.motion.presets={still: 0.0, slow: 0.064, fast: 0.164}`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPEED_ORDER = ("still", "slow", "fast")


def clip_speed(meta: dict) -> Optional[str]:
    """The caption speed of a ShapesWorld clip ('still', 'slow' or 'fast'): v1's `speed`, or the
    fastest object of a v2 clip's shots; None for metadata of neither kind."""
    if "shots" in meta:
        speeds = [o.get("speed") for shot in meta["shots"] for o in shot.get("objects", [])]
    elif "speed" in meta:
        speeds = [meta["speed"]]
    else:
        return None
    named = [s for s in speeds if s in SPEED_ORDER[1:]]
    return max(named, key=SPEED_ORDER.index) if named else "still"


def parse_pairs(text: str, flag: str) -> Dict[str, str]:
    pairs = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"{flag}: expected NAME=VALUE pairs separated by commas; got {item!r}")
        pairs[key] = value
    return pairs


def read_scores(shards: Sequence[str], where: Dict[str, str]) -> List[dict]:
    """[{"score", "speed"}] of every clip of `shards` whose metadata matches `where` and that has a
    motion score; a shard folder without any is an error naming it."""
    from kvideo.data.shards import ShardIndex

    rows = []
    for folder in shards:
        index = ShardIndex(folder)
        found = 0
        for i in range(len(index)):
            meta = index.metadata(i)
            if meta.get("motion_score") is None:
                continue
            if any(str(meta.get(k)) != v for k, v in where.items()):
                continue
            rows.append({"score": float(meta["motion_score"]), "speed": clip_speed(meta)})
            found += 1
        if not found:
            raise ValueError(f"--shards {folder}: no clip with a motion_score"
                             + (f" matching --where {where}" if where else ""))
    return rows


def presets_by_speed(rows: List[dict]) -> Dict[str, dict]:
    groups: Dict[str, List[float]] = {}
    for r in rows:
        if r["speed"] is None:
            raise ValueError("--by speed needs ShapesWorld metadata (`speed`, or v2 `shots`); "
                             "use --quantiles for other data")
        groups.setdefault(r["speed"], []).append(r["score"])
    return {name: summary(groups[name], "median") for name in SPEED_ORDER if name in groups}


def presets_by_quantile(rows: List[dict], quantiles: Dict[str, str]) -> Dict[str, dict]:
    scores = [r["score"] for r in rows]
    out = {}
    for name, q in quantiles.items():
        value = float(q)
        if not 0 <= value <= 1:
            raise ValueError(f"--quantiles {name}={q}: a quantile lies in [0, 1]")
        out[name] = {**summary(scores, f"q{value:g}"), "preset": float(np.quantile(scores, value))}
    return out


def summary(scores: List[float], rule: str) -> dict:
    p10, p50, p90 = np.percentile(scores, [10, 50, 90])
    return {"clips": len(scores), "p10": float(p10), "p50": float(p50), "p90": float(p90),
            "preset": float(p50), "rule": rule}


def override(presets: Dict[str, dict]) -> str:
    return "recipe.motion.presets={" + ", ".join(f"{k}: {round(v['preset'], 4):g}" for k, v in presets.items()) + "}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", nargs="+", required=True, help="shard folders (a split, e.g. data/train)")
    ap.add_argument("--by", choices=["speed"], help="median of each ShapesWorld caption speed")
    ap.add_argument("--quantiles", default="low=0.25,medium=0.5,high=0.75,extreme=0.95",
                    help="NAME=QUANTILE pairs (without --by)")
    ap.add_argument("--where", action="append", default=[], help="KEY=VALUE: keep clips whose metadata has it")
    ap.add_argument("--json", help="write the presets and their statistics here")
    args = ap.parse_args(argv)
    try:
        where = parse_pairs(",".join(args.where), "--where")
        rows = read_scores(args.shards, where)
        presets = presets_by_speed(rows) if args.by else presets_by_quantile(rows, parse_pairs(args.quantiles, "--quantiles"))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("| preset | rule | clips | p10 | p50 | p90 | preset score |")
    print("|---|---|---|---|---|---|---|")
    for name, s in presets.items():
        print(f"| {name} | {s['rule']} | {s['clips']} | {s['p10']:.3g} | {s['p50']:.3g} | {s['p90']:.3g} | {s['preset']:.3g} |")
    print(override(presets))
    if args.json:
        Path(args.json).write_text(json.dumps({"presets": presets, "override": override(presets),
                                               "shards": args.shards, "where": where}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
