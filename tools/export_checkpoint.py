"""A checkpoint (sharded or whole) -> plain safetensors weights in a checkpoint directory.

    python tools/export_checkpoint.py CHECKPOINT --out DIR

CHECKPOINT is a checkpoint directory or a run directory (its newest checkpoint). DIR gets
model.safetensors and ema.safetensors (whole tensors, the run config in their metadata),
config.yaml and manifest.json: what `sample.py`, `recipe.init_from` and every tool read, on any
machine, without torch.distributed. The optimizer states are not exported (a run resumes from
the sharded checkpoint itself, on any number of ranks).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint directory or a run directory (its newest checkpoint)")
    ap.add_argument("--out", required=True, type=Path, help="the directory to write (must not hold a checkpoint)")
    args = ap.parse_args(argv)
    from kvideo.config import to_yaml
    from kvideo.inference.checkpoints import load_weights, resolve_checkpoint
    from kvideo.train.checkpoint import save_weights, write_manifest

    try:
        source = resolve_checkpoint(args.checkpoint)
        model, config = load_weights(source, "model")
        ema, _ = load_weights(source, "ema")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if (args.out / "model.safetensors").exists():
        print(f"error: '{args.out}' already holds a checkpoint; choose another --out", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    save_weights(args.out / "model.safetensors", model, config, "model")
    save_weights(args.out / "ema.safetensors", ema, config, "ema")
    (args.out / "config.yaml").write_text(to_yaml(config))
    write_manifest(args.out)
    print(f"{source} -> {args.out} ({len(model)} tensors, {sum(v.numel() for v in model.values()) / 1e6:.2f}M values)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
