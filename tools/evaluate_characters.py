"""Score a cascade on ShapesWorld v2 (characters): identity by name and from a reference, across
shots and per lane, with the v2 scorer (kvideo/data/characters_scorer.py).

    python tools/evaluate_characters.py --pipeline PIPELINE.yaml --test data/characters/test --out OUT \
        [--identity none|reference|shot] [--first-frame generated|reference [--placement caption|true]]
        [--limit 8] [--call KEY=VALUE ...]

The prompts are the captions of the clips of a v2 test split (`make_shapesworld.py --world
characters --split test`), the first `--limit` of each group: single clips of training
characters (identity by name), single clips of held-out characters (never trained on: identity
from their reference alone), two-shot clips and two-character clips. How identity is given:

- `--identity none`: the caption's names only;
- `reference`: each generation also gets the named characters' reference images (the split's
  references/NAME.png) through the pipeline's identity attention (`references=`);
- `shot`: as `reference`, but a two-shot prompt's second shot gets shot 1's first frame as its
  character's reference (the two-shot pipeline, `kvideo.shots`): identity carried from a
  generated shot, not from the reference image.

`--first-frame reference` is the Kandinsky Video way: each shot's first frame is composed from the
reference, the character cut out of its reference image (the pixels away from the reference's
background colour), scaled to the clip's canvas and placed on the shot's background, and given to
the keyframe model as its image (the pipeline's `image=`). Where it goes: `--placement caption`
(the default) takes only what the caption says, the lane's centre moved a quarter of the canvas
against the asked direction (room for the motion); `--placement true` uses the test clip's own
start position, information no generated first frame has (the identity experiment's first run).

A two-shot prompt is sampled as two shots (each from its half of the caption, with its own seed)
whose frames are joined and scored as one two-shot clip (the cut, cross-shot consistency, both
shots' identity). OUT/results.json holds every video's scores and the summaries
(`aggregate_character_scores`, per group); OUT/results.md the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GROUPS = ("single_seen", "single_held_out", "two_shots", "two_characters")
IDENTITY_MODES = ("none", "reference", "shot")
SEPARATOR = ", then "  # between a two-shot caption's shots (kvideo.data.characters.scene_caption)


def read_test_prompts(split: Path, limit: int) -> List[dict]:
    """The first `limit` clips of each group of the v2 split `split`: {"prompt", "group", "meta"}."""
    from kvideo.data.shards import ShardIndex

    index = ShardIndex(str(split))
    chosen: Dict[str, List[dict]] = {g: [] for g in GROUPS}
    for i in range(len(index)):
        meta = index.metadata(i)
        if meta.get("world") != "characters":
            raise ValueError(f"'{split}' is not a ShapesWorld v2 split: sample {index.keys[i]} has no world 'characters'")
        kind = meta["kind"]
        group = kind if kind != "single" else ("single_held_out" if meta["character"]["held_out"] else "single_seen")
        if len(chosen[group]) < limit:
            chosen[group].append({"prompt": meta["caption"], "group": group, "meta": meta})
    empty = [g for g in GROUPS if not chosen[g]]
    if empty:
        raise ValueError(f"the split '{split}' has no clip for {', '.join(empty)} (a test split has every kind "
                         "and the held-out characters)")
    return [item for g in GROUPS for item in chosen[g]]


def shot_captions(item: dict) -> List[str]:
    """The caption of each shot of a prompt (one for single and two-character clips)."""
    return item["prompt"].split(SEPARATOR) if item["meta"]["kind"] == "two_shots" else [item["prompt"]]


def cast(item: dict) -> List[str]:
    """The prompt's character names, in lane order."""
    meta = item["meta"]
    return [p["name"] for p in meta["characters"]] if "characters" in meta else [meta["character"]["name"]]


def motion_preset(caption: str) -> str:
    """The motion preset of a one-shot v2 caption: the fastest of its characters' speeds
    ("fast", "slow" or "still"), the configs' preset names."""
    from kvideo.data.characters import parse_scene_caption

    speeds = {o["speed"] for shot in parse_scene_caption(caption)["shots"] for o in shot["objects"]}
    return next((s for s in ("fast", "slow") if s in speeds), "still")


