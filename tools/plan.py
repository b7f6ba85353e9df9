"""Memory per GPU and FLOPs of one training step of a config, per parallelism, before renting a GPU.

    python tools/plan.py CONFIG.yaml [MORE.yaml ...] [key=value ...] --gpus N --gpu-mem-gb M [--json]

Traces one step of the stage's trained model on fake tensors (no memory, no weights files: the
full-size configs plan on a laptop in one to three minutes) and prints, for ddp, fsdp and hsdp,
each with and without activation checkpointing, the GiB per GPU of the weights, gradients,
AdamW's moments, the EMA and the activations at the config's train.batch_size, whether that fits
in M GiB, the largest per-GPU batch that fits, and the FLOPs of the step with the time it takes at
a given model FLOPs utilisation. How it counts: kvideo/train/plan.py; the full-size table:
docs/SCALING.md.

Options:
  --gpus N              GPUs of the run (ddp replicates over them, fsdp shards over them)
  --gpu-mem-gb M        memory of one GPU, GiB
  --gpus-per-node K     hsdp's shard group when train.fsdp.shard_size is 0 (default 8)
  --movq-size NAME      the MoVQ a latent stage encodes with when recipe.movq's checkpoint is not
                        here (default kandinsky: the released MoVQ, f = 8)
  --peak-tflops P       the GPU's dense bf16 peak, for the step time (default 989: H100 SXM)
  --mfu U               model FLOPs utilisation assumed for the step time (default 0.4)
  --json                {"strategies": [{"strategy", "checkpointing", "per_gpu_gb": {"params",
                        "grads", "optimizer", "ema", "activations", "total"}, "fits", "max_batch",
                        ...}], "step_flops", ...}
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Tuple

from kvideo.config import ConfigError
from kvideo.models.movq import MovqConfig, movq_config
from kvideo.registry import load_config

PARTS = ("params", "grads", "optimizer", "ema", "activations", "total")


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage=__doc__.split("\n\n")[1].strip())
    ap.add_argument("args", nargs="+", help="config files, then key=value overrides")
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--gpu-mem-gb", type=float, required=True)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--movq-size", default="kandinsky")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--mfu", type=float, default=0.4)
    ap.add_argument("--json", action="store_true")
    return ap.parse_args(argv)


def report(plan: dict, movq_source: str) -> str:
    """The plan as text: a markdown table of the strategies and a line on the step's FLOPs."""
    gb, millions = plan["gpu_mem_gb"], {k: plan[f"{k}_params"] / 1e6 for k in ("trainable", "frozen", "held")}
    lines = [
        f"{plan['stage']}: {plan['model']}, train.batch_size {plan['batch_size']} per GPU, {plan['precision']}, "
        f"{plan['gpus']} GPUs x {gb:g} GiB ({plan['gpus_per_node']} a node)",
        f"parameters: {millions['trainable']:.1f}M trained, {millions['frozen']:.1f}M frozen in the model, "
        f"{millions['held']:.1f}M in frozen networks beside it" + (f"; MoVQ: {movq_source}" if movq_source else ""),
        "",
        "| strategy | checkpointing | " + " | ".join(PARTS) + f" (GiB) | fits {gb:g} | max batch |",
        "|---|---|" + "---:|" * len(PARTS) + "---|---:|",
    ]
    for row in plan["strategies"]:
        name = row["strategy"] + (f" ({row['shard_degree']})" if row["strategy"] != "ddp" else "")
        cells = " | ".join(f"{row['per_gpu_gb'][k]:.1f}" for k in PARTS)
        lines.append(f"| {name} | {'yes' if row['checkpointing'] else 'no'} | {cells} | "
                     f"{'yes' if row['fits'] else 'no'} | {row['max_batch']} |")
    t, tera = plan["step_time_s"], {k: plan[k] / 1e12 for k in ("step_flops", "step_flops_per_sample", "recompute_flops")}
    lines += ["", f"step: {tera['step_flops']:.1f} TFLOP forward + backward ({tera['step_flops_per_sample']:.1f} a sample), "
                  f"{t['at_mfu']:.3f} s at {t['mfu']:.0%} of {t['peak_tflops']:g} TFLOP/s; checkpointing recomputes "
                  f"{tera['recompute_flops']:.1f} TFLOP more ({t['with_recompute']:.3f} s)"]
    return "\n".join(lines)


def stage_movq(cfg, size: str = "kandinsky") -> Tuple[MovqConfig, str]:
    """The architecture of the MoVQ a latent stage works in, and where it came from: the config of
    the checkpoint `recipe.movq` names when it is here (its weights are not read), else the named
    MoVQ size `size` (the released MoVQ: f = 8, 4 latent channels)."""
    from kvideo.inference.checkpoints import read_config, resolve_checkpoint
    from kvideo.registry import model_config

    try:
        stored = load_config(base=read_config(resolve_checkpoint(cfg.recipe.movq)), require_complete=False)
        return model_config(stored), f"the config of recipe.movq '{cfg.recipe.movq}'"
    except (FileNotFoundError, ValueError):
        return movq_config(size), f"MoVQ size '{size}' (recipe.movq '{cfg.recipe.movq}' is not here)"


def main(argv) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    opts = parse(argv)
    from kvideo.inference.loading import DIFFUSION_STAGES
    from kvideo.train.plan import Cluster, measure, plan_cluster

    try:
        cfg = load_config([a for a in opts.args if "=" not in a], [a for a in opts.args if "=" in a],
                          require_complete=False)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if cfg.data.buckets:
        print("data.buckets is set: this plans data.size, data.num_frames and train.batch_size; override them "
              "to plan a bucket", file=sys.stderr)
    movq, source = stage_movq(cfg, opts.movq_size) if cfg.stage in DIFFUSION_STAGES else (None, "")
    plan = plan_cluster(measure(cfg, movq), cfg, Cluster(opts.gpus, opts.gpu_mem_gb, opts.gpus_per_node))
    peak = opts.peak_tflops * 1e12 * opts.mfu
    plan["step_time_s"] = {"at_mfu": plan["step_flops"] / peak,
                           "with_recompute": (plan["step_flops"] + plan["recompute_flops"]) / peak,
                           "mfu": opts.mfu, "peak_tflops": opts.peak_tflops}
    plan["movq"] = source or None
    print(json.dumps(plan, indent=2) if opts.json else report(plan, source))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
