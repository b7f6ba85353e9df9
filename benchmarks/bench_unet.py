"""Training-step throughput of the keyframe UNet against diffusers' UNet3DConditionModel, and of
every stage's training step.

    python benchmarks/bench_unet.py [--batch 2] [--frames 8] [--latent 32] [--steps 6]
        [--precision bf16|fp32] [--stages all|movq,t2i,...] [--stage-precision bf16|fp32]
        [--variant NAME:KEY=VALUE[;KEY=VALUE] ...] [--forward-only] [--json FILE]

`--stages` adds a table of each ShapesWorld stage's own training step as train.py runs it
(benchmarks/stage_steps.py: the stage's config, its batch size and precision, synthetic batches),
timed interleaved like the two UNets, with the fraction of the fp32 and the bf16 matmul peak.
Each `--variant` times every stage again with config overrides (`movq/KEY=VALUE` changes the MoVQ
and so the latents' shape), interleaved with the configured step, so their ratio is one run's;
`--variant 'compile:train.compile=true'` measures torch.compile (kvideo.models.blocks), compiled
in the warm-up steps. `--forward-only` times the stages' forward without gradients instead (what
a sampling step runs; the pipeline's `compile` key compiles the same blocks).

Both networks are built in the same layout (three levels, channels w/2w/4w, cross-attention on
the lower two) at a matched parameter count (diffusers' width is searched; the run stops unless
it comes within 10% of ours), take the same input (b, 9, f, h, w) with a (b, 77, context_dim) text
context, and run the same training step: forward, MSE against a fixed target, backward, AdamW.
Steps alternate between the two models (A, B, A, B, ...) in one process, so machine noise hits
both alike; the report gives samples/s of each and their ratio, the FLOPs of one step
(torch.utils.flop_counter, forward + backward), the achieved GFLOP/s, the fraction of this
machine's fp32 matmul peak (measured in the same run), and the peak resident memory of a step.

The keyframe UNet is `kvideo.models.video_unet.VideoUNet` at the `bench` width below: the
Kandinsky 3 layout at 1/3 of the released width (128/256/512 channels) with every temporal layer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from datetime import date

import torch
import torch.nn.functional as F

CONTEXT_DIM = 512
TOKENS = 77
DIM_MULT = (1, 2, 4)  # both models: three levels,
CROSS_ATTENTION = (False, True, True)  # attention on the lower two
MAX_PARAM_MISMATCH = 0.10


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """Best GFLOP/s of an n x n x n matmul in `dtype` on this machine."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def build_ours():
    from kvideo.models.video_unet import VideoUNet, video_unet_config

    cfg = video_unet_config("kandinsky", model_channels=128, init_channels=64, time_embed_dim=512,
                            context_dim=CONTEXT_DIM, dim_mult=list(DIM_MULT), num_blocks=[2, 2, 2],
                            add_cross_attention=list(CROSS_ATTENTION), add_self_attention=list(CROSS_ATTENTION))
    return VideoUNet(cfg)


def diffusers_unet(width: int, in_channels: int, cross_attention, meta: bool = False):
    """diffusers' UNet3D in our layout: one block per level of ours, channels (w, 2w, 4w, ...)
    following our dim_mult, cross-attention blocks exactly where ours has cross-attention."""
    from diffusers import UNet3DConditionModel

    down = tuple("CrossAttnDownBlock3D" if a else "DownBlock3D" for a in cross_attention)
    up = tuple("CrossAttnUpBlock3D" if a else "UpBlock3D" for a in reversed(cross_attention))
    ctx = torch.device("meta") if meta else nullcontext()
    with ctx:
        return UNet3DConditionModel(
            in_channels=in_channels, out_channels=4, block_out_channels=tuple(width * m for m in DIM_MULT),
            down_block_types=down, up_block_types=up, layers_per_block=2, cross_attention_dim=CONTEXT_DIM,
            attention_head_dim=64, norm_num_groups=32)


def matched_diffusers(target_params: int, in_channels: int):
    """The diffusers UNet3D (our layout) whose width, a multiple of 32 (its group norms), gives the
    parameter count nearest the target; (model, width, relative parameter difference)."""
    best = None
    for width in range(32, 513, 32):
        n = sum(p.numel() for p in diffusers_unet(width, in_channels, CROSS_ATTENTION, meta=True).parameters())
        if best is None or abs(n - target_params) < abs(best[1] - target_params):
            best = (width, n)
    return diffusers_unet(best[0], in_channels, CROSS_ATTENTION), best[0], best[1] / target_params - 1


