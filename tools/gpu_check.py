"""The GPU check: kvideo's CUDA paths, proven against references, and the keyframe UNet's
training throughput on this node. Written on a CPU-only machine; run it on the first GPU node.

    python tools/gpu_check.py [--out FILE.json] [--only attention,unet,compile,fsdp,throughput]
        [--size 256] [--frames 16] [--params 1.0e9] [--batch 2] [--steps 10] [--peak-tflops T]

Checks (each PASS or FAIL with the error it measured; the exit status is 1 when any fails):
  attention   kvideo.nn.layers.attention on CUDA (xformers' kernel when it is installed, else
              PyTorch's fused SDPA) against SDPA's math kernel in fp32, in fp32 and bf16, with
              and without a mask
  unet        a small keyframe UNet (the ShapesWorld size, random weights): CUDA fp32 against the
              CPU (TF32 off), and bf16 autocast against fp32 on CUDA, forward and gradients
  compile     `train.compile`'s blocks (kvideo.models.blocks.compile_blocks) on CUDA against
              eager, forward and gradients
  fsdp        torchrun on every visible GPU (nccl): the keyframe stage's training step
              (configs/keyframe/shapes.yaml, synthetic batches, a random MoVQ) for 3 steps under
              train.parallel=fsdp against ddp, the same batches and noise on each rank; the
              final weights compared
Throughput: the keyframe UNet (the Kandinsky 3 layout with every temporal layer, its width
chosen for about --params parameters, a 128-token 4096-d text context) at --size px (latents
size/8, 9 input channels) and --frames frames: AdamW training steps under bf16 autocast, with and
without activation checkpointing: samples/s, achieved TFLOP/s (torch.utils.flop_counter), MFU
against the card's dense bf16 peak (a table of known cards, or --peak-tflops; the measured bf16
matmul peak beside it) and peak memory. About 5 minutes on one node.

`--device cpu` runs every check on the CPU (gloo ranks, tiny sizes) to check the tool itself.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # stage_steps: a stage's training step on synthetic batches

CHECKS = ("attention", "unet", "compile", "fsdp", "throughput")
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of the device name.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0,
                    "A100": 312.0, "L40S": 362.0, "L40": 181.0, "A10G": 70.0, "A10": 125.0, "L4": 121.0,
                    "RTX 4090": 165.0, "RTX 6000 Ada": 364.0, "A6000": 155.0, "V100": 125.0}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (L2 over every element), in fp32."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check_attention(device: torch.device) -> dict:
    from kvideo.nn.layers import attention, xformers_available

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, 256, 64, generator=gen) for _ in range(3))
    mask = torch.rand(2, 1, 256, 256, generator=gen) > 0.2
    errors = {}
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        for name, m in (("no mask", None), ("mask", mask)):
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
                ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
            out = attention(*(t.to(device, dtype) for t in (q, k, v)), mask=None if m is None else m.to(device))
            errors[f"{str(dtype)[6:]}, {name}"] = (relative_error(out, ref), tol)
    kernel = "xformers" if xformers_available() and device.type == "cuda" else "SDPA"
    return _result(errors, f"kernel {kernel}")


def _small_unet():
    from kvideo.models.video_unet import VideoUNet, video_unet_config

    torch.manual_seed(0)
    model = VideoUNet(video_unet_config("shapes"))
    for p in model.parameters():  # the temporal layers start as identities: give every weight a value
        p.data.normal_(0, 0.02) if p.ndim > 1 else p.data.uniform_(-0.1, 0.1)
    return model


def _unet_inputs(model, device: torch.device, batch: int = 2, frames: int = 4, side: int = 16, tokens: int = 8):
    gen = torch.Generator().manual_seed(1)
    c = model.cfg
    x = torch.randn(batch, c.in_channels, frames, side, side, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    context = torch.randn(batch, tokens, c.context_dim, generator=gen)
    return [a.to(device) for a in (x, t, context)]


def _forward_backward(model, inputs, autocast: bool = False):
    """The output and every parameter's gradient of mean(out^2)."""
    model.zero_grad(set_to_none=True)
    device = inputs[0].device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        out = model(*inputs)
    out.float().square().mean().backward()
    return out, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def check_unet(device: torch.device) -> dict:
    model = _small_unet()
    ref_out, ref_grad = _forward_backward(model, _unet_inputs(model, torch.device("cpu")))
    on_device = copy.deepcopy(model).to(device)
    out, grad = _forward_backward(on_device, _unet_inputs(on_device, device))
    bf_out, bf_grad = _forward_backward(on_device, _unet_inputs(on_device, device), autocast=True)
    return _result({"fp32 forward vs CPU": (relative_error(out, ref_out), 1e-4),
                    "fp32 gradients vs CPU": (relative_error(grad, ref_grad), 1e-4),
                    "bf16 forward vs fp32": (relative_error(bf_out, out), 5e-2),
                    "bf16 gradients vs fp32": (relative_error(bf_grad, grad), 5e-2)})