def caption_start(obj: dict, size: int) -> Tuple[float, float]:
    """(x, y) in canvas pixels where a first frame drawn from the caption alone puts a character:
    its lane's centre, moved a quarter of the canvas (of the lane's height, vertically) against
    its direction, so the motion the caption asks has room."""
    from kvideo.data.characters import FULL, lane_rows

    top, bottom = lane_rows(obj.get("lane", FULL), size)
    dx, dy = {"left": (1, 0), "right": (-1, 0), "up": (0, 1), "down": (0, -1)}.get(obj["direction"], (0, 0))
    return size / 2 + dx * size / 4, (top + bottom) / 2 + dy * (bottom - top) / 4


def compose_first_frame(references: Dict[str, np.ndarray], shot: dict, size: int,
                        placement: str = "caption") -> np.ndarray:
    """A first frame (size, size, 3) uint8: the shot's background with each of its characters cut
    out of its reference image (pixels over 60 away from the reference's corner colour), scaled by
    size / reference size and centred on `placement`'s point: `caption_start`, or (`true`) the
    character's start position in the test clip."""
    import cv2

    from kvideo.data.shapesworld import BACKGROUNDS

    frame = np.empty((size, size, 3), np.uint8)
    frame[:] = np.asarray(BACKGROUNDS[shot["background"]], np.uint8)
    for obj in shot["objects"]:
        ref = references[obj["character"]]
        scaled = cv2.resize(ref, (size, size), interpolation=cv2.INTER_AREA) if ref.shape[0] != size else ref
        corner = scaled[0, 0].astype(np.float32)
        mask = np.linalg.norm(scaled.astype(np.float32) - corner, axis=-1) > 60
        ys, xs = np.nonzero(mask)
        if len(ys) == 0:
            continue
        x, y = obj["start_xy"] if placement == "true" else caption_start(obj, size)
        dy, dx = np.rint(np.asarray([y, x]) - [ys.mean(), xs.mean()]).astype(int)
        ty, tx = ys + dy, xs + dx
        inside = (ty >= 0) & (ty < size) & (tx >= 0) & (tx < size)
        frame[ty[inside], tx[inside]] = scaled[ys[inside], xs[inside]]
    return frame


def reference_set(names: List[List[str]], bank, slots: int):
    """The ReferenceSet of each video's names from `bank` (an IdentityBank)."""
    return bank.references_for(["" for _ in names], max_entries=slots, names=names)


@torch.no_grad()
def evaluate(pipe, items: List[dict], args, references: Dict[str, np.ndarray], out: Path) -> dict:
    from tqdm import tqdm

    from kvideo.data.characters_scorer import aggregate_character_scores, score_character_clip
    from kvideo.inference.identity import IdentityBank
    from kvideo.pipeline import VideoOutput, call_arguments, video_to_uint8, write_outputs

    call = call_arguments(args.call, exclude=("seed",))
    bank = IdentityBank.from_images({n: args.test / "references" / f"{n}.png" for n in references})
    slots = int(pipe.keyframe.cfg.data.get("max_references", 2))
    size = int(pipe.keyframe.cfg.data.size[0])
    rows, t0 = [], time.perf_counter()
    for index, item in enumerate(tqdm(items, desc="prompts")):
        names = cast(item)
        frames, first_frames, fps = [], [], None
        for s, caption in enumerate(shot_captions(item)):
            refs = None
            if args.identity != "none":
                refs = reference_set([names], bank, slots)
                if args.identity == "shot" and s == 1:  # shot 2 takes its character from shot 1's first frame
                    shot_bank = IdentityBank({names[0]: first_frames[0]})
                    refs = reference_set([names], shot_bank, slots)
            image = None
            if args.first_frame == "reference":
                composed = compose_first_frame(references, item["meta"]["shots"][s], size, args.placement)
                image = torch.from_numpy(composed).permute(2, 0, 1)[None].float() / 127.5 - 1
            video = pipe([caption], seed=args.seed + 2 * index + s, progress=False, references=refs, image=image,
                         **{"motion_score": motion_preset(caption), **call})
            frames.append(video_to_uint8(video.frames[0]))
            first_frames.append(video.first_frames[0].cpu())
            fps = video.fps
        joined = np.concatenate(frames)
        score = score_character_clip(joined, fps, item["meta"])
        rows.append({"prompt": item["prompt"], "group": item["group"], "kind": score["kind"],
                     "held_out": score["held_out"], "correct": score["correct"], "all_correct": score["all_correct"],
                     "pred": score["pred"], "target": score["target"]})
        if index < args.save_videos:
            clip = torch.from_numpy(joined).permute(3, 0, 1, 2).float()[None] / 127.5 - 1
            path = out / "videos" / f"{index:03d}.mp4"
            write_outputs(VideoOutput(frames=clip, fps=fps, first_frames=clip[:, :, 0], keyframes=clip), [path])
            path.with_suffix(".json").write_text(json.dumps({"prompt": item["prompt"], "group": item["group"]}))
    groups = {g: aggregate_character_scores([r for r in rows if r["group"] == g]) for g in GROUPS}
    return {"pipeline": args.pipeline, "identity": args.identity, "first_frame": args.first_frame,
            "placement": args.placement if args.first_frame == "reference" else None, "call": call,
            "seed": args.seed, "prompts": len(rows), "seconds": round(time.perf_counter() - t0, 1),
            "all": aggregate_character_scores(rows), "groups": groups, "videos": rows}


