"""Throughput of tools/prepare_videos.py, in source-video seconds per wall second, beside the floor.

    python benchmarks/prepare_throughput.py [INPUT ...] [--copies 8] [--workers 1 2] [--out runs/bench_prepare]
        [key=value ...]

INPUTs default to ../shared/data/bigbuckbunny.mp4 (one 5.3 s 1280x720 shot, kept as one clip);
each is linked `--copies` times under different names so every worker count has files to share.
For each of `--workers` the whole pipeline runs into a fresh directory (default config, captions
from a generated CSV, plus any key=value overrides), timed around `prepare()`. The floor is a
plain PyAV decode of the same files, one process per worker, frames converted to RGB as any
pipeline needs them (`decode`), and without the conversion (`decode_only`). Run it alone on the
machine: every figure is wall time. Writes OUT/benchmark.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = ROOT.parent / "shared" / "data" / "bigbuckbunny.mp4"


def decode_file(job) -> float:
    """Decode every frame of a file with PyAV (1 thread, as the pipeline's workers); its duration in s."""
    import av

    path, to_rgb = job
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type, stream.thread_count = "AUTO", 1
        for frame in container.decode(stream):
            if to_rgb:
                frame.to_ndarray(format="rgb24")
        return float(stream.duration * stream.time_base) if stream.duration else 0.0


def decode_floor(files, workers: int, to_rgb: bool) -> dict:
    t0 = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        seconds = sum(pool.map(decode_file, [(f, to_rgb) for f in files], chunksize=1))
    wall = time.perf_counter() - t0
    return {"workers": workers, "source_s": round(seconds, 2), "wall_s": round(wall, 2),
            "throughput": round(seconds / wall, 2)}


def pipeline(files, out: Path, workers: int, overrides) -> dict:
    from kvideo.data.prepare import load_prepare_config, prepare

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    captions = out.parent / f"{out.name}_captions.csv"
    captions.write_text("path,caption\n" + "".join(f"{f},benchmark clip\n" for f in files))
    cfg = load_prepare_config([ROOT / "configs" / "prepare" / "default.yaml"],
                              [f"captions.file={captions}", f"run.workers={workers}", *overrides])
    t0 = time.perf_counter()
    report = prepare(files, out, cfg, progress=True)
    wall = time.perf_counter() - t0
    return {"workers": workers, "source_s": report["seconds_in"], "wall_s": round(wall, 2),
            "throughput": round(report["seconds_in"] / wall, 2), "clips_out": report["clips_out"],
            "rejects_by_reason": {k: v for k, v in report["rejects_by_reason"].items() if v}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="*", help="video files (default: bigbuckbunny.mp4); key=value overrides")
    ap.add_argument("--copies", type=int, default=8, help="links of each input under different names")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="runs/bench_prepare")
    args = ap.parse_intermixed_args()
    overrides = [a for a in args.inputs if "=" in a and not Path(a).exists()]
    inputs = [Path(a) for a in args.inputs if a not in overrides] or [DEFAULT_INPUT]

    out = Path(args.out)
    src = out / "inputs"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    files = []
    for i, path in enumerate(inputs):
        for c in range(args.copies):
            link = src / f"{i:03d}_{c:03d}_{path.name}"
            try:
                os.link(path.resolve(), link)
            except OSError:
                shutil.copy2(path, link)
            files.append(str(link.resolve()))

    result = {"date": date.today().isoformat(), "command": " ".join(sys.argv),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}",
              "inputs": [str(p) for p in inputs], "copies": args.copies, "overrides": overrides,
              "decode": [], "decode_only": [], "prepare": []}
    for w in args.workers:
        result["decode_only"].append(decode_floor(files, w, to_rgb=False))
        result["decode"].append(decode_floor(files, w, to_rgb=True))
        result["prepare"].append(pipeline(files, out / f"prepared_w{w}", w, overrides))
        print(json.dumps(result["prepare"][-1]), flush=True)
    (out / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print("\n| workers | prepare (source s / wall s) | PyAV decode to RGB | PyAV decode only | prepare / decode |")
    print("|---|---|---|---|---|")
    for p, d, o in zip(result["prepare"], result["decode"], result["decode_only"]):
        print(f"| {p['workers']} | {p['throughput']:.2f} | {d['throughput']:.2f} | {o['throughput']:.2f} | "
              f"{p['throughput'] / d['throughput']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
