"""Run the ShapesWorld ablations (configs/ablations/*.yaml) and write one table.

    python tools/run_ablations.py --pipeline configs/pipeline/shapes.yaml [key=value ...]
        [--ablations configs/ablations/a.yaml ...] [--limit N] [--seed N] [--force] --out DIR

An ablation YAML names its table section (`group`), its row (`name`), the pipeline call
arguments that make it (`call`, e.g. `{image_guidance: 3.0}` or `{first_frame: false}`) and,
when the ablation is a training change, `train: {stage, overrides}`: the runner then trains that
stage again into DIR/runs/NAME from the config of the pipeline's checkpoint for it (same data,
same budget) with the overrides, and samples the cascade with the new run in its place. Every
ablation is scored by tools/evaluate_shapes.py on the same prompts and seed, into DIR/NAME/;
finished ablations are reused unless --force, and ablations with the same call and training (the
default cascade is the reference row of several groups) are sampled once: calls are compared
by the settings they resolve to, so `{image_guidance: 2.0}` is the default cascade when 2.0 is
the keyframe checkpoint's default. Writes DIR/ablations.md and DIR/ablations.json. With weights
files (tools/evaluate_videos.py's flags, `--reference DIR`), every row gains the field's metrics
(FID, FVD, CLIPSIM, ...), the features of every video cached once in DIR/features.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script, `tools` is not yet importable
from tools import evaluate_shapes, evaluate_videos  # noqa: E402
from kvideo.evaluation import pct  # noqa: E402
from tools.evaluate_shapes import psnr_cell, speeds_cell  # noqa: E402

STAGES = ("t2i", "keyframe", "interpolation", "video_decoder")
METRIC_COLUMNS = ("fid", "kid", "fvd", "clipsim", "clip_temp", "flow_score", "warping_error")


def read_ablation(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"ablation '{path}' does not exist")
    spec = OmegaConf.to_container(OmegaConf.load(path))
    unknown = set(spec) - {"group", "name", "call", "train"}
    if unknown or "group" not in spec or "name" not in spec:
        raise ValueError(f"ablation '{path}': needs 'group' and 'name', may have 'call' and 'train'; "
                         f"unknown keys {sorted(unknown)}")
    train = spec.get("train")
    if train is not None and (train.get("stage") not in STAGES or not isinstance(train.get("overrides", []), list)):
        raise ValueError(f"ablation '{path}': train.stage must be one of {STAGES} and train.overrides a list")
    return {"file": str(path), "stem": path.stem, "call": spec.get("call") or {}, **spec}


def train_variant(spec: dict, pipeline_cfg, out: Path) -> str:
    """Train the ablation's stage from the config of the pipeline's checkpoint for it; return the run."""
    from kvideo.inference.checkpoints import resolve_checkpoint

    stage = spec["train"]["stage"]
    base = getattr(pipeline_cfg, stage)
    if not base:
        raise ValueError(f"ablation '{spec['file']}' retrains '{stage}', which the pipeline config does not name")
    config = resolve_checkpoint(base) / "config.yaml"
    run_dir = out / "runs" / spec["stem"]
    cmd = [sys.executable, str(ROOT / "train.py"), str(config), f"run_dir={run_dir}", *spec["train"]["overrides"]]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return str(run_dir)


def call_items(spec: dict) -> list:
    """The ablation's call as evaluate_shapes' `--call key=value` items."""
    return [f"{name}={json.dumps(value)}" for name, value in spec["call"].items()]


def resolved_settings(pipe, spec: dict) -> dict:
    """What the ablation's call runs, resolved against the pipeline's stage defaults (as
    tools/evaluate_shapes.py calls it): ablations that resolve alike are the same videos."""
    try:
        call = evaluate_shapes.pipeline_call_arguments(call_items(spec))
        settings = pipe.settings(**call)
    except ValueError as e:
        raise ValueError(f"ablation '{spec['file']}': {e}") from None
    if "motion_score" not in call:  # evaluate_shapes then gives each prompt its caption's preset
        settings["keyframes"]["motion_score"] = "each prompt's preset"
    return settings


def row(spec: dict, result: dict) -> dict:
    seen, held = result["seen"], result.get("held_out", {"n": 0})
    return {"group": spec["group"], "name": spec["name"], "file": spec["file"], "videos": result["prompts"],
            "seen_all_correct": seen["all_correct"], "seen_accuracy": seen["accuracy"],
            "held_out_all_correct": held.get("all_correct"), "frame0_psnr": result["all"]["frame0_psnr"],
            "speed_px_per_24fps_frame": result["all"]["speed_px_per_24fps_frame"],
            "seconds_per_video": result["seconds"] / max(1, result["prompts"]),
            "stage_seconds": result["stage_seconds"],
            **{k: result.get("metrics", {}).get(k) for k in METRIC_COLUMNS}}


def markdown(rows: list) -> str:
    extra = [k for k in METRIC_COLUMNS if any(r.get(k) is not None for r in rows)]  # the field's metrics, when given
    lines = ["| ablation | setting | videos | seen all correct | seen direction | seen speed | seen shape | "
             "held-out all correct | frame-0 PSNR | speed px/frame still / slow / fast | s per video |"
             + "".join(f" {k} |" for k in extra),
             "|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(extra)]
    for r in rows:
        acc = r["seen_accuracy"]
        lines.append(f"| {r['group']} | {r['name']} | {r['videos']} | {pct(r['seen_all_correct'])} | "
                     f"{pct(acc['direction'])} | {pct(acc['speed'])} | {pct(acc['shape'])} | "
                     f"{pct(r['held_out_all_correct'])} | {psnr_cell(r['frame0_psnr'])} | "
                     f"{speeds_cell(r['speed_px_per_24fps_frame'])} | {r['seconds_per_video']:.1f} |"
                     + "".join(" - |" if r.get(k) is None else f" {r[k]:.4g} |" for k in extra))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", required=True)
    ap.add_argument("overrides", nargs="*", help="pipeline config overrides key=value (for every ablation)")
    ap.add_argument("--ablations", nargs="+", help="default: every configs/ablations/*.yaml")
    ap.add_argument("--limit", type=int, help="prompts per split (default: all 60 canonical prompts)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="re-run finished ablations")
    ap.add_argument("--out", required=True)
    ap.add_argument("--reference", type=Path, help="real videos for FID, KID and FVD (with --inception / --i3d)")
    evaluate_videos.add_metric_flags(ap)  # with weights given, each row gains the field's metrics
    args = ap.parse_args(argv)
    if evaluate_videos.wants_metrics(args) and args.features is None:
        args.features = Path(args.out) / "features"  # one cache: the reference's features computed once

    from kvideo.pipeline import Pipeline, load_pipeline_config

    out = Path(args.out)
    files = [Path(f) for f in args.ablations] if args.ablations else sorted((ROOT / "configs" / "ablations").glob("*.yaml"))
    try:
        specs = [read_ablation(f) for f in files]
        pipeline_cfg = load_pipeline_config(args.pipeline, args.overrides)
        pipe = Pipeline(pipeline_cfg)
        keys = [json.dumps({"settings": resolved_settings(pipe, spec), "train": spec.get("train")}, sort_keys=True)
                for spec in specs]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    del pipe  # evaluate_shapes loads the pipeline of each ablation itself
    rows, ran = [], {}  # ran: resolved settings and training -> the results of the first ablation that sampled it
    for spec, key in zip(specs, keys):
        result_file = out / spec["stem"] / "results.json"
        if key in ran:  # e.g. the default cascade, the reference row of several groups: sampled once
            result_file = ran[key]
            print(f"== {spec['group']}: {spec['name']}: the same videos as {result_file.parent.name}", flush=True)
        elif args.force or not result_file.is_file():
            overrides = list(args.overrides)
            if spec.get("train"):
                overrides.append(f"{spec['train']['stage']}={train_variant(spec, pipeline_cfg, out)}")
            cmd = ["--pipeline", args.pipeline, *overrides, "--seed", str(args.seed), "--save-videos", "2",
                   "--out", str(out / spec["stem"])]
            if args.limit:
                cmd += ["--limit", str(args.limit)]
            for item in call_items(spec):
                cmd += ["--call", item]
            if evaluate_videos.wants_metrics(args):
                cmd += evaluate_videos.metric_flags(args)
            print(f"== {spec['group']}: {spec['name']}", flush=True)
            if evaluate_shapes.main(cmd) != 0:
                print(f"error: ablation '{spec['file']}' failed", file=sys.stderr)
                return 2
        ran.setdefault(key, result_file)
        rows.append({**row(spec, json.loads(result_file.read_text())), "videos_of": result_file.parent.name})
    rows.sort(key=lambda r: (r["group"], r["file"]))
    table = markdown(rows)
    (out / "ablations.md").write_text(table + "\n")
    (out / "ablations.json").write_text(json.dumps(rows, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