def peak_rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set size (VmHWM)
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Runner:
    """One model's training step on fixed inputs."""

    def __init__(self, name, model, call, inputs, precision):
        self.name, self.model, self.call, self.inputs = name, model.train(), call, inputs
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
        self.times, self.peak_mb = [], None
        self.params = sum(p.numel() for p in model.parameters())

    def step(self) -> float:
        t0 = time.perf_counter()
        with self.autocast:
            out = self.call(self.model, *self.inputs)
        loss = F.mse_loss(out.float(), self.inputs[0][:, :4].float())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def flops(self) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter, self.autocast:
            out = self.call(self.model, *self.inputs)
        with counter:
            F.mse_loss(out.float(), self.inputs[0][:, :4].float()).backward()
        self.opt.zero_grad(set_to_none=True)
        return counter.get_total_flops()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--latent", type=int, default=32, help="latent height = width")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per model (after 2 warm-up steps)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--only", choices=["ours", "diffusers"], help="time one model (for profiling)")
    ap.add_argument("--stages", help="'all' or comma-separated stage names: time each stage's training step too")
    ap.add_argument("--stage-precision", choices=["bf16", "fp32"], help="override the stage configs' train.precision")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[;KEY=VALUE]",
                    help="time each stage again with these config overrides, interleaved with the others "
                         "(repeatable; 'movq/KEY=VALUE' changes the random MoVQ, i.e. the latent geometry), "
                         "e.g. 'loop:train.optimizer_impl=loop' or 'f8:movq/model.ch_mult=[1,2,2,2]'")
    ap.add_argument("--forward-only", action="store_true",
                    help="--stages: time each stage's forward without gradients (what a sampling step runs) "
                         "instead of its training step, e.g. with --variant 'compile:train.compile=true'")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    print(f"matmul peak on this machine: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s")

    b, f, s = args.batch, args.frames, args.latent
    x = torch.randn(b, 9, f, s, s)
    t = torch.randint(0, 1000, (b,))
    context = torch.randn(b, TOKENS, CONTEXT_DIM)
    mask = torch.ones(b, TOKENS, dtype=torch.bool)
    level, motion = torch.full((b,), 20), torch.full((b,), 10.0)

    ours = build_ours()
    runners = []
    if args.only in (None, "ours"):
        runners.append(Runner("kvideo VideoUNet", ours,
                              lambda m, x, t, c, k, l, mo: m(x, t, c, k, noise_aug_level=l, motion_score=mo),
                              (x, t, context, mask, level, motion), args.precision))
    if args.only in (None, "diffusers"):
        theirs, width, mismatch = matched_diffusers(sum(p.numel() for p in ours.parameters()), 9)
        print(f"diffusers UNet3DConditionModel width {width}: {mismatch:+.1%} parameters against ours")
        if abs(mismatch) > MAX_PARAM_MISMATCH:
            raise SystemExit(f"no diffusers width comes within {MAX_PARAM_MISMATCH:.0%} of our parameter count "
                             f"(nearest {mismatch:+.1%}); change the bench width")
        runners.append(Runner("diffusers UNet3DConditionModel", theirs,
                              lambda m, x, t, c: m(x, t, encoder_hidden_states=c).sample,
                              (x, t, context), args.precision))
    for r in runners:
        r.flops_per_step = r.flops()
    for r in runners:  # warm-up
        for _ in range(2):
            r.step()
    for _ in range(args.steps):
        for r in runners:
            reset = peak_rss_reset()
            r.times.append(r.step())
            if reset:
                mb = peak_rss_mb()
                r.peak_mb = mb if r.peak_mb is None else max(r.peak_mb, mb)

    rows = []
    for r in runners:
        sec = statistics.median(r.times)
        rows.append({
            "model": r.name, "params": r.params, "step_s": sec, "samples_per_s": b / sec,
            "gflop_per_step": r.flops_per_step / 1e9, "gflop_per_s": r.flops_per_step / sec / 1e9,
            "fraction_of_fp32_matmul_peak": r.flops_per_step / sec / 1e9 / peak32,
            "fraction_of_bf16_matmul_peak": r.flops_per_step / sec / 1e9 / peak16, "peak_rss_mb": r.peak_mb,
        })
    print(f"\ninput (b, c, f, h, w) = ({b}, 9, {f}, {s}, {s}), context ({b}, {TOKENS}, {CONTEXT_DIM}), "
          f"{args.precision}, median of {args.steps} steps each, interleaved")
    print("| model | params | step s | samples/s | GFLOP/step | GFLOP/s | of fp32 peak | of bf16 peak | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rss = "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['step_s']:.2f} | {r['samples_per_s']:.3f} | "
              f"{r['gflop_per_step']:.0f} | {r['gflop_per_s']:.0f} | {r['fraction_of_fp32_matmul_peak']:.0%} | "
              f"{r['fraction_of_bf16_matmul_peak']:.0%} | {rss} |")
    if len(rows) == 2:
        print(f"\nsamples/s ratio (kvideo / diffusers): {rows[0]['samples_per_s'] / rows[1]['samples_per_s']:.2f}")
    stage_rows = time_stages(args, peak32, peak16) if args.stages else []
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"date": str(date.today()), "machine": f"{platform.machine()} {os.cpu_count()} cpus",
                       "torch": torch.__version__, "matmul_peak_fp32": peak32, "matmul_peak_bf16": peak16,
                       "args": vars(args), "rows": rows, "stages": stage_rows}, fh, indent=2)
    return 0


