"""Sample from trained kvideo stages, or from the whole cascade.

    python sample.py --pipeline configs/pipeline/shapes.yaml --prompt "..." --out out.mp4
        [--seed N] [--image first.png] [--motion-score X|PRESET] [--fps-preset low|medium|high]
        [--negative-prompt "..."] [--gif] [--sheet] [--prompts-file FILE --out-dir DIR]
        [--size H W] [--frames N] [--window W] [--text-guidance W] [--image-guidance W] [--motion-guidance W]
        [--noise-aug-level L] [--passes N] [--rewrite identity|shapesworld|llm:PATH]
        [--anchor first_step|every_step|clean] [--anchor-frame K] [--call KEY=VALUE ...]
        [key=value ...  pipeline config overrides, e.g. device=cuda]

    python sample.py --stage movq --checkpoint RUN_OR_CKPT --input VIDEO.mp4 --out RECON.mp4
        [--size H W] [--max-frames N] [--which ema|model] [--side-by-side]

    python sample.py --stage t2i --checkpoint RUN_OR_CKPT --prompt "..." --out frame.png
        [--seed N] [--steps N] [--sampler ddpm|ddim|dpmpp_2m] [--guidance W]
        [--negative-prompt "..."] [--size H W] [--spacing leading|trailing|linspace]

    python sample.py --stage keyframe --checkpoint RUN_OR_CKPT --prompt "..." --out keyframes.mp4
        [--image first.png] [--motion-score X|PRESET] [--t2i T2I_RUN] [--seed N] [--steps N]
        [--sampler ...] [--text-guidance W] [--image-guidance W] [--motion-guidance W] [--noise-aug-level L]

    python sample.py --stage interpolation --checkpoint RUN_OR_CKPT --input keyframes.mp4 --prompt "..."
        --out video.mp4 [--passes N] [--seed N] [--steps N] [--sampler ...] [--guidance W]

    python sample.py --stage video_decoder --checkpoint RUN_OR_CKPT --input clip.mp4 --out decoded.mp4
        [--window W] [--overlap O] [--max-frames N] [--side-by-side]

--pipeline runs kvideo.pipeline: first frame (t2i, or --image), keyframes, interpolation
(0, 1 or 2 passes by --fps-preset), video decoder, with a progress bar and the time of each stage; it
writes an H.264 mp4 per prompt, a JSON beside it with the prompt and every stage's resolved
settings (and with --gif / --sheet a GIF and a PNG contact sheet: first frame, keyframes, every
frame). --prompts-file has one prompt per line; each video goes to --out-dir/NNN.mp4. The
pipeline YAML names each stage's checkpoint. --call sets any other argument of the pipeline
call (each stage's sampler, steps and guidance, first_frame=false for text-to-video keyframes).

Single stages (--stage):
  movq   encode a video frame by frame to the continuous latent the diffusion stages use, decode
         it back, and write an H.264 mp4 (with --side-by-side: original | reconstruction);
         prints the PSNR.
  t2i    a first frame for a prompt. Defaults (sampler, steps, guidance) come from the
         checkpoint's `recipe.sampling`; the same seed gives the same image; a negative prompt
         replaces the unconditional branch of guidance.
  keyframe  keyframes for a prompt, from a first frame: a user image (--image, resized and
         centre-cropped to the model's size, encoded with the MoVQ: any picture can be
         animated) or one sampled by the t2i checkpoint (--t2i, default the keyframe model's
         recipe.init_from). Writes an H.264 mp4 at the keyframe rate (data.fps of the run).
         --motion-score takes a number or a preset name of the checkpoint (recipe.motion.presets).
  interpolation  frames between the keyframes of a video (--input, e.g. the keyframe stage's
         mp4), resized and centre-cropped to the model's size and encoded with the run's MoVQ:
         each pass turns N frames into 4N - 3 (--passes, default every pass of recipe.passes).
         Writes the mp4 at the input's fps times (k + 1) per pass.
  video_decoder  decode a video (--input) through the frozen encoder and the temporal video
         decoder, over windows of --window frames (default recipe.decode_window); prints PSNR
         and static-background flicker beside the image decoder's; --side-by-side writes
         original | image decoder | video decoder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from einops import rearrange


def read_clip(path: str, size, max_frames=None):
    """A video file -> ((f, 3, h, w) in [-1, 1] resized and centre-cropped to `size`, its fps)."""
    from kvideo.data.shards import resize_and_crop
    from kvideo.data.video_io import probe, read_video

    frames, _ = read_video(path, max_frames=max_frames)
    if len(frames) == 0:
        raise ValueError(f"'{path}' has no video frames")
    x = rearrange(torch.from_numpy(frames), "f h w c -> f c h w")
    return resize_and_crop(x, tuple(size), None).float() / 127.5 - 1, probe(path)["fps"] or 24.0


def write_frames(path: str, video: torch.Tensor, fps: float) -> None:
    """(3, f, h, w) in [-1, 1] -> an H.264 mp4."""
    from kvideo.data.video_io import write_video

    frames = ((rearrange(video, "c f h w -> f h w c") + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_video(path, frames, fps=fps)


def fit_size(path: str, factor: int, size=None) -> tuple:
    """`size` (H, W) when given, else the video's own size rounded down to a multiple of `factor`."""
    from kvideo.data.video_io import probe

    if size:
        return tuple(size)
    info = probe(path)
    return info["height"] // factor * factor, info["width"] // factor * factor


