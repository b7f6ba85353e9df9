"""Score whole-cascade videos on ShapesWorld with the project's scorer (no pretrained network).

    python tools/evaluate_shapes.py --pipeline configs/pipeline/shapes.yaml [key=value ...]
        [--prompts FILE] [--limit N] [--seed N] [--batch 4] [--fps-preset low|medium|high]
        [--save-videos N] [--call KEY=VALUE ...] --out DIR
        [--inception FILE] [--i3d FILE] [--clip ARCH:FILE] [--raft FILE] [--reference DIR] [--metrics ...]

Every prompt (default: the canonical test set, seen and held-out pairs; `--prompts` a text file
with one ShapesWorld caption per line) goes through `kvideo.pipeline.Pipeline` from its text
alone: t2i first frame, keyframes with the motion preset the prompt's speed names (still / slow
/ fast; `--call motion_score=X` fixes one for every prompt), interpolation, video decoder.
Each video is scored (`kvideo.data.shapes_scorer.score_clip`):

  accuracy        per attribute (background, colour, shape, direction, speed) and all-correct,
                  for seen and held-out pairs;
  speed           measured object speed (px per 24-fps frame) by requested speed;
  consistency     object-area coefficient of variation, colour drift and background flicker
                  (kvideo.data.shapes_scorer) over the video;
  first-frame     PSNR of the video's frame 0 against the first frame it was conditioned on,
                  and whether that first frame leaves the object room for the requested motion
                  (`motion_room`: a generated first frame with the object at the edge it is asked
                  to move toward is a start no ShapesWorld clip has), with the direction accuracy
                  of the videos whose first frame fits and of those whose does not.

Writes DIR/results.json (settings, summary, every video's scores), DIR/results.md (the tables),
DIR/sheet.png (the first 8 videos, one row each) and the first --save-videos videos as mp4s.

With weights files (`--inception`, `--i3d`, `--clip ARCH:FILE`, `--raft`; `--reference DIR` for
FID, KID and FVD; tools/evaluate_videos.py's flags), every video is written with its prompt
beside it and the field's metrics join the scores: results.json's `metrics` is
tools/evaluate_videos.py's metrics.json for DIR/videos.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kvideo.data.shapes_scorer import CONSISTENCY
from kvideo.evaluation import mean_present, pct

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from tools import evaluate_videos  # noqa: E402

ATTRS = ("background", "color", "shape", "direction", "speed")


def read_prompts(path: str | None, limit: int | None) -> list:
    """[{"prompt", "split"}]: the canonical set, or a file's lines (split from the pair)."""
    from kvideo.data.shapesworld import HELD_OUT_PAIRS, parse_caption
    from kvideo.evaluation import canonical_prompts

    if path is None:
        return canonical_prompts(limit)
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--prompts '{file}' does not exist")
    items = []
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            a = parse_caption(line.strip())
        except ValueError as e:
            raise ValueError(f"--prompts '{file}' line {n}: {e}") from e
        items.append({"prompt": line.strip(),
                      "split": "held_out" if (a["color"], a["shape"]) in HELD_OUT_PAIRS else "seen"})
    if not items:
        raise ValueError(f"--prompts '{file}' has no prompts")
    return items[:limit] if limit else items


def summarise(rows: list) -> dict:
    """Accuracy, all-correct, speed by request, consistency and frame-0 PSNR of some videos."""
    if not rows:
        return {"n": 0}
    out = {"n": len(rows), "accuracy": {a: float(np.mean([r["correct"][a] for r in rows])) for a in ATTRS},
           "all_correct": float(np.mean([r["all_correct"] for r in rows]))}
    for key in (*CONSISTENCY, "frame0_psnr"):
        out[key if key == "frame0_psnr" else f"mean_{key}"] = mean_present(r[key] for r in rows)
    judged = [r for r in rows if r.get("first_frame_fits") is not None]  # moving prompts, object found
    out["first_frame_fits"] = float(np.mean([r["first_frame_fits"] for r in judged])) if judged else None
    for fits in (True, False):
        sel = [r["correct"]["direction"] for r in judged if r["first_frame_fits"] is fits]
        out[f"direction_if_first_frame_{'fits' if fits else 'not'}"] = {"n": len(sel), "accuracy": float(np.mean(sel))
                                                                          if sel else None}
    out["speed_px_per_24fps_frame"] = {}
    for name in ("still", "slow", "fast"):
        vals = [r["speed_px_per_24fps_frame"] or 0.0 for r in rows if r["requested"] == name]
        if vals:
            out["speed_px_per_24fps_frame"][name] = float(np.mean(vals))
    return out


