"""Forward + backward time of `F.scaled_dot_product_attention` per CPU kernel, fp32 and bf16.

    python benchmarks/bench_attention.py [--repeats 20]

The shapes are the attentions of the ShapesWorld UNets at batch 32 with 4 heads of 32 channels:
self-attention over 8x8 and 4x4 latents, masked cross-attention from 64 tokens to 32 text tokens,
and temporal attention over 8 frames at 256 positions of 8 clips. Each (shape, dtype) is timed
with the flash kernel and with the math kernel (torch.nn.attention.sdpa_kernel), side by side in
one process. This measurement is why `kvideo.nn.attention` uses the math kernel for bf16 on the
CPU. Run it alone on the machine. Prints a markdown table in milliseconds.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {  # name: (q shape, k/v shape, mask shape or None)
    "self, 8x8 tokens": ((32, 4, 64, 32), (32, 4, 64, 32), None),
    "self, 4x4 tokens": ((32, 4, 16, 32), (32, 4, 16, 32), None),
    "cross, 64 x 32 tokens, masked": ((32, 4, 64, 32), (32, 4, 32, 32), (32, 1, 1, 32)),
    "temporal, 2048 x 8 frames": ((2048, 4, 8, 32), (2048, 4, 8, 32), None),
}


def time_ms(q_shape, kv_shape, mask_shape, backend, dtype, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=g).to(dtype).requires_grad_() for s in (q_shape, kv_shape, kv_shape))
    mask = torch.ones(mask_shape, dtype=torch.bool) if mask_shape else None

    def step():
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.sum().backward()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - t0) / repeats * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| attention | fp32 flash | fp32 math | bf16 flash | bf16 math |")
    print("|---|---|---|---|---|")
    for name, (qs, ks, ms) in SHAPES.items():
        cells = [f"{time_ms(qs, ks, ms, b, dt, args.repeats):.2f} ms" for dt in (torch.float32, torch.bfloat16)
                 for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