def maybe_compile(args, network):
    """--compile: torch.compile the network's blocks in place (kvideo.models.blocks); returns it."""
    if args.compile:
        from kvideo.models.blocks import compile_blocks

        print(f"torch.compile: {compile_blocks(network)} blocks")
    return network


def sample_movq(args) -> int:
    from kvideo.inference.autoencoder import load_movq
    from kvideo.metrics.reconstruction import psnr

    ae = maybe_compile(args, load_movq(args.checkpoint, which=args.which))
    size = fit_size(args.input, ae.downsample_factor, args.size)
    x, fps = read_clip(args.input, size, args.max_frames)  # (f, c, h, w) in [-1, 1]
    with torch.no_grad():
        recon = torch.cat([ae.decode(ae.encode(part)).clamp(-1, 1) for part in x.split(16)])
    print(f"PSNR {float(psnr(recon, x).mean()):.2f} dB over {len(x)} frames at {size[0]}x{size[1]}")
    out = torch.cat([x, recon], dim=-1) if args.side_by_side else recon
    write_frames(args.out, rearrange(out, "f c h w -> c f h w"), fps)
    print(f"wrote {args.out}")
    return 0


def sample_t2i(args) -> int:
    from torchvision.utils import save_image
    from tqdm import tqdm

    from kvideo.inference.loading import load_bundle
    from kvideo.inference.sampling import FirstFrameOptions, sample_first_frames

    t2i = load_bundle(args.checkpoint, "t2i", args.which)
    maybe_compile(args, t2i.denoiser)
    height, width = args.size or list(t2i.cfg.data.size)
    options = FirstFrameOptions.from_recipe(t2i.cfg, sampler=args.sampler, steps=args.steps, spacing=args.spacing,
                                            guidance=args.guidance, height=height, width=width,
                                            negative_prompt=args.negative_prompt)
    bar = tqdm(total=options.spec.steps, desc="t2i")
    images = sample_first_frames(t2i, [args.prompt] * args.num, options, generator=torch.Generator().manual_seed(args.seed),
                                 callback=lambda *_: bar.update(1))
    bar.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_image((images + 1) / 2, args.out, nrow=len(images))
    print(f"wrote {args.out}")
    return 0


def load_image(path: str, size=None) -> torch.Tensor:
    """An image file (any mode; EXIF orientation applied) -> (1, 3, h, w) in [-1, 1], resized
    (short side) and centre-cropped to `size` when given."""
    from kvideo.data.images import read_image
    from kvideo.data.shards import resize_and_crop

    x = rearrange(torch.from_numpy(read_image(path)), "h w c -> 1 c h w")
    if size is not None:
        x = resize_and_crop(x, tuple(size), None)
    return x.float() / 127.5 - 1


