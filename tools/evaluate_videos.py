"""The field's video metrics over a folder of generated videos: FID, KID, FVD, CLIPSIM, CLIP-Temp,
flow score, warping error (docs/EVALUATION.md says what each is and where its weights come from).

    python tools/evaluate_videos.py --generated DIR [--reference DIR] [--prompts FILE] --out DIR
        [--inception FILE] [--i3d FILE] [--clip ARCH:FILE] [--raft FILE]
        [--metrics fid,kid,fvd,clipsim,clip_temp,flow,warp] [--clip-length 16]
        [--clip-mode first|strided] [--frame-stride K] [--device cpu|cuda]

Videos are every .mp4 (.webm, .mkv, .mov, .avi) of a folder, in sorted order, read with PyAV.
Prompts (for CLIPSIM) are the lines of --prompts, one per generated video in sorted order, or
the JSON sample.py writes beside each video. FID, KID and FVD compare against --reference.
Default --metrics: every metric whose weights are given. Nothing is downloaded: a metric whose
weights file is missing is an error naming the flag.

Writes OUT/metrics.json (the numbers at the top level: fid, kid, fvd, clipsim, clip_temp,
flow_score, warping_error; `settings`: folders, video and frame counts, clip length and mode,
each weights file and its sha256; `per_video`; `skipped`), OUT/report.md with OUT/per_video.png
(a histogram of each per-video metric over the videos), and keeps every
video's features in OUT/features/ so that a second run computes only what is new.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from kvideo.metrics.fvd import CLIP_LENGTH, CLIP_MODES  # noqa: E402
from kvideo.metrics.suite import (  # noqa: E402
    METRICS, NEEDS, WITH_REFERENCE, Detectors, FeatureCache, compute_metrics, folder_features, list_videos,
    read_prompts,
)

PREPROCESSING = {
    "inception": "pytorch-fid: RGB in [0, 1], bilinear resize to 299x299 (align_corners=False), x2-1; "
                 "2048-d final pool; every frame",
    "i3d": "StyleGAN-V: uint8 (b, 3, t, h, w), detector(rescale=True, resize=True, return_features=True)",
    "clip": "open_clip's evaluation transform on PIL frames; unit-norm embeddings; every frame",
    "raft": "torchvision RAFT, 12 iterations, frames in [-1, 1] (upscaled to 128 px when smaller, "
            "padded to multiples of 8); consecutive pairs",
}


def add_metric_flags(ap: argparse.ArgumentParser) -> None:
    """The weights, metric and clip flags (tools/evaluate_shapes.py takes them too)."""
    ap.add_argument("--inception", type=Path, help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    ap.add_argument("--i3d", type=Path, help="StyleGAN-V's i3d_torchscript.pt")
    ap.add_argument("--clip", help="ARCH:FILE, an open_clip architecture and its weights (ViT-B-32:FILE)")
    ap.add_argument("--raft", type=Path, help="torchvision's raft_large_C_T_SKHT_V2-ff5fadd5.pth")
    ap.add_argument("--metrics", help=f"comma-separated subset of {','.join(METRICS)}")
    ap.add_argument("--clip-length", type=int, default=CLIP_LENGTH, help="FVD clip length in frames")
    ap.add_argument("--clip-mode", choices=CLIP_MODES, default="first",
                    help="FVD clips: the first frames (StyleGAN-V) or frames spread over the video")
    ap.add_argument("--frame-stride", type=int, default=1,
                    help="FID / KID / CLIPSIM / CLIP-Temp on every K-th frame (default 1: every frame)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--features", type=Path, help="the per-video feature cache (default: OUT/features)")


def metric_flags(args) -> list:
    """The metric flags of parsed `args` as a command line again (run_ablations hands them on)."""
    out = []
    for name in ("inception", "i3d", "clip", "raft", "metrics", "reference", "features"):
        if getattr(args, name, None):
            out += [f"--{name}", str(getattr(args, name))]
    return out + ["--clip-length", str(args.clip_length), "--clip-mode", args.clip_mode, "--device", args.device,
                  "--frame-stride", str(args.frame_stride)]


def wants_metrics(args) -> bool:
    return any(getattr(args, name) for name in ("inception", "i3d", "clip", "raft", "metrics"))


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generated", required=True, type=Path)
    ap.add_argument("--reference", type=Path)
    ap.add_argument("--prompts", type=Path)
    ap.add_argument("--out", required=True, type=Path)
    add_metric_flags(ap)
    return ap.parse_args(argv)


def build(args):
    """(Detectors, metrics) from the flags; a ValueError names what is missing or wrong."""
    clip = None
    if args.clip:
        arch, sep, path = args.clip.partition(":")
        if not sep or not arch or not path:
            raise ValueError(f"--clip must be ARCH:FILE (e.g. ViT-B-32:open_clip_vit_b_32.bin); got {args.clip!r}")
        clip = (arch, Path(path))
    detectors = Detectors(args.inception, args.i3d, clip, args.raft, args.device)
    if args.metrics:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"--metrics: unknown {unknown[0]!r}; choose from {', '.join(METRICS)}")
    else:
        metrics = [m for m in METRICS if getattr(detectors, NEEDS[m]) is not None]
        if args.reference is None:
            metrics = [m for m in metrics if m not in WITH_REFERENCE]
        if not metrics:
            raise ValueError("no metric to compute: give at least one weights file "
                             "(--inception, --i3d, --clip ARCH:FILE, --raft) or --metrics")
    for m in metrics:
        detectors.describe(NEEDS[m])  # every weights file exists before any video is read
    if any(m in WITH_REFERENCE for m in metrics) and args.reference is None:
        raise ValueError(f"{', '.join(m for m in metrics if m in WITH_REFERENCE)} need --reference DIR")
    return detectors, metrics


def report_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# Video metrics: {s['generated']}", "",
             f"{s['videos']} generated videos" + (f" against {s['reference_videos']} reference videos ({s['reference']})"
                                                  if s.get("reference") else ""), "",
             "| metric | value |", "|---|---|"]
    for key in ("fid", "kid", "fvd", "clipsim", "clip_temp", "flow_score", "warping_error"):
        if key in result:
            lines.append(f"| {key} | {result[key]:.6g} |")
    lines += ["", "Weights:", ""] + [f"- {name}: `{w['file']}` (sha256 {w['sha256'][:16]}...)"
                                     for name, w in s["weights"].items()]
    if result["skipped"]:
        lines += ["", f"Skipped ({len(result['skipped'])}):", ""] + [
            f"- {x['video']}: {x.get('metric', 'all metrics')}: {x['reason']}" for x in result["skipped"]]
    return "\n".join(lines) + "\n"


def run(args) -> dict:
    """metrics.json's content for args.generated (against args.reference); features cached in
    args.out / "features". ValueError / FileNotFoundError name a bad flag or file."""
    detectors, metrics = build(args)
    prompts = read_prompts(list_videos(args.generated), args.prompts) if "clipsim" in metrics else None
    kinds = sorted({NEEDS[m] for m in metrics})
    cache = FeatureCache(args.features or args.out / "features")
    generated = folder_features(args.generated, kinds, detectors, cache, args.clip_length, args.clip_mode,
                                args.frame_stride)
    reference = None
    ref_kinds = [k for k in kinds if any(NEEDS[m] == k for m in metrics if m in WITH_REFERENCE)]
    if ref_kinds:
        reference = folder_features(args.reference, ref_kinds, detectors, cache, args.clip_length, args.clip_mode,
                                    args.frame_stride)
    numbers, per_video = compute_metrics(generated, reference, metrics, detectors, prompts)
    settings = {
        "generated": str(args.generated), "videos": len(generated.videos),
        "reference": str(args.reference) if reference else None,
        "reference_videos": len(reference.videos) if reference else 0,
        "metrics": metrics, "clip_length": args.clip_length, "clip_mode": args.clip_mode,
        "frame_stride": args.frame_stride,
        "weights": {k: detectors.describe(k) for k in kinds},
        "preprocessing": {k: PREPROCESSING[k] for k in kinds},
        "conventions": {"fid": "pytorch-fid (covariance / (N - 1))", "fvd": "StyleGAN-V (covariance / N)",
                        "clipsim": "cosine (papers often print x100)"},
    }
    return {**numbers, "settings": settings, "per_video": per_video,
            "skipped": generated.skipped + (reference.skipped if reference else [])}


def histograms(per_video: dict, path: Path, bins: int = 20) -> bool:
    """A PNG with one histogram per per-video metric (CLIPSIM, CLIP-Temp, flow score, warping
    error) over the videos; False when there is nothing per video to plot."""
    from PIL import Image, ImageDraw

    keys = [k for k in ("clipsim", "clip_temp", "flow_score", "warping_error")
            if any(k in v for v in per_video.values())]
    if not keys:
        return False
    width, height, pad = 360, 170, 30
    img = Image.new("RGB", (width * len(keys), height), "white")
    draw = ImageDraw.Draw(img)
    for i, key in enumerate(keys):
        values = np.array([v[key] for v in per_video.values() if key in v])
        counts, edges = np.histogram(values, bins=bins)
        x0, span, top = i * width + pad, width - 2 * pad, max(1, counts.max())
        draw.text((x0, 6), f"{key}: mean {values.mean():.4g}, n={len(values)}", fill="black")
        for j, c in enumerate(counts):
            left = x0 + j * span / bins
            draw.rectangle([left, height - pad - c / top * (height - 3 * pad), left + span / bins - 1, height - pad],
                           fill=(60, 110, 200))
        draw.text((x0, height - pad + 4), f"{edges[0]:.3g}", fill="black")
        draw.text((x0 + span - 30, height - pad + 4), f"{edges[-1]:.3g}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    report = report_markdown(result)
    if histograms(result["per_video"], args.out / "per_video.png"):
        report += "\n![per-video values](per_video.png)\n"
    (args.out / "report.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