def check_compile(device: torch.device) -> dict:
    from kvideo.models.blocks import compile_blocks

    eager = _small_unet().to(device)
    compiled = copy.deepcopy(eager)
    t0 = time.perf_counter()
    blocks = compile_blocks(compiled)
    inputs = _unet_inputs(eager, device)
    ref_out, ref_grad = _forward_backward(eager, inputs)
    out, grad = _forward_backward(compiled, inputs)
    seconds = time.perf_counter() - t0
    same_keys = list(compiled.state_dict()) == list(eager.state_dict())
    result = _result({"forward": (relative_error(out, ref_out), 1e-4),
                      "gradients": (relative_error(grad, ref_grad), 1e-4)},
                     f"{blocks} blocks compiled and run in {seconds:.0f} s")
    if not same_keys:
        result.update(ok=False, detail=result["detail"] + "; checkpoint keys changed")
    return result


def check_fsdp(device: torch.device, work: Path) -> dict:
    """torchrun of this script's --fsdp-worker on every visible GPU (2 gloo ranks on the CPU)."""
    from stage_steps import _random_movq

    nproc = torch.cuda.device_count() if device.type == "cuda" else 2
    movq = _random_movq(work / "movq")
    out = work / "fsdp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(Path(__file__).resolve()), "--fsdp-worker", str(movq), "--out", str(out), "--device", device.type]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return {"ok": False, "detail": f"torchrun failed: {proc.stdout[-1500:]}{proc.stderr[-3000:]}"}
    return json.loads(out.read_text())