def sample_keyframe(args) -> int:
    from tqdm import tqdm

    from kvideo.inference.autoencoder import decode_latents
    from kvideo.inference.loading import load_bundle
    from kvideo.inference.sampling import (FirstFrameOptions, KeyframeOptions, first_frames_at, resolve_motion_score,
                                           sample_keyframes)

    kf = load_bundle(args.checkpoint, "keyframe", args.which)
    maybe_compile(args, kf.denoiser)
    rc = kf.recipe
    height, width = args.size or list(kf.cfg.data.size)
    generator = torch.Generator().manual_seed(args.seed)
    if args.image:
        first = load_image(args.image, (height, width))
    else:  # as the pipeline makes it: the t2i image at --first-frame-scale times the size, fitted
        t2i_path = args.t2i or rc.init_from
        if not t2i_path:
            raise ValueError("no first frame: give --image, or --t2i with a t2i checkpoint "
                             "(the keyframe run has no recipe.init_from)")
        t2i = load_bundle(t2i_path, "t2i", args.which)
        maybe_compile(args, t2i.denoiser)
        s = args.first_frame_scale
        options = FirstFrameOptions.from_recipe(t2i.cfg, height=height * s, width=width * s,
                                                negative_prompt=args.negative_prompt)
        first = first_frames_at(t2i, [args.prompt], options, (height, width), generator=generator)
    with torch.no_grad():
        first_latent = kf.movq.encode(first).float() * rc.latent_scale
    motion = resolve_motion_score(rc.motion, args.motion_score)
    options = KeyframeOptions.from_recipe(kf.cfg, sampler=args.sampler, steps=args.steps, spacing=args.spacing,
                                          text_guidance=args.text_guidance, image_guidance=args.image_guidance,
                                          noise_aug_level=args.noise_aug_level, num_frames=args.frames,
                                          negative_prompt=args.negative_prompt, keep_first_frame=args.keep_first_frame,
                                          motion_guidance=args.motion_guidance, anchor=args.anchor,
                                          anchor_frame=args.anchor_frame)
    bar = tqdm(total=options.spec.steps, desc="keyframes")
    latents = sample_keyframes(kf, [args.prompt], first_latent, motion, options, generator=generator,
                               callback=lambda *_: bar.update(1))
    bar.close()
    video = decode_latents(kf.movq, latents, rc.latent_scale)[0]  # (3, f, h, w)
    write_frames(args.out, video, kf.cfg.data.fps)
    print(f"wrote {args.out} ({video.shape[1]} keyframes at {kf.cfg.data.fps:g} fps, motion score {motion:g})")
    return 0


def sample_interpolation(args) -> int:
    from tqdm import tqdm

    from kvideo.inference.autoencoder import decode_latents
    from kvideo.inference.gaps import frames_after_passes
    from kvideo.inference.loading import load_bundle
    from kvideo.inference.sampling import InterpolationOptions, interpolate

    ip = load_bundle(args.checkpoint, "interpolation", args.which)
    maybe_compile(args, ip.denoiser)
    rc = ip.recipe
    skips = [p.skip_frames for p in rc.passes]
    if args.passes is not None and not 1 <= args.passes <= len(skips):
        raise ValueError(f"--passes {args.passes}: the run has {len(skips)} pass(es) (recipe.passes)")
    skips = skips[: args.passes or len(skips)]  # the first passes: from the keyframe spacing down
    keys, fps = read_clip(args.input, args.size or list(ip.cfg.data.size), args.max_frames)
    if len(keys) < 2:
        raise ValueError(f"'{args.input}' has {len(keys)} frame: interpolation needs at least 2 keyframes")
    with torch.no_grad():
        z = rearrange(ip.movq.encode(keys).float() * rc.latent_scale, "f c h w -> 1 c f h w")
    options = InterpolationOptions.from_recipe(ip.cfg, sampler=args.sampler, steps=args.steps, spacing=args.spacing,
                                               guidance=args.guidance, skip_frames=skips,
                                               negative_prompt=args.negative_prompt)
    passes = len(skips)
    bar = tqdm(total=options.spec.steps * passes, desc="interpolation")
    latents = interpolate(ip, z, [args.prompt or ""], options, generator=torch.Generator().manual_seed(args.seed),
                          callback=lambda *_: bar.update(1))
    bar.close()
    assert latents.shape[2] == frames_after_passes(len(keys), passes, rc.frames_per_gap)
    out_fps = fps * (rc.frames_per_gap + 1) ** passes
    write_frames(args.out, decode_latents(ip.movq, latents, rc.latent_scale)[0], out_fps)
    print(f"wrote {args.out} ({len(keys)} keyframes -> {latents.shape[2]} frames at {out_fps:g} fps, "
          f"{passes} pass(es))")
    return 0