def parse_variant(text: str) -> tuple:
    """'NAME:KEY=VALUE[;KEY=VALUE]' -> (name, stage overrides, MoVQ overrides)."""
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--variant {text!r}: expected NAME:KEY=VALUE[;KEY=VALUE]")
    items = [i.strip() for i in rest.split(";") if i.strip()]
    return name, [i for i in items if not i.startswith("movq/")], [i[5:] for i in items if i.startswith("movq/")]


def time_stages(args, peak32: float, peak16: float) -> list:
    """Each stage's training step (benchmarks/stage_steps.py) as configured and in every --variant,
    all interleaved; prints and returns rows (samples/s against the configured step beside each)."""
    from stage_steps import STAGES, build_steps

    names = STAGES if args.stages == "all" else tuple(args.stages.split(","))
    base = [f"train.precision={args.stage_precision}"] if args.stage_precision else []
    variants = [("configured", [], []), *(parse_variant(v) for v in args.variant)]
    steps = []
    for variant, overrides, movq_overrides in variants:
        for s in build_steps(names, [*base, *overrides], movq_overrides):
            s.variant = variant
            steps.append(s)
    forward = args.forward_only
    for s in steps:
        s.flops_per_step = s.flops(forward)
        s.compile()
        s.times = []
        for _ in range(2):  # warm-up (and compilation)
            s.step(forward)
    for _ in range(args.steps):
        for s in steps:
            s.times.append(s.step(forward))
    rows = []
    what = "forward without gradients (a sampling step's call)" if forward else "training step"
    print(f"\nEach stage's {what} (configs/STAGE/shapes.yaml, its batch size; median of {args.steps}, interleaved)")
    print("| stage | variant | trainable params | batch | precision | step s | samples/s | against configured | "
          "GFLOP/step | GFLOP/s | of fp32 peak | of bf16 peak |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    configured = {}
    for s in sorted(steps, key=lambda s: names.index(s.name)):
        sec = statistics.median(s.times)
        configured.setdefault(s.name, sec)
        gflops = s.flops_per_step / sec / 1e9
        row = {"stage": s.name, "variant": s.variant, "step": "forward" if forward else "train", "params": s.params, "batch": s.batch_size,
               "precision": s.cfg.train.precision, "step_s": sec, "samples_per_s": s.batch_size / sec,
               "speed_against_configured": configured[s.name] / sec, "gflop_per_step": s.flops_per_step / 1e9,
               "gflop_per_s": gflops, "fraction_of_fp32_matmul_peak": gflops / peak32,
               "fraction_of_bf16_matmul_peak": gflops / peak16}
        rows.append(row)
        print(f"| {s.name} | {s.variant} | {s.params / 1e6:.2f}M | {s.batch_size} | {row['precision']} | {sec:.3f} | "
              f"{row['samples_per_s']:.1f} | {row['speed_against_configured']:.2f}x | {row['gflop_per_step']:.1f} | "
              f"{gflops:.0f} | {row['fraction_of_fp32_matmul_peak']:.0%} | {row['fraction_of_bf16_matmul_peak']:.0%} |")
    return rows


if __name__ == "__main__":
    sys.exit(main())
