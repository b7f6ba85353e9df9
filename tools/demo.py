"""`make demo`: render ShapesWorld, train every stage of the cascade, sample and score videos.

    python tools/demo.py [--out out/demo] [--budget configs/demo/shapes.yaml] [--skip-train]

The budget file names the data size, each stage's config with the overrides that fit the demo
in about an hour on 2 CPU cores, and how many canonical prompts of each split to sample. In
order: the ShapesWorld train and val splits are rendered into OUT/data; movq, t2i, keyframe,
interpolation and video_decoder are trained with train.py into OUT/runs/STAGE (each with its own
progress bar and ETA); OUT/pipeline.yaml names the five runs; the canonical prompts (seen and
held-out pairs) go through the whole cascade into OUT/samples/videos/*.mp4 (and a contact
sheet), scored by tools/evaluate_shapes.py. Re-running reuses what is finished: rendered data is
kept and train.py resumes each run (a finished run returns at once).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("movq", "t2i", "keyframe", "interpolation", "video_decoder")


def render(out: Path, num_clips: int, split: str, size: int) -> None:
    from kvideo.data.shapesworld import ShapesWorldSpec, write_shapesworld

    if (out / "dataset.json").is_file():
        print(f"reusing ShapesWorld {split} split in {out}")
        return
    print(f"rendering {num_clips} ShapesWorld clips ({split}) into {out}", flush=True)
    write_shapesworld(out, ShapesWorldSpec(num_clips, size=size, seed=0, split=split), workers=2)


def read_budget(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"demo budget '{path}' does not exist")
    budget = OmegaConf.to_container(OmegaConf.load(path))
    missing = [s for s in ORDER if s not in budget.get("stages", {})]
    if missing:
        raise ValueError(f"demo budget '{path}': stages.{missing[0]} is missing (every stage of {ORDER} is trained)")
    return budget


def stage_command(stage: str, spec: dict, out: Path) -> list:
    runs, data = out / "runs", out / "data"
    args = [f"run_dir={runs / stage}", f"data.shards={data / 'train'}"]
    if stage in ("movq", "video_decoder"):  # the pixel stages evaluate on held-out clips
        args.append(f"data.val_shards={data / 'val'}")
    if stage != "movq":
        args.append(f"recipe.movq={runs / 'movq'}")
    if stage in ("keyframe", "interpolation"):
        args.append(f"recipe.init_from={runs / 't2i'}")
    config = Path(spec["config"])
    return [sys.executable, str(ROOT / "train.py"), str(config if config.is_absolute() else ROOT / config),
            *args, *spec.get("overrides", [])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--budget", default=str(ROOT / "configs" / "demo" / "shapes.yaml"))
    ap.add_argument("--skip-train", action="store_true", help="sample and score the runs already in OUT/runs")
    args = ap.parse_args(argv)
    out = Path(args.out)
    try:
        budget = read_budget(Path(args.budget))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = budget.get("data", {})
    times = {}
    t0 = time.perf_counter()
    render(out / "data" / "train", int(data.get("train_clips", 600)), "train", int(data.get("size", 64)))
    render(out / "data" / "val", int(data.get("val_clips", 16)), "val", int(data.get("size", 64)))
    times["data"] = time.perf_counter() - t0
    for stage in ORDER:
        if args.skip_train:
            break
        cmd = stage_command(stage, budget["stages"][stage], out)
        print(f"\n== stage {stage}\n+ {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        times[stage] = time.perf_counter() - t0

    pipeline = {**budget.get("pipeline", {}), **{s: str(out / "runs" / s) for s in ORDER if s != "movq"}}
    (out / "pipeline.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(pipeline)))
    per_split = int(budget.get("samples", {}).get("per_split", 3))
    sys.path.insert(0, str(ROOT))  # run as a script, `tools` is not yet importable
    from tools import evaluate_shapes

    print(f"\n== sampling {2 * per_split} canonical prompts through the cascade", flush=True)
    t0 = time.perf_counter()
    samples = out / "samples"
    code = evaluate_shapes.main(["--pipeline", str(out / "pipeline.yaml"), "--limit", str(per_split),
                                 "--save-videos", str(2 * per_split), "--out", str(samples)])
    times["samples"] = time.perf_counter() - t0
    if code != 0:
        return code
    print("\nkvideo demo: ShapesWorld text-to-video, every stage trained here")
    print(f"  videos:        {samples / 'videos'}/*.mp4 (prompts and scores in {samples / 'results.json'})")
    print(f"  contact sheet: {samples / 'sheet.png'}")
    print(f"  pipeline:      {out / 'pipeline.yaml'}  (python sample.py --pipeline {out / 'pipeline.yaml'} "
          "--prompt \"...\" --out video.mp4)")
    print("  minutes: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