def sample_video_decoder(args) -> int:
    from kvideo.inference.autoencoder import load_video_movq
    from kvideo.inference.checkpoints import load_stage_weights
    from kvideo.metrics.reconstruction import psnr, static_background_flicker

    ae = maybe_compile(args, load_video_movq(args.checkpoint, which=args.which))
    _, cfg = load_stage_weights(args.checkpoint, "video_decoder", args.which)
    size = fit_size(args.input, ae.downsample_factor, args.size)
    x, fps = read_clip(args.input, size, args.max_frames)
    window = args.window or cfg.recipe.decode_window
    with torch.no_grad():
        z = torch.cat([ae.encode(part) for part in x.split(16)])  # (f, c, h, w), the frozen encoder
        z = rearrange(z, "f c h w -> 1 c f h w")
        video = ae.decode_video(z, window=window, overlap=args.overlap).clamp(-1, 1)[0]  # (3, f, H, W)
        image = torch.cat([ae.decode(part) for part in rearrange(z[0], "c f h w -> f c h w").split(16)]).clamp(-1, 1)
    image = rearrange(image, "f c h w -> c f h w")
    truth = rearrange(x, "f c h w -> c f h w")
    for name, out in (("video decoder", video), ("image decoder", image)):
        p = float(psnr(rearrange(out, "c f h w -> f c h w"), x).mean())
        flicker = float(static_background_flicker(out[None], truth[None])) if len(x) > 1 else float("nan")
        print(f"{name}: PSNR {p:.2f} dB, static-background flicker {flicker:.5f}")
    out = torch.cat([truth, image, video], dim=-1) if args.side_by_side else video
    write_frames(args.out, out, fps)
    print(f"wrote {args.out} ({len(x)} frames at {size[0]}x{size[1]}, window {window or 'whole clip'})")
    return 0


def sample_pipeline(args) -> int:
    from kvideo.pipeline import Pipeline, call_arguments

    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts-file '{path}' does not exist")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts-file '{path}' has no prompts")
        if not args.out_dir:
            raise ValueError("--prompts-file needs --out-dir")
        outs = [Path(args.out_dir) / f"{i:03d}.mp4" for i in range(len(prompts))]
    else:
        if not args.prompt or not args.out:
            raise ValueError("--pipeline needs --prompt and --out (or --prompts-file and --out-dir)")
        prompts, outs = [args.prompt], [Path(args.out)]
    arguments = call_arguments(args.call, exclude=("seed",))  # the flags below win over --call
    flags = {"negative_prompt": args.negative_prompt, "motion_score": args.motion_score, "fps_preset": args.fps_preset,
             "passes": args.passes, "noise_aug_level": args.noise_aug_level, "text_guidance": args.text_guidance,
             "image_guidance": args.image_guidance, "size": args.size, "num_keyframes": args.frames,
             "decode_window": args.window, "keep_first_frame": args.keep_first_frame,
             "motion_guidance": args.motion_guidance, "anchor": args.anchor, "anchor_frame": args.anchor_frame,
             "rewrite": args.rewrite}
    arguments.update({k: v for k, v in flags.items() if v is not None})
    arguments.update(identity_flags(args))
    pipe = Pipeline.from_config(args.pipeline, [*args.overrides, *(["compile=true"] if args.compile else [])])
    image = load_image(args.image) if args.image else None  # the pipeline fits it to the video size
    bank = identity_bank(args)
    if args.shot2:
        return sample_two_shots(args, pipe, bank, arguments)
    references = pipe.references_from(bank, prompts) if bank is not None else None
    out = pipe(prompts, image=image, seed=args.seed, references=references, **arguments)
    write_videos(args, out, prompts, outs)
    if args.save_bank:
        if bank is None:
            raise ValueError("--save-bank needs a bank: --bank, --reference or --shot2")
        print(f"wrote {bank.save(args.save_bank)}")
    return 0