TABLE = (("single_seen", ("identity", "background", "direction", "speed")), ("single_held_out", ("identity",)),
         ("two_shots", ("identity", "consistency", "cut")), ("two_characters", ("identity", "binding")))


def markdown(result: dict) -> str:
    """One row per group: n, all-correct and the group's attributes."""
    lines = [f"identity: {result['identity']}, first frame: {result['first_frame']}", "",
             "| prompts | n | all correct | attributes |", "|---|---|---|---|"]
    for group, keys in TABLE:
        g = result["groups"][group]
        acc = g.get("accuracy", {})
        cells = ", ".join(f"{k} {acc[k]:.0%}" for k in keys if k in acc)
        lines.append(f"| {group} | {g['n']} | {g.get('all_correct', 0):.0%} | {cells} |")
    return "\n".join(lines)


def summary_line(result: dict) -> str:
    """The headline numbers of a result in one line (tools/demo.py's table)."""
    parts = []
    for group, keys in TABLE:
        acc = result["groups"][group].get("accuracy", {})
        parts.append(f"{group}: " + ", ".join(f"{k} {acc[k]:.0%}" for k in keys if k in acc))
    if result.get("prompts"):
        parts.append(f"{result['seconds'] / result['prompts']:.1f} s/prompt")
    return "; ".join(parts)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", required=True, help="a pipeline YAML")
    ap.add_argument("overrides", nargs="*", help="pipeline config overrides key=value")
    ap.add_argument("--test", required=True, type=Path, help="a ShapesWorld v2 test split (with references/)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--identity", choices=IDENTITY_MODES, default="none")
    ap.add_argument("--first-frame", choices=("generated", "reference"), default="generated")
    ap.add_argument("--placement", choices=("caption", "true"), default="caption",
                    help="with --first-frame reference: where the character goes (see above)")
    ap.add_argument("--limit", type=int, default=8, help="prompts of each group")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-videos", type=int, default=8, help="write the first N videos as mp4")
    ap.add_argument("--call", action="append", metavar="KEY=VALUE", help="a pipeline call argument (repeatable)")
    args = ap.parse_args(argv)

    from kvideo.data.images import read_image
    from kvideo.pipeline import Pipeline

    try:
        items = read_test_prompts(args.test, args.limit)
        names = sorted({n for item in items for n in cast(item)})
        missing = [n for n in names if not (args.test / "references" / f"{n}.png").is_file()]
        if missing and (args.identity != "none" or args.first_frame == "reference"):
            raise FileNotFoundError(f"{args.test / 'references'} has no reference for {', '.join(missing)}")
        references = {n: read_image(args.test / "references" / f"{n}.png") for n in names if n not in missing}
        pipe = Pipeline.from_config(args.pipeline, args.overrides)
        result = evaluate(pipe, items, args, references, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(result)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    (args.out / "results.md").write_text(table + "\n")
    print(table)
    print(f"\n{result['prompts']} prompts in {result['seconds']} s; wrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