def fsdp_worker(movq: str, out: str, device_name: str) -> int:
    """One rank: 3 keyframe training steps under ddp, then under fsdp, from the same weights with
    the same batches (seeded by rank) and noise (seeded by rank and step); rank 0 compares."""
    from stage_steps import StageStep

    from kvideo.train.dist import init_distributed
    from kvideo.train.parallel import _full

    info = init_distributed(device_name, always=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    overrides = ["train.precision=fp32", "train.batch_size=2"]
    work = Path(movq).parent  # StageStep finds the random MoVQ at work/movq
    weights = {}
    for kind in ("ddp", "fsdp"):
        torch.manual_seed(0)  # the same initial weights on every rank and for both kinds
        step = StageStep("keyframe", work, overrides, device=info.device, parallel=(kind, info), seed=info.rank)
        for i in range(3):
            torch.manual_seed(1000 * info.rank + i)
            step.step()
        weights[kind] = {k: _full(v).detach().float().cpu() for k, v in step.model.state_dict().items()}
    if info.is_main:
        worst = max(float((weights["fsdp"][k] - weights["ddp"][k]).abs().max()) for k in weights["ddp"])
        moved = max(float((weights["ddp"][k] - v).abs().max()) for k, v in _initial(overrides, work).items())
        result = _result({"fsdp vs ddp weights after 3 steps (max abs)": (worst, 1e-4)},
                         f"{info.world_size} rank(s); the weights moved by up to {moved:.2e}")
        Path(out).write_text(json.dumps(result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


def _initial(overrides, work: Path) -> dict:
    """The keyframe model's initial weights (seed 0), on the CPU."""
    from stage_steps import StageStep

    torch.manual_seed(0)
    step = StageStep("keyframe", work, overrides)
    return {k: v.detach().float() for k, v in step.model.state_dict().items()}


def _result(errors: dict, detail: str = "") -> dict:
    return {"ok": all(e <= tol for e, tol in errors.values()), "detail": detail,
            "errors": {name: {"error": e, "tolerance": tol} for name, (e, tol) in errors.items()}}


def throughput_model(params: float, device: torch.device):
    """The keyframe UNet at the width (a multiple of 64) whose parameter count is nearest `params`."""
    from kvideo.models.video_unet import VideoUNet, video_unet_config

    def config(width):
        return video_unet_config("kandinsky", model_channels=width, init_channels=width // 2,
                                 time_embed_dim=4 * width)

    def count(width):
        with torch.device("meta"):
            return sum(p.numel() for p in VideoUNet(config(width)).parameters())

    width = min(range(64, 1025, 64), key=lambda w: abs(count(w) - params))
    return VideoUNet(config(width)).to(device), width


def measure_throughput(args, device: torch.device) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from kvideo.nn.layers import xformers_available

    model, width = throughput_model(args.params, device)
    n_params = sum(p.numel() for p in model.parameters())
    latent = args.size // 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 9, args.frames, latent, latent, generator=gen).to(device)
    target = torch.randn(args.batch, 4, args.frames, latent, latent, generator=gen).to(device)
    t = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
    context = torch.randn(args.batch, 128, model.cfg.context_dim, generator=gen).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.mse_loss(model(x, t, context).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    peak = _peak_tflops(args, device)
    rows = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        counter = FlopCounterMode(display=False)
        with counter:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.mse_loss(model(x, t, context).float(), target)
            loss.backward()
        opt.zero_grad(set_to_none=True)
        flops = counter.get_total_flops()  # forward + backward (a recompute is not useful work)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        _sync(device)
        sec = (time.perf_counter() - t0) / args.steps
        tflops = flops / sec / 1e12
        rows.append({"checkpointing": checkpointing, "step_s": sec, "samples_per_s": args.batch / sec,
                     "tflop_per_step": flops / 1e12, "tflop_per_s": tflops, "mfu": tflops / peak["card"],
                     "of_measured_matmul_peak": tflops / peak["measured"],
                     "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None})
    return {"ok": True, "model": {"params": n_params, "model_channels": width, "size": args.size,
                                  "frames": args.frames, "batch": args.batch, "text_tokens": 128},
            "attention_kernel": "xformers" if xformers_available() and device.type == "cuda" else "SDPA",
            "peak_tflops": peak, "rows": rows}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_tflops(args, device: torch.device) -> dict:
    """The card's dense bf16 peak (the table, or --peak-tflops) and the bf16 matmul peak measured now."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    best = float("inf")
    for _ in range(10):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    measured = 2 * n ** 3 / best / 1e12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    card = args.peak_tflops or next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    return {"device": name, "card": card or measured, "card_source": "--peak-tflops" if args.peak_tflops else
            ("table" if card else "measured matmul (unknown card: give --peak-tflops)"), "measured": measured}


def print_report(results: dict) -> None:
    for name, r in results.items():
        if name == "throughput" or name == "environment":
            continue
        print(f"{'PASS' if r['ok'] else 'FAIL'}  {name:10s} {r.get('detail', '')}")
        for what, e in r.get("errors", {}).items():
            print(f"      {what}: {e['error']:.2e} (tolerance {e['tolerance']:.0e})")
    tp = results.get("throughput")
    if tp:
        m, p = tp["model"], tp["peak_tflops"]
        print(f"\nkeyframe UNet {m['params'] / 1e9:.2f}B ({m['model_channels']} channels), {m['size']} px, "
              f"{m['frames']} frames, batch {m['batch']}, bf16 autocast, {tp['attention_kernel']}; {p['device']}: "
              f"bf16 peak {p['card']:.3g} TFLOP/s ({p['card_source']}), measured matmul {p['measured']:.3g}")
        print("| checkpointing | step s | samples/s | TFLOP/step | TFLOP/s | MFU | of measured matmul | peak GiB |")
        print("|---|---|---|---|---|---|---|---|")
        for r in tp["rows"]:
            mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
            print(f"| {r['checkpointing']} | {r['step_s']:.3f} | {r['samples_per_s']:.2f} | {r['tflop_per_step']:.2f} | "
                  f"{r['tflop_per_s']:.3g} | {r['mfu']:.1%} | {r['of_measured_matmul_peak']:.1%} | {mem} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(CHECKS)}")
    ap.add_argument("--size", type=int, help="throughput: frame size in px (default 256; 64 on the CPU)")
    ap.add_argument("--frames", type=int, help="throughput: frames (default 16; 4 on the CPU)")
    ap.add_argument("--params", type=float, help="throughput: about this many parameters (default 1e9; on the CPU 1e8, i.e. the narrowest width)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="throughput: timed steps (after 2 warm-up steps)")
    ap.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, when the table does not know it")
    ap.add_argument("--out", help="write the results as JSON")
    ap.add_argument("--fsdp-worker", metavar="MOVQ", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.fsdp_worker:
        return fsdp_worker(args.fsdp_worker, args.out, args.device)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device (torch.cuda.is_available() is False); --device cpu checks the tool on the CPU",
              file=sys.stderr)
        return 2
    cpu = args.device == "cpu"
    args.size = args.size or (64 if cpu else 256)
    args.frames = args.frames or (4 if cpu else 16)
    args.params = args.params or (1e8 if cpu else 1e9)
    only = CHECKS if not args.only else tuple(args.only.split(","))
    unknown = set(only) - set(CHECKS)
    if unknown:
        ap.error(f"--only: unknown checks {sorted(unknown)}; choose from {', '.join(CHECKS)}")
    device = torch.device(args.device)
    results = {"environment": {"torch": torch.__version__, "cuda": torch.version.cuda,
                               "gpus": torch.cuda.device_count(), "date": time.strftime("%Y-%m-%d")}}
    with tempfile.TemporaryDirectory(prefix="kvideo_gpu_check_") as tmp:
        runs = {"attention": lambda: check_attention(device), "unet": lambda: check_unet(device),
                "compile": lambda: check_compile(device), "fsdp": lambda: check_fsdp(device, Path(tmp)),
                "throughput": lambda: measure_throughput(args, device)}
        for name in only:
            t0 = time.perf_counter()
            try:
                results[name] = runs[name]()
            except Exception as e:  # a failing check is reported and the others still run
                results[name] = {"ok": False, "detail": f"{type(e).__name__}: {e}"}
            results[name]["seconds"] = time.perf_counter() - t0
            print(f"{name}: {'ok' if results[name]['ok'] else 'FAILED'} in {results[name]['seconds']:.0f} s", flush=True)
    print_report(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["ok"] for k, r in results.items() if k != "environment") else 1


if __name__ == "__main__":
    sys.exit(main())