def write_videos(args, out, prompts, outs) -> None:
    """The mp4s (and GIFs / sheets) of one pipeline call, each with the JSON of what made it."""
    from kvideo.pipeline import write_outputs

    for path in write_outputs(out, outs, gif=args.gif, sheet=args.sheet):
        print(f"wrote {path}")
    for i, (prompt, path) in enumerate(zip(prompts, outs)):  # what made each video, beside it
        record = {"prompt": prompt, "pipeline": args.pipeline, "overrides": args.overrides, "fps": out.fps,
                  "frames": out.frames.shape[2], "settings": out.settings, "seconds": out.timings}
        if out.first_frame_prompts is not None:
            record["first_frame_prompt"] = out.first_frame_prompts[i]
        path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    times = ", ".join(f"{k} {v:.1f} s" for k, v in out.timings.items())
    print(f"{len(prompts)} video(s) of {out.frames.shape[2]} frames at {out.fps:g} fps; {times}")


def identity_flags(args) -> dict:
    return {k: v for k, v in {"identity_scale": args.identity_scale,
                              "reference_guidance": args.reference_guidance}.items() if v is not None}


def identity_bank(args):
    """The identity bank of --bank and --reference NAME=IMG (these win), or None without either."""
    from kvideo.inference.identity import IdentityBank, read_reference

    if not args.bank and not args.reference:
        return None
    bank = IdentityBank.load(args.bank) if args.bank else IdentityBank()
    for item in args.reference or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--reference takes NAME=IMAGE; got {item!r}")
        bank.add(name, read_reference(path))
    return bank


