"""MoVQ on ShapesWorld: train `configs/movq/shapes.yaml` on this machine and measure held-out
reconstruction (PSNR through the continuous latent, as the diffusion stages use it, and through
the codebook) and codebook usage.

    python benchmarks/movq_shapes.py [--data data/shapes] [--run-dir runs/bench_movq] [--skip-train]
        [--latent-noise 0.1,0.2,0.3] [--latent-lowpass] [key=value ...]

Renders the ShapesWorld train (2000 clips) and val (64 clips, a disjoint seed stream) splits
when missing, runs `train.py` as a user would (wall time measured around it), then scores
every frame of the val clips with the EMA weights, and runs the ShapesWorld scorer on every
reconstructed clip (does the autoencoder keep what a prompt asks for?). Writes
RUN_DIR/benchmark.json and prints a markdown row for docs/BENCHMARKS.md. `--skip-train` only
scores the newest checkpoint of an existing run; `--latent-noise 0.1,0.2,0.3` also scores clips
decoded from noisy latents (the decoder's tolerance to a diffusion model's latent error);
`--latent-lowpass` scores clips decoded from low-passed latents (a 3x3 box blur, and a 2x
downsampling upsampled back): does a shape survive in the latent's coarse frequencies, the ones a
diffusion model draws first? Shape accuracy is also given per asked shape.
Resumes an interrupted run (train.py's resume=auto), in which case the reported training time
covers only the last invocation.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def render_if_missing(out: Path, num_clips: int, seed: int, split: str) -> None:
    from kvideo.data.shapesworld import ShapesWorldSpec, write_shapesworld

    if (out / "dataset.json").is_file():
        return
    write_shapesworld(out, ShapesWorldSpec(num_clips, size=64, seed=seed, split=split), workers=2)


@torch.no_grad()
def lowpass(z: torch.Tensor, kind: str) -> torch.Tensor:
    """z (n, c, h, w) low-passed: `box3`, the mean of each 3x3 neighbourhood (edges replicated);
    `down2up2`, downsampled 2x (kvideo.models.movq.downsample) and bilinearly upsampled back."""
    import torch.nn.functional as F

    from kvideo.models.movq import downsample

    if kind == "box3":
        return F.avg_pool2d(F.pad(z, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return F.interpolate(downsample(z, 2), size=z.shape[-2:], mode="bilinear", align_corners=False)


LOWPASS = ("box3", "down2up2")


def score(ckpt_dir: Path, val: Path, batch_size: int = 64, latent_noise: tuple = (), latent_lowpass: bool = False) -> dict:
    """PSNR (continuous and quantised latent) and codebook usage on every frame of `val`, and the
    ShapesWorld scorer on the reconstructions; for each `latent_noise` level s, the scorer again on
    clips decoded from latents with Gaussian noise of s times the latents' std added (how much
    error in a diffusion model's latents the decoder tolerates before shapes break); with
    `latent_lowpass`, on clips decoded from each `LOWPASS` filter of their latents."""
    from kvideo.data.shapes_scorer import aggregate_scores, score_clip
    from kvideo.data.shards import ClipDataset, ClipFormat, ShardIndex, collate
    from kvideo.inference.autoencoder import load_movq
    from kvideo.metrics.reconstruction import evaluate_reconstruction, frames_of

    ae = load_movq(ckpt_dir)
    index = ShardIndex(str(val), key="val")
    frames = int(index.metadata(0)["num_frames"])
    data = ClipDataset(index, ClipFormat(frames, float(index.metadata(0)["fps"]), (64, 64)), seed=0, train=False)
    batches = [collate([data[(0, i)]]) for i in range(len(data))]  # one clip (all its frames) per batch
    result = evaluate_reconstruction(ae, batches, torch.device("cpu"))
    used = torch.zeros(ae.cfg.n_embed, dtype=torch.bool)
    for batch in batches:
        x = frames_of(batch)
        for part in x.split(batch_size):
            _, _, info = ae.quantize(ae.encode(part))
            used[info["indices"].unique()] = True
    result["codes_used_on_val"] = int(used.sum())
    result["codebook_size"] = ae.cfg.n_embed
    # Do reconstructions keep what a prompt asks for? The ShapesWorld scorer on each decoded clip.
    latents = [torch.cat([ae.encode(part) for part in frames_of(batch).split(batch_size)]) for batch in batches]

    def scorer_on(clip_latents: list) -> dict:
        scored = []
        for batch, z in zip(batches, clip_latents):
            recon = torch.cat([ae.decode(part).clamp(-1, 1) for part in z.split(batch_size)])
            video = ((recon.permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8).numpy()  # (f, h, w, 3)
            scored.append(score_clip(video, float(batch["meta"][0]["fps"]), batch["caption"][0]))
        agg = aggregate_scores(scored)
        by_shape = {}
        for s in scored:
            by_shape.setdefault(s["target"]["shape"], []).append(s["correct"]["shape"])
        return {**{k: agg[k] for k in ("n", "accuracy", "all_correct", "mean_area_cv")},
                "shape_by_target": {k: sum(v) / len(v) for k, v in sorted(by_shape.items())}}

    result["scorer_on_reconstructions"] = scorer_on(latents)
    if latent_noise:
        std = float(torch.cat(latents).std())
        generator = torch.Generator().manual_seed(0)
        result["latent_std"] = std
        result["scorer_on_noisy_latents"] = {
            str(level): scorer_on([z + level * std * torch.randn(z.shape, generator=generator) for z in latents])
            for level in latent_noise}
    if latent_lowpass:
        result["scorer_on_lowpassed_latents"] = {kind: scorer_on([lowpass(z, kind) for z in latents]) for kind in LOWPASS}
    return result


def _previous(run_dir: Path) -> dict:
    path = run_dir / "benchmark.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/shapes")
    ap.add_argument("--run-dir", default="runs/bench_movq")
    ap.add_argument("--config", default="configs/movq/shapes.yaml")
    ap.add_argument("--skip-train", action="store_true", help="only score the newest checkpoint of --run-dir")
    ap.add_argument("--latent-noise", type=lambda v: tuple(float(x) for x in v.split(",")), default=(),
                    help="comma-separated levels: also score clips decoded from latents with this much "
                         "Gaussian noise (x the latents' std)")
    ap.add_argument("--latent-lowpass", action="store_true",
                    help="also score clips decoded from low-passed latents (3x3 box blur; 2x down and up)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for train.py")
    args = ap.parse_args()

    data, run_dir = Path(args.data), Path(args.run_dir)
    t0 = time.perf_counter()
    render_if_missing(data / "train", 2000, 0, "train")
    render_if_missing(data / "val", 64, 0, "val")
    render_s = time.perf_counter() - t0

    cmd = [sys.executable, str(ROOT / "train.py"), args.config, f"run_dir={run_dir}",
           f"data.shards={data / 'train'}", f"data.val_shards={data / 'val'}", *args.overrides]
    t0 = time.perf_counter()
    if not args.skip_train:
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    train_s = time.perf_counter() - t0

    from kvideo.inference.checkpoints import latest_checkpoint
    from kvideo.train.checkpoint import load_train_state

    last = latest_checkpoint(run_dir)
    result = score(last, data / "val", latent_noise=args.latent_noise, latent_lowpass=args.latent_lowpass)
    metrics = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    usage = [m for m in metrics if "codebook/used_fraction" in m]
    result.update({
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": " ".join(sys.argv),
        "checkpoint": str(last),
        "steps": load_train_state(last)["step"],
        "train_wall_s": None if args.skip_train else round(train_s, 1),
        "render_wall_s": round(render_s, 1),
        "train_codebook_used_fraction": usage[-1]["codebook/used_fraction"] if usage else None,
        "train_codebook_perplexity": usage[-1]["codebook/perplexity"] if usage else None,
    })
    if args.skip_train:  # keep the training time measured by the run that trained it
        result["train_wall_s"] = _previous(run_dir).get("train_wall_s")
    (run_dir / "benchmark.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    minutes = f"{result['train_wall_s'] / 60:.1f} min" if result["train_wall_s"] else "not timed"
    print(f"| {result['date']} | {result['steps']} | {minutes} | {result['psnr']:.2f} dB | "
          f"{result['psnr_quantized']:.2f} dB | {result['codes_used_on_val']}/{result['codebook_size']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
