"""Do FID, KID and FVD rank ShapesWorld sets as they should? Real clips < MoVQ reconstructions <
the demo's cascade < noise, each against real training clips.

    python benchmarks/metric_ranking.py --demo out/demo --out out/ranking [--reference-clips 64]
        [--real train|val] [--set-size 48] [--frame-stride 4]

Reads a finished `make demo` (tools/demo.py --out DIR): its rendered train and val shards, its
MoVQ run and its pipeline. Writes five folders of mp4s into OUT: `reference` (the first
--reference-clips training clips); `real`: with `--real train` (the default) the next --set-size
training clips, drawn from the reference's distribution but not in it, with `--real val` the val
clips (whose colour-shape pairs follow the renderer's held-out split, so they differ from the
reference in content as well as in sample); `movq` (the real clips encoded and decoded frame by
frame by the demo's MoVQ, written with the shards' codec settings); `cascade` (with `--real
train`, the demo's pipeline sampled on the real clips' captions, as many videos as real clips,
through tools/evaluate_shapes.py; with `--real val`, the demo's own videos) and `noise` (uniform
random frames, the real clips' shape); then runs tools/evaluate_videos.py on each set against
`reference` with one feature cache.

The detectors are RANDOM-WEIGHT stand-ins (kvideo.metrics.stand_ins: the FID Inception's
architecture with random weights, its batch-norm statistics set from reference frames so its
features are well scaled, and a small random 3D network with the I3D's calling convention),
since no published weights can be downloaded here: the numbers are comparable only
with each other, never with a published FID or FVD. Writes OUT/ranking.json and prints a
markdown table with, per metric, whether the expected order holds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kvideo.data.video_io import read_video, write_video  # noqa: E402
from kvideo.metrics.stand_ins import RandomI3D, save_random_fid_inception  # noqa: E402

SETS = ("real", "movq", "cascade", "noise")  # the expected order, best first
METRICS = ("fid", "kid", "fvd")


def extract_clips(shards: Path, out: Path, limit: int, skip: int = 0) -> int:
    """The mp4 members `skip` .. `skip + limit` of the sorted tar shards of `shards`, as files in
    `out`, each with its caption in a .txt beside it."""
    out.mkdir(parents=True, exist_ok=True)
    n = seen = 0
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if n == limit:
                    return n
                if not member.name.endswith(".mp4"):
                    continue
                seen += 1
                if seen <= skip:
                    continue
                name = Path(member.name)
                (out / name.name).write_bytes(tar.extractfile(member).read())
                meta = json.loads(tar.extractfile(member.name[: -len(".mp4")] + ".json").read())
                (out / name.with_suffix(".txt").name).write_text(meta["caption"] + "\n")
                n += 1
    if n == 0:
        raise FileNotFoundError(f"no mp4 clips in the tar shards of '{shards}' after the first {skip}")
    return n


def sample_cascade(demo: Path, real: Path, out: Path) -> None:
    """The demo's pipeline sampled on the captions of the clips in `real` (one video each), by
    tools/evaluate_shapes.py, the videos copied into `out`."""
    from tools import evaluate_shapes

    captions = [p.read_text().strip() for p in sorted(real.glob("*.txt"))]
    prompts = out.parent / "cascade_prompts.txt"
    prompts.write_text("\n".join(captions) + "\n")
    run = out.parent / "cascade_run"
    code = evaluate_shapes.main(["--pipeline", str(demo / "pipeline.yaml"), "--prompts", str(prompts),
                                 "--save-videos", str(len(captions)), "--out", str(run)])
    if code not in (0, None):
        raise RuntimeError(f"tools/evaluate_shapes.py exited with {code}")
    out.mkdir(parents=True, exist_ok=True)
    for video in sorted((run / "videos").glob("*.mp4")):
        shutil.copy(video, out / video.name)


@torch.no_grad()
def reconstruct(real: Path, out: Path, movq_run: Path, codec: dict) -> None:
    """Every clip of `real` encoded and decoded frame by frame by the MoVQ of `movq_run`."""
    from kvideo.inference.autoencoder import load_movq

    movq = load_movq(movq_run)
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(real.glob("*.mp4")):
        frames, times = read_video(path)
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
        y = torch.cat([movq.decode(movq.encode(x[i:i + 16])).clamp(-1, 1) for i in range(0, len(x), 16)])
        video = ((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 24
        write_video(out / path.name, video, round(fps), **codec)


@torch.no_grad()
def calibrate_inception(path: Path, reference: Path, frames_per_video: int = 4) -> None:
    """Set the random Inception's batch-norm statistics from reference frames (a cumulative
    average over the batches, in train mode), so its features are well scaled: a random network
    with arbitrary statistics returns features near zero and FIDs of 1e-12. Still random weights."""
    from kvideo.metrics.inception import inception_features, load_fid_inception

    model = load_fid_inception(path)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # the cumulative average over every batch
        m.train()
    for video in sorted(reference.glob("*.mp4")):
        frames, _ = read_video(video)
        picks = np.linspace(0, len(frames) - 1, frames_per_video).round().astype(int)
        inception_features(model, torch.from_numpy(frames[picks]).permute(0, 3, 1, 2).contiguous())
    torch.save(model.state_dict(), path)


def noise(real: Path, out: Path, codec: dict, seed: int = 0) -> None:
    """Uniform random frames, one video per clip of `real`, of its shape."""
    out.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    for path in sorted(real.glob("*.mp4")):
        frames, _ = read_video(path)
        write_video(out / path.name, g.integers(0, 256, frames.shape, dtype=np.uint8), 24, **codec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True, type=Path, help="a finished tools/demo.py --out DIR")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--reference-clips", type=int, default=64)
    ap.add_argument("--real", choices=["train", "val"], default="train",
                    help="the real set: training clips after the reference's (default) or the val clips")
    ap.add_argument("--set-size", type=int, default=48, help="clips in the real set (--real train)")
    ap.add_argument("--clip-length", type=int, default=16, help="FVD clip length in frames")
    ap.add_argument("--frame-stride", type=int, default=4, help="FID / KID on every K-th frame")
    args = ap.parse_args(argv)
    demo, out = args.demo, args.out
    videos = demo / "samples" / "videos"
    for need in (demo / "data" / "train", demo / "data" / "val", demo / "runs" / "movq", videos):
        if not need.exists():
            print(f"error: '{need}' does not exist: --demo must be a finished tools/demo.py --out DIR", file=sys.stderr)
            return 2
    spec = json.loads((demo / "data" / "val" / "dataset.json").read_text())
    codec = {"crf": int(spec.get("crf", 18)), "pix_fmt": spec.get("pix_fmt", "yuv420p")}

    weights = out / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    save_random_fid_inception(weights / "random_inception.pth", seed=0)
    torch.manual_seed(0)
    torch.jit.script(RandomI3D(width=32, features=64, depth=3, size=64)).save(str(weights / "random_i3d.pt"))

    folders = {name: out / name for name in ("reference", *SETS)}
    if not any(folders["reference"].glob("*.mp4")):
        extract_clips(demo / "data" / "train", folders["reference"], args.reference_clips)
    calibrate_inception(weights / "random_inception.pth", folders["reference"])
    if not any(folders["real"].glob("*.mp4")):
        if args.real == "train":
            extract_clips(demo / "data" / "train", folders["real"], args.set_size, skip=args.reference_clips)
        else:
            extract_clips(demo / "data" / "val", folders["real"], 10 ** 9)
    if not any(folders["movq"].glob("*.mp4")):
        reconstruct(folders["real"], folders["movq"], demo / "runs" / "movq", codec)
    if not any(folders["noise"].glob("*.mp4")):
        noise(folders["real"], folders["noise"], codec)
    if not any(folders["cascade"].glob("*.mp4")):
        if args.real == "train":
            sample_cascade(demo, folders["real"], folders["cascade"])
        else:
            shutil.copytree(videos, folders["cascade"], dirs_exist_ok=True)

    from tools import evaluate_videos

    results = {}
    for name in SETS:
        code = evaluate_videos.main([
            "--generated", str(folders[name]), "--reference", str(folders["reference"]),
            "--out", str(out / "metrics" / name), "--features", str(out / "features"),
            "--inception", str(weights / "random_inception.pth"), "--i3d", str(weights / "random_i3d.pt"),
            "--metrics", ",".join(METRICS), "--clip-length", str(args.clip_length),
            "--frame-stride", str(args.frame_stride)])
        if code != 0:
            return code
        results[name] = json.loads((out / "metrics" / name / "metrics.json").read_text())

    table = {name: {m: results[name][m] for m in METRICS} for name in SETS}
    order = {m: all(table[a][m] < table[b][m] for a, b in zip(SETS, SETS[1:])) for m in METRICS}
    counts = {name: results[name]["settings"]["videos"] for name in SETS}
    summary = {"detectors": "random-init stand-ins (kvideo.metrics.stand_ins; Inception batch norms set from the "
                            "reference frames), not the published weights",
               "reference_videos": results["real"]["settings"].get("reference_videos"),
               "real": "training clips after the reference's" if args.real == "train" else "the val clips",
               "videos": counts, "metrics": table, "expected_order": list(SETS), "order_holds": order}
    (out / "ranking.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nagainst {summary['reference_videos']} training clips; detectors RANDOM-INIT\n")
    print("| set | videos | " + " | ".join(METRICS) + " |\n|---|---|" + "---|" * len(METRICS))
    for name in SETS:
        print(f"| {name} | {counts[name]} | " + " | ".join(f"{table[name][m]:.4g}" for m in METRICS) + " |")
    print("\norder real < movq < cascade < noise holds: " + ", ".join(f"{m} {'yes' if ok else 'NO'}" for m, ok in order.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
