"""Which parts of its conditioning does a ShapesWorld checkpoint use? Two probes, no sampling.

    python tools/probe_text_conditioning.py --checkpoint RUN_OR_CKPT [--prompts 24]
        [--timesteps 100 300 500 700 900] [--random-tower] [--tower-seeds 0 1 2] [--seed 0]

Text encoder (any t2i, keyframe or interpolation checkpoint, or `--random-tower` for a fresh
tower of the checkpoint's text config): for a reference caption, the relative RMS change of the
encoder's output tokens (and of the tower's hidden states) when one word changes: the direction
(right / up / down for left), the speed, the colour, the shape, the background. A word the encoder has
learned to ignore changes its output by a few per cent; a colour word by most of it.

Keyframe loss (keyframe checkpoints): on ground-truth clips of the moving canonical prompts
(8 keyframes at the run's rate, encoded with the run's MoVQ), the per-clip diffusion loss at
fixed timesteps and noise under the true caption, under the same caption with each other
direction, with motion score 0, and without the first frame. If the model reads the direction
from the text, the true caption has the lowest loss on most clips; at chance (25% for four
directions) it does not.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import replace
import sys

import torch
from einops import rearrange

DIRECTIONS = ("left", "right", "up", "down")
REFERENCE = "a red circle moving left slowly on a blue background"
VARIANTS = {"direction right": "a red circle moving right slowly on a blue background",
            "direction up": "a red circle moving up slowly on a blue background",
            "direction down": "a red circle moving down slowly on a blue background",
            "speed quickly": "a red circle moving left quickly on a blue background",
            "colour green": "a green circle moving left slowly on a blue background",
            "shape square": "a red square moving left slowly on a blue background",
            "shape triangle": "a red triangle moving left slowly on a blue background",
            "background black": "a red circle moving left slowly on a black background"}


def relative_change(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """RMS of (b - a) over the valid tokens, relative to the RMS of a."""
    return float((b - a)[mask].pow(2).mean().sqrt() / a[mask].pow(2).mean().sqrt())


@torch.no_grad()
def text_probe(text) -> dict:
    """{variant: (output change, hidden-state change)} against REFERENCE."""
    prompts = [REFERENCE, *VARIANTS.values()]
    ids = text.tokenize(prompts)
    hidden, mask = text.encode_hidden(ids)
    tokens, _ = text.project(hidden, mask)
    out = {}
    for i, name in enumerate(VARIANTS, start=1):
        both = mask[0] & mask[i]
        out[name] = (relative_change(tokens[0], tokens[i], both), relative_change(hidden[0], hidden[i], both))
    return out


def swap_direction(prompt: str, shift: int) -> str:
    found = re.search(r"moving (left|right|up|down)", prompt)
    if found is None:
        raise ValueError(f"not a moving canonical prompt: {prompt!r}")
    d = found.group(1)
    return prompt.replace(f"moving {d}", f"moving {DIRECTIONS[(DIRECTIONS.index(d) + shift) % 4]}")


@torch.no_grad()
def keyframe_probe(bundle, n: int, timesteps, seed: int) -> list:
    from kvideo.data.shapesworld import prompt_clip
    from kvideo.evaluation import canonical_prompts, motion_preset
    from kvideo.inference.conditioning import KeyframeCondition

    model, movq, cfg, schedule = bundle.denoiser, bundle.movq, bundle.cfg, bundle.schedule
    rc = cfg.recipe
    prompts = [p["prompt"] for p in canonical_prompts() if re.search(r"moving (left|right|up|down)", p["prompt"])][:n]
    step = round(24.0 / float(cfg.data.fps))  # prompt clips are 24 fps
    num_frames = int(cfg.data.num_frames)
    latents = []
    for i, prompt in enumerate(prompts):
        clip = prompt_clip(prompt, i, int(cfg.data.size[0]))[: step * num_frames : step]
        frames = torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 127.5 - 1
        latents.append(movq.encode(frames).float() * rc.latent_scale)
    x0 = rearrange(torch.stack(latents), "b f c h w -> b c f h w")
    b = x0.shape[0]
    motion = torch.tensor([rc.motion.presets[motion_preset(p)] for p in prompts], dtype=torch.float32)
    level = torch.zeros(b, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)

    def loss(captions, t, noise, motion=motion, has_image=torch.ones(b)):
        x_t = schedule.q_sample(x0, t, noise)
        cond = KeyframeCondition(model.context(captions), x0[:, :, 0], has_image, level, motion, rc.motion.scale)
        pred = model(x_t, t, cond)
        return (pred - schedule.target_for(x0, noise, t, rc.diffusion.target)).pow(2).mean(dim=(1, 2, 3, 4))

    rows = []
    for tv in timesteps:
        t = torch.full((b,), int(tv), dtype=torch.long)
        noise = torch.randn(x0.shape, generator=gen)
        true = loss(prompts, t, noise)
        wrong = torch.stack([loss([swap_direction(p, k) for p in prompts], t, noise) for k in (1, 2, 3)])
        rows.append({"t": int(tv), "true": float(true.mean()), "wrong_direction": float(wrong.mean()),
                     "true_best": float((true < wrong.min(0).values).float().mean()),
                     "motion_0": float(loss(prompts, t, noise, motion=torch.zeros(b)).mean()),
                     "no_first_frame": float(loss(prompts, t, noise, has_image=torch.zeros(b)).mean())})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="t2i, keyframe or interpolation run or checkpoint")
    ap.add_argument("--prompts", type=int, default=24, help="moving canonical prompts for the loss probe")
    ap.add_argument("--timesteps", type=int, nargs="+", default=[100, 300, 500, 700, 900])
    ap.add_argument("--random-tower", action="store_true", help="also probe a freshly initialised tower")
    ap.add_argument("--tower-seeds", type=int, nargs="+", default=[],
                    help="also probe fresh towers drawn with recipe.text_encoder.init_seed = each of these")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from kvideo.models.text_encoder import TextEncoder, TextEncoderConfig
    from kvideo.inference.checkpoints import load_stage_weights, load_weights, resolve_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint)
    stage = load_weights(ckpt, "ema")[1].get("stage")
    if stage == "keyframe":
        from kvideo.inference.loading import load_bundle

        bundle = load_bundle(ckpt, "keyframe")
        text = bundle.denoiser.text
    elif stage in ("t2i", "interpolation"):
        state, cfg = load_stage_weights(ckpt, stage)
        text = TextEncoder(TextEncoderConfig(**cfg.recipe.text_encoder))
        text.load_state_dict({k[len("text."):]: v for k, v in state.items() if k.startswith("text.")})
    else:
        raise SystemExit(f"checkpoint '{ckpt}' is from stage '{stage}': give a t2i, keyframe or interpolation one")

    towers = [(f"{stage} {ckpt.name}", text.eval())]
    if args.random_tower:
        torch.manual_seed(args.seed)
        towers.append(("random tower", TextEncoder(text.cfg).eval()))
    towers += [(f"init_seed {s}", TextEncoder(replace(text.cfg, init_seed=s)).eval()) for s in args.tower_seeds]
    print(f"text encoder: relative change of the output tokens (tower hidden states) against '{REFERENCE}'\n")
    print("| encoder | " + " | ".join(VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    for name, encoder in towers:
        probe = text_probe(encoder)
        print(f"| {name} | " + " | ".join(f"{o:.3f} ({h:.3f})" for o, h in probe.values()) + " |")
    if stage == "keyframe":
        rows = keyframe_probe(bundle, args.prompts, args.timesteps, args.seed)
        print(f"\nkeyframe loss on {args.prompts} moving canonical prompts (ground-truth clips, same noise per row)\n")
        print("| t | true caption | other directions | true caption lowest | motion score 0 | no first frame |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['t']} | {r['true']:.4f} | {r['wrong_direction']:.4f} | {r['true_best']:.0%} | "
                  f"{r['motion_0']:.4f} | {r['no_first_frame']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