def sample_two_shots(args, pipe, bank, arguments) -> int:
    """--shot2: shot 1 from --prompt, its characters (--name) entered in the bank from its first
    frame, shot 2 from --shot2 with them (kvideo.shots.two_shots)."""
    from kvideo.shots import two_shots

    if not args.prompt or not args.out or not args.shot2_out:
        raise ValueError("--shot2 needs --prompt, --out (shot 1) and --shot2-out (shot 2)")
    if not args.name:
        raise ValueError("--shot2 needs --name NAME for each character shot 1 introduces")
    first, second, bank = two_shots(pipe, [args.prompt, args.shot2], args.name, bank, seed=args.seed, **arguments)
    write_videos(args, first, [args.prompt], [Path(args.out)])
    write_videos(args, second, [args.shot2], [Path(args.shot2_out)])
    if args.save_bank:
        print(f"wrote {bank.save(args.save_bank)}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", help="a pipeline YAML (configs/pipeline/): the whole cascade")
    ap.add_argument("--rewrite", help="--pipeline: the first frame's prompt rewriter, identity | shapesworld | llm:PATH "
                                      "(Factorized Video Generation; default: the pipeline config's rewriter)")
    ap.add_argument("--stage", choices=["movq", "t2i", "keyframe", "interpolation", "video_decoder"])
    ap.add_argument("--checkpoint", help="a run directory, checkpoint directory or .safetensors file")
    ap.add_argument("--which", default="ema", choices=["ema", "model"])
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile every network's blocks (the pipeline's compile key); pays off over many "
                         "prompts of one size (--prompts-file), each new shape compiles again")
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*", help="--pipeline: config overrides key=value")
    pipe = ap.add_argument_group("pipeline")
    pipe.add_argument("--fps-preset", choices=["low", "medium", "high"], help="interpolation passes 0 / 1 / 2")
    pipe.add_argument("--prompts-file", help="one prompt per line (with --out-dir)")
    pipe.add_argument("--out-dir")
    pipe.add_argument("--gif", action="store_true", help="also write a GIF beside each mp4")
    pipe.add_argument("--sheet", action="store_true", help="also write a PNG contact sheet beside each mp4")
    pipe.add_argument("--call", action="append", metavar="KEY=VALUE",
                      help="any other argument of the pipeline call (kvideo.pipeline.Pipeline.settings), e.g. "
                           "keyframe_steps=15, keyframe_sampler=dpmpp_2m, first_frame=false (repeatable)")
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"))
    movq = ap.add_argument_group("movq, interpolation and video_decoder")
    movq.add_argument("--input", help="video to reconstruct (movq, video_decoder) or keyframes to interpolate")
    movq.add_argument("--max-frames", type=int)
    movq.add_argument("--side-by-side", action="store_true")
    t2i = ap.add_argument_group("t2i and keyframe")
    t2i.add_argument("--prompt")
    t2i.add_argument("--negative-prompt")
    t2i.add_argument("--num", type=int, default=1, help="images for the prompt (one grid)")
    t2i.add_argument("--seed", type=int, default=0)
    t2i.add_argument("--steps", type=int)
    t2i.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp_2m"])
    t2i.add_argument("--spacing", choices=["leading", "trailing", "linspace"])
    t2i.add_argument("--guidance", type=float)
    kf = ap.add_argument_group("keyframe")
    kf.add_argument("--image", help="first frame to animate (any picture); default: sampled by the t2i model")
    kf.add_argument("--t2i", help="t2i checkpoint for the first frame (default: the run's recipe.init_from)")
    kf.add_argument("--first-frame-scale", type=int, default=2,
                    help="the t2i image is this many times the video size, then fitted, as the pipeline's "
                         "first_frame_scale (release: 2; configs/pipeline/shapes.yaml: 1)")
    kf.add_argument("--motion-score", help="a number (shard motion-score units) or a preset name")
    kf.add_argument("--frames", type=int, help="keyframes (default: the run's data.num_frames)")
    kf.add_argument("--text-guidance", type=float)
    kf.add_argument("--image-guidance", type=float)
    kf.add_argument("--motion-guidance", type=float,
                    help="w_M of motion-free guidance (default: the recipe's sampling.motion_guidance, 0 = none)")
    kf.add_argument("--anchor", choices=["first_step", "every_step", "clean"],
                    help="a text-to-video keyframe model: how the first frame anchors its frame (default: the recipe's)")
    kf.add_argument("--anchor-frame", type=int, help="the keyframe the first frame anchors (default 0)")
    kf.add_argument("--noise-aug-level", type=int)
    kf.add_argument("--keep-first-frame", action=argparse.BooleanOptionalAction, default=None,
                    help="hold frame 0 to the first frame at every step (default: the recipe's sampling)")
    ident = ap.add_argument_group("identity (--pipeline; stages trained with model.identity_attention)")
    ident.add_argument("--reference", action="append", metavar="NAME=IMAGE",
                       help="a character's reference image; a prompt that names NAME is conditioned on it")
    ident.add_argument("--bank", help="an identity bank file (kvideo.inference.identity.IdentityBank)")
    ident.add_argument("--save-bank", help="write the bank (with --shot2: and shot 1's characters) to this file")
    ident.add_argument("--shot2", metavar="PROMPT", help="a second shot of --prompt's characters (--name)")
    ident.add_argument("--shot2-out", help="the second shot's mp4")
    ident.add_argument("--name", action="append", help="--shot2: a character shot 1 introduces (repeatable)")
    ident.add_argument("--identity-scale", type=float, help="the identity attention's strength (default 1)")
    ident.add_argument("--reference-guidance", type=float, help="w_R of reference guidance (default 0: none)")
    it = ap.add_argument_group("interpolation and video_decoder")
    it.add_argument("--passes", type=int, help="interpolation passes (default: all of the run's recipe.passes)")
    it.add_argument("--window", type=int, help="video_decoder: frames per decoding window")
    it.add_argument("--overlap", type=int, default=4, help="video_decoder: frames shared by neighbouring windows")
    args = ap.parse_args(argv)
    if args.pipeline:
        try:
            return sample_pipeline(args)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if not args.stage or not args.checkpoint or not args.out:
        ap.error("give --pipeline, or --stage with --checkpoint and --out")
    if args.overrides:
        ap.error(f"unexpected arguments {args.overrides} (key=value overrides go with --pipeline)")
    needed = {"movq": "input", "t2i": "prompt", "keyframe": "prompt", "interpolation": "input",
              "video_decoder": "input"}[args.stage]
    if getattr(args, needed) is None:
        ap.error(f"--stage {args.stage} needs --{needed}")
    try:
        return {"movq": sample_movq, "t2i": sample_t2i, "keyframe": sample_keyframe, "interpolation": sample_interpolation,
                "video_decoder": sample_video_decoder}[args.stage](args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
