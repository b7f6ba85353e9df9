"""`make demo`: render ShapesWorld, train the cascade's stages, write videos you can look at.

    python tools/demo.py [--out out/demo] [--train-clips 2000] [key=value ...]

Today the cascade has its first stage: the demo trains the MoVQ autoencoder on ShapesWorld
(`configs/movq/shapes.yaml`), then writes, for held-out clips, mp4s with the original on the
left and the reconstruction on the right, a PNG contact sheet, and the held-out PSNR. Re-running
reuses what is finished: the rendered data and the trained stage (train.py resumes).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def render(out: Path, num_clips: int, split: str) -> None:
    from kvideo.data.shapesworld import write_shapesworld

    if (out / "dataset.json").is_file():
        print(f"reusing ShapesWorld {split} split in {out}")
        return
    print(f"rendering {num_clips} ShapesWorld clips ({split}) into {out}")
    write_shapesworld(out, num_clips, size=64, seed=0, split=split, workers=2)


@torch.no_grad()
def reconstructions(run_dir: Path, val: Path, out: Path, num_clips: int = 8) -> float:
    """Write original|reconstruction mp4s and a contact sheet; return the mean PSNR (dB)."""
    from einops import rearrange
    from torchvision.utils import save_image

    from kvideo.data.shards import ClipDataset, ShardIndex
    from kvideo.data.video_io import write_video
    from kvideo.stages.movq import load_movq, psnr

    ae = load_movq(run_dir)
    index = ShardIndex(str(val), key="val")
    meta = index.metadata(0)
    data = ClipDataset(index, num_frames=int(meta["num_frames"]), fps=float(meta["fps"]), size=[64, 64], seed=0,
                       train=False)
    out.mkdir(parents=True, exist_ok=True)
    scores, sheet = [], []
    for i in range(min(num_clips, len(data))):
        sample = data[(0, i)]
        x = rearrange(sample["video"], "c f h w -> f c h w")
        recon = ae.decode(ae.encode(x)).clamp(-1, 1)
        scores.append(float(psnr(recon, x).mean()))
        both = torch.cat([x, recon], dim=-1)  # (f, c, h, 2w): original | reconstruction
        frames = ((rearrange(both, "f c h w -> f h w c") + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        name = index.keys[i]
        write_video(out / f"{name}.mp4", frames.numpy(), fps=float(meta["fps"]))
        (out / f"{name}.txt").write_text(sample["caption"] + "\n")
        sheet.append(both[:: max(1, len(both) // 4)][:4])
    save_image((torch.cat(sheet) + 1) / 2, out / "contact_sheet.png", nrow=4)
    return float(np.mean(scores))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--train-clips", type=int, default=2000)
    ap.add_argument("overrides", nargs="*", help="key=value overrides for the MoVQ training run")
    args = ap.parse_args()
    out = Path(args.out)

    render(out / "data" / "train", args.train_clips, "train")
    render(out / "data" / "val", 16, "val")

    run_dir = out / "runs" / "movq"
    cmd = [sys.executable, str(ROOT / "train.py"), str(ROOT / "configs" / "movq" / "shapes.yaml"),
           f"run_dir={run_dir}", f"data.shards={out / 'data' / 'train'}", f"data.val_shards={out / 'data' / 'val'}",
           *args.overrides]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)

    rec_dir = out / "movq_reconstructions"
    mean_psnr = reconstructions(run_dir, out / "data" / "val", rec_dir)
    print(f"\nMoVQ reconstructions of held-out ShapesWorld clips (left: original, right: reconstruction):")
    print(f"  videos:        {rec_dir}/*.mp4 (caption beside each as .txt)")
    print(f"  contact sheet: {rec_dir / 'contact_sheet.png'}")
    print(f"  training previews: {run_dir / 'previews'}")
    print(f"  held-out PSNR through the continuous latent: {mean_psnr:.2f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