def speeds_cell(speeds: dict) -> str:
    """Measured speed by requested speed: "still / slow / fast" px per 24-fps frame."""
    return " / ".join(f"{speeds[k]:.2f}" if k in speeds else "-" for k in ("still", "slow", "fast"))


def psnr_cell(v) -> str:
    return "-" if v is None else f"{v:.1f} dB"


def markdown(summary: dict) -> str:
    lines = ["| split | videos | background | colour | shape | direction | speed | all correct | "
             "area CV | colour drift | background flicker | frame-0 PSNR | speed px/frame still / slow / fast | first frame leaves room | "
             "direction if it does / does not |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for split in ("seen", "held_out", "all"):
        s = summary.get(split, {"n": 0})
        if not s["n"]:
            continue
        acc = s["accuracy"]
        cv = "-" if s["mean_area_cv"] is None else f"{s['mean_area_cv']:.3f}"
        drift = "-" if s["mean_color_drift"] is None else f"{s['mean_color_drift']:.1f}"
        flicker = "-" if s.get("mean_background_flicker") is None else f"{s['mean_background_flicker']:.2f}"
        lines.append(f"| {split} | {s['n']} | " + " | ".join(pct(acc[a]) for a in ATTRS)
                     + f" | {pct(s['all_correct'])} | {cv} | {drift} | {flicker} | {psnr_cell(s['frame0_psnr'])} | "
                     f"{speeds_cell(s['speed_px_per_24fps_frame'])} | {pct(s.get('first_frame_fits'))} | "
                     f"{room_cell(s)} |")
    return "\n".join(lines)


def room_cell(summary: dict) -> str:
    """Direction accuracy of the videos whose first frame leaves room for the motion / does not (n)."""
    cells = []
    for key in ("direction_if_first_frame_fits", "direction_if_first_frame_not"):
        d = summary.get(key) or {"n": 0, "accuracy": None}
        cells.append(f"{pct(d['accuracy'])} ({d['n']})")
    return " / ".join(cells)


def pipeline_call_arguments(items) -> dict:
    """`--call key=value` items -> pipeline call arguments (seed and fps_preset are --seed and --fps-preset)."""
    from kvideo.pipeline import call_arguments

    return call_arguments(items, exclude=("seed", "fps_preset"))


@torch.no_grad()
def evaluate(pipe, prompts: list, args, out: Path) -> dict:
    from tqdm import tqdm
    from torchvision.utils import save_image

    from kvideo.data.shapes_scorer import motion_room, score_clip
    from kvideo.data.shapesworld import SPEEDS
    from kvideo.evaluation import motion_preset
    from kvideo.pipeline import VideoOutput, video_to_uint8, write_outputs
    from kvideo.metrics.reconstruction import psnr

    call = pipeline_call_arguments(args.call)
    metrics_wanted = evaluate_videos.wants_metrics(args)
    rows, sheet, timings = [], [], {}
    t0 = time.perf_counter()
    bar = tqdm(total=len(prompts), desc="videos")
    for start in range(0, len(prompts), args.batch):
        items = prompts[start: start + args.batch]
        texts = [it["prompt"] for it in items]
        presets = [motion_preset(t) for t in texts]
        motion = call.get("motion_score", presets)  # a fixed score (a sweep point) or each prompt's preset
        video = pipe(texts, seed=args.seed + start, fps_preset=args.fps_preset, progress=False,
                     **{**call, "motion_score": motion})
        conditioned = video.settings["first_frame"]["source"] != "none"
        for k, v in video.timings.items():
            timings[k] = timings.get(k, 0.0) + v
        for j, item in enumerate(items):
            frames = video_to_uint8(video.frames[j])
            r = score_clip(frames, video.fps, item["prompt"])
            room = (motion_room(video_to_uint8(video.first_frames[j][:, None])[0], item["prompt"], fps=video.fps,
                                num_frames=frames.shape[0]) if conditioned else None) or {}
            speed_pf = r["speed_measured_px_per_frame"]
            rows.append({"prompt": item["prompt"], "split": item["split"], "requested": presets[j],
                         "correct": {a: bool(r["correct"][a]) for a in ATTRS}, "all_correct": bool(r["all_correct"]),
                         "pred": r["pred"], **{key: r[key] for key in CONSISTENCY},
                         # px per 24-fps frame: the ShapesWorld spec's unit, whatever the output rate
                         "speed_px_per_24fps_frame": None if speed_pf is None else speed_pf * video.fps / 24.0,
                         "speed_requested_px_per_24fps_frame": SPEEDS.get(r["target"]["speed"], 0.0)
                         * frames.shape[2] / 24.0,
                         "frame0_psnr": float(psnr(video.frames[j][:, 0][None], video.first_frames[j][None])[0])
                         if conditioned else None,
                         "first_frame_room_px": room.get("room_px"), "travel_px": room.get("travel_px"),
                         "first_frame_fits": room.get("fits")})
            if len(sheet) < 8:
                sheet.append(video.frames[j].transpose(0, 1))  # (f, 3, h, w)
            index = start + j
            if index < args.save_videos or metrics_wanted:  # the field's metrics read every video
                one = VideoOutput(frames=video.frames[j:j + 1], fps=video.fps, first_frames=video.first_frames[j:j + 1],
                                  keyframes=video.keyframes[j:j + 1])
                path = out / "videos" / f"{index:03d}.mp4"
                write_outputs(one, [path])
                path.with_suffix(".json").write_text(json.dumps({"prompt": item["prompt"], "split": item["split"]}))
        bar.update(len(items))
    bar.close()
    summary = {split: summarise([r for r in rows if split == "all" or r["split"] == split])
               for split in ("seen", "held_out", "all")}
    out.mkdir(parents=True, exist_ok=True)
    frames_per_row = max(s.shape[0] for s in sheet)
    padded = [torch.cat([s, torch.ones(frames_per_row - s.shape[0], *s.shape[1:])]) for s in sheet]
    save_image((torch.cat(padded) + 1) / 2, out / "sheet.png", nrow=frames_per_row)
    return {"pipeline": args.pipeline, "overrides": args.overrides, "call": call, "prompts": len(rows), "seed": args.seed,
            "fps_preset": args.fps_preset, "video_fps": video.fps, "frames": int(video.frames.shape[2]),
            "settings": video.settings, "seconds": round(time.perf_counter() - t0, 1),
            "stage_seconds": {k: round(v, 1) for k, v in timings.items()}, **summary, "videos": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", required=True, help="a pipeline YAML (configs/pipeline/)")
    ap.add_argument("overrides", nargs="*", help="pipeline config overrides key=value")
    ap.add_argument("--prompts", help="a text file, one ShapesWorld caption per line (default: the canonical set)")
    ap.add_argument("--limit", type=int, help="only the first N prompts of each split (or of --prompts)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=4, help="videos sampled together")
    ap.add_argument("--fps-preset", choices=["low", "medium", "high"],
                    help="interpolation passes 0 / 1 / 2 (default: the pipeline config's fps_preset)")
    ap.add_argument("--save-videos", type=int, default=8, help="write the first N videos as mp4")
    ap.add_argument("--call", action="append", metavar="KEY=VALUE",
                    help="a pipeline call argument, e.g. image_guidance=3 or first_frame=false (repeatable)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--reference", type=Path, help="real videos for FID, KID and FVD (with --inception / --i3d)")
    evaluate_videos.add_metric_flags(ap)  # with weights given, the field's metrics join the scores
    args = ap.parse_args(argv)

    from kvideo.pipeline import Pipeline

    try:
        prompts = read_prompts(args.prompts, args.limit)
        pipe = Pipeline.from_config(args.pipeline, args.overrides)
        if evaluate_videos.wants_metrics(args):  # bad weights flags fail before any sampling
            evaluate_videos.build(argparse.Namespace(**{**vars(args), "prompts": None}))
        result = evaluate(pipe, prompts, args, Path(args.out))
        if evaluate_videos.wants_metrics(args):
            result["metrics"] = evaluate_videos.run(argparse.Namespace(
                **{**vars(args), "generated": Path(args.out) / "videos", "prompts": None, "out": Path(args.out)}))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    table = markdown(result)
    if "metrics" in result:
        table += "\n\n" + evaluate_videos.report_markdown(result["metrics"])
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(table + "\n")
    print(table)
    print(f"\n{result['prompts']} videos of {result['frames']} frames at {result['video_fps']:g} fps in "
          f"{result['seconds']} s ({', '.join(f'{k} {v} s' for k, v in result['stage_seconds'].items())}); "
          f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
