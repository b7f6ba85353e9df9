"""A LoRA keyframe run (recipe.lora) -> its adapter apart, and / or merged into its base.

    python tools/merge_lora.py --checkpoint LORA_RUN [--which ema|model] [--lora-out lora.safetensors]
        [--merged-out MERGED_RUN]

--lora-out writes the adapter weights alone as safetensors (the rank, alpha, targets and the base
checkpoint in the metadata): a pipeline loads base + adapter with `keyframe: BASE` and
`keyframe_lora: lora.safetensors`. --merged-out folds the adapter into the base weights
(W + alpha / rank B A) and writes a plain keyframe checkpoint (recipe.lora off) that loads
anywhere a keyframe checkpoint does. Both can be given; at least one must be.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="the LoRA run (run dir, checkpoint dir or weights file)")
    ap.add_argument("--which", default="ema", choices=["ema", "model"])
    ap.add_argument("--lora-out", type=Path)
    ap.add_argument("--merged-out", type=Path)
    args = ap.parse_args(argv)
    if args.lora_out is None and args.merged_out is None:
        print("error: give --lora-out FILE and / or --merged-out RUN_DIR", file=sys.stderr)
        return 2
    from kvideo.inference.loading import load_bundle
    from kvideo.inference.lora import LoraSpec, merge_lora, save_lora
    from kvideo.train.checkpoint import save_checkpoint

    try:
        bundle = load_bundle(args.checkpoint, "keyframe", args.which)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lora = bundle.cfg.recipe.lora
    if not lora.enabled:
        print(f"error: '{args.checkpoint}' is not a LoRA run (recipe.lora.enabled is false)", file=sys.stderr)
        return 2
    spec = LoraSpec.from_config(lora)
    unet = bundle.denoiser.unet
    if args.lora_out:
        save_lora(unet, spec, args.lora_out, base=str(lora.base))
        print(f"wrote {args.lora_out} (adapter of rank {spec.rank} on {', '.join(spec.targets)})")
    if args.merged_out:
        merge_lora(unet)
        config = OmegaConf.to_container(bundle.cfg, resolve=True)
        config["recipe"]["lora"]["enabled"] = False
        config["run_dir"] = str(args.merged_out)
        state = {k: v.contiguous() for k, v in bundle.denoiser.state_dict().items()}
        path = save_checkpoint(args.merged_out, 0, state, state, {"merged_from": str(args.checkpoint)}, config)
        print(f"wrote {path} (the adapter merged into {lora.base})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
