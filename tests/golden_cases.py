"""Golden outputs of every stage and sampler on tiny random models: what a redesign must keep.

    python tests/golden_cases.py --record   # once, from the code the fixture protects

writes tests/golden/checkpoints/<stage>/ (tiny checkpoints of every stage, in the format of the
code that recorded them) and tests/golden/outputs.safetensors: for each stage the initial
weights its model builder makes, the training loss of each phase on a fixed batch and the weights
after one AdamW step; the samples of every sampler (first frames with each sampler, keyframes
with and without an image, interpolation with one and two passes, windowed video decoding) and
of whole `Pipeline` calls. tests/test_golden.py recomputes them with today's code.

The weights in the checkpoints are the builders' initial weights plus seeded noise, so zero-
initialised output layers and identity temporal layers do not hide a changed computation.
Paths inside the stored configs are written as @GOLDEN@ and resolved to a copy at test time.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
from pathlib import Path
from typing import Dict

import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
PLACEHOLDER = "@GOLDEN@"
STAGES = ("movq", "t2i", "keyframe", "interpolation", "video_decoder")
PROMPTS = ["a red circle moving left quickly on a black background",
           "a blue square moving up slowly on a gray background"]

TINY_UNET = {"model.model_channels": 16, "model.init_channels": 8, "model.time_embed_dim": 32,
             "model.context_dim": 16, "model.groups": 4, "model.head_dim": 8, "model.dim_mult": "[1,2]",
             "model.num_blocks": "[1,1]", "model.add_cross_attention": "[false,true]",
             "model.add_self_attention": "[false,true]", "recipe.text_encoder.out_dim": 16,
             "recipe.text_encoder.context_length": 16}
TINY_MOVQ = {"model.ch": 8, "model.norm_groups": 4, "model.n_embed": 32}
COMMON = {"data.size": "[32,32]", "data.num_workers": 0, "train.precision": "fp32", "data.latent_cache": "null"}

OVERRIDES = {
    "movq": {**TINY_MOVQ, "recipe.disc_channels": 8, "recipe.disc_norm_groups": 4, "recipe.gan_start": 0},
    "t2i": {**TINY_UNET, "recipe.movq": "{root}/movq"},
    "keyframe": {**TINY_UNET, "recipe.movq": "{root}/movq", "recipe.init_from": "{root}/t2i", "data.num_frames": 4,
                 "data.fps": 12.0, "recipe.spatial_lr_scale": 0.5},
    "interpolation": {**TINY_UNET, "recipe.movq": "{root}/movq", "recipe.init_from": "{root}/t2i",
                      "data.num_frames": 17, "recipe.gaps": 2, "model.in_channels": 20, "model.out_channels": 12,
                      "recipe.passes": "[{stride: 2, skip_frames: 3}, {stride: 1, skip_frames: 1}]"},
    "video_decoder": {**TINY_MOVQ, "recipe.movq": "{root}/movq", "data.num_frames": 4, "recipe.disc_channels": 8,
                      "recipe.disc_norm_groups": 4, "recipe.gan_start": 0, "recipe.temporal_weight": 0.5,
                      "recipe.spatial_lr_scale": 0.5},
}


def host() -> dict:
    """What decides the CPU kernels' order of summation: the CPU model (its name, and its family,
    model and stepping: one name, "AMD EPYC", covers generations whose kernels sum differently),
    torch and its threads."""
    fields = {"model name": platform.processor(), "cpu family": "", "model": "", "stepping": ""}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key in fields:
                fields[key] = value
            if not line.strip():  # the first processor's block is enough
                break
    except OSError:
        pass
    cpu_id = "/".join(fields[k] for k in ("cpu family", "model", "stepping"))
    return {"cpu": fields["model name"], "cpu_id": cpu_id, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def stage_overrides(stage: str, root: Path) -> list:
    values = {"run_dir": f"{root}/{stage}", "data.shards": f"{root}/shards", **COMMON, **OVERRIDES[stage]}
    return [f"{k}={str(v).replace('{root}', str(root))}" for k, v in values.items()]


def fixed_batch(stage: str, num_frames: int) -> dict:
    """A batch of 2 clips (b, 3, f, 32, 32) in [-1, 1], with captions and motion scores."""
    g = torch.Generator().manual_seed(STAGES.index(stage))
    video = torch.rand((2, 3, num_frames, 32, 32), generator=g) * 2 - 1
    return {"video": video, "caption": list(PROMPTS), "motion_score": torch.tensor([0.02, 0.05])}


TOKEN_EMBEDDING = "text.tower.token_embedding.weight"  # 3.2M entries: made by token_embedding(), not stored
FULL = 16384  # a sample with more entries is stored as a digest
FULL_WEIGHT = 512  # so is a weight with more entries


def token_embedding(shape) -> torch.Tensor:
    """The frozen text tower's token embedding in the fixture checkpoints (seeded, not stored)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(42)) * 0.02


def digest(v: torch.Tensor, picks: int) -> torch.Tensor:
    """What is stored of a large output: `picks` evenly spaced entries and three float64 sums
    (plain, of squares, index-weighted) of all of them, as float64."""
    flat = v.detach().double().flatten()
    index = torch.arange(flat.numel(), dtype=torch.float64) / flat.numel()
    chosen = flat[torch.linspace(0, flat.numel() - 1, picks).long()]
    return torch.cat([chosen, torch.stack([flat.sum(), (flat * flat).sum(), (flat * index).sum()])])


def stored_form(outputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Samples in full up to FULL entries, weights up to FULL_WEIGHT; digests beyond."""
    out = {}
    for k, v in outputs.items():
        weight = k.startswith(("init/", "train/"))
        limit = FULL_WEIGHT if weight else FULL
        out[k] = (v if v.numel() <= limit else digest(v, 64 if weight else 1024)).contiguous()
    return out


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Add seeded noise to every trainable parameter (see the module docstring); frozen parts
    (the video decoder's encoder, shared with the MoVQ) stay as loaded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda item: item[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


# ----------------------------------------------------------------------------------------------
# What the fixture protects; the only part that follows the code's API
# ----------------------------------------------------------------------------------------------


def _stage(stage: str, cfg):
    from kvideo.train.stages import STAGES as REGISTERED

    return REGISTERED[stage](cfg, torch.device("cpu"))


def build_initial(stage: str, root: Path):
    """(stage object, model) with the builder's initial weights, seeded."""
    from kvideo.registry import load_config

    cfg = load_config([ROOT / "configs" / stage / "shapes.yaml"], stage_overrides(stage, root))
    s = _stage(stage, cfg)
    torch.manual_seed(0)
    return s, s.build_model()


def load_trainable(stage: str, root: Path):
    """(stage object, model) with the checkpoint's model weights."""
    from kvideo.inference.checkpoints import load_stage_weights

    state, cfg = load_stage_weights(root / stage, stage, "model")
    s = _stage(stage, cfg)
    torch.manual_seed(0)
    model = s.build_model()
    model.load_state_dict(state)
    return s, model


def train_step(stage: str, root: Path) -> Dict[str, torch.Tensor]:
    """Each phase's loss on the fixed batch at step 0, then one AdamW step per phase, as the engine
    orders them; returns the losses and every weight after the step."""
    s, model = load_trainable(stage, root)
    model.train()
    batch = fixed_batch(stage, s.cfg.data.num_frames)
    out = {}
    torch.manual_seed(1)
    for phase in s.phases(model):
        if not s.phase_active(phase.name, 0):
            continue
        loss, _ = s.loss(model, {phase.name: phase.module}, batch, 0, phase.name)
        opt = torch.optim.AdamW(phase.param_groups(1e-3), betas=(0.9, 0.99), weight_decay=0.01)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out[f"loss/{phase.name}"] = loss.detach().reshape(1)
    s.after_step(model, 0, [batch])
    out.update({f"step/{k}": v.detach().clone() for k, v in model.state_dict().items()})
    return out


@torch.no_grad()
def samples(root: Path) -> Dict[str, torch.Tensor]:
    """Every sampler's output from the fixture checkpoints, with fixed generators."""
    from kvideo.inference.autoencoder import load_video_movq
    from kvideo.inference.loading import load_bundle
    from kvideo.inference.sampling import (FirstFrameOptions, InterpolationOptions, KeyframeOptions, interpolate,
                                           sample_first_frames, sample_keyframes)

    out = {}
    t2i = load_bundle(root / "t2i", "t2i")
    for sampler in ("ddpm", "ddim", "dpmpp_2m"):
        options = FirstFrameOptions.from_recipe(t2i.cfg, sampler=sampler, steps=3, spacing="trailing", guidance=4.0,
                                                dynamic_threshold=0.995, height=32, width=32)
        out[f"t2i/{sampler}"] = sample_first_frames(t2i, PROMPTS, options, generator=torch.Generator().manual_seed(0))
    # latent_scale 0.7 and no thresholding, as recipe changes: the latents are scaled and decoded at that scale
    t2i.cfg = changed(t2i.cfg, "recipe.latent_scale=0.7", "recipe.sampling.dynamic_threshold=null")
    options = FirstFrameOptions.from_recipe(t2i.cfg, sampler="ddpm", steps=2, spacing="leading", guidance=3.0,
                                            negative_prompt="a green triangle", height=32, width=32)
    out["t2i/negative"] = sample_first_frames(t2i, PROMPTS, options, generator=torch.Generator().manual_seed(1))

    kf = load_bundle(root / "keyframe", "keyframe")
    first = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    for use_image in (True, False):
        options = KeyframeOptions.from_recipe(kf.cfg, sampler="ddpm", steps=3, spacing="trailing", text_guidance=4.0,
                                              image_guidance=2.0, noise_aug_level=20, dynamic_threshold=0.995,
                                              num_frames=4, use_image=use_image)
        out[f"keyframe/image_{use_image}"] = sample_keyframes(kf, PROMPTS, first, torch.tensor([0.01, 0.04]), options,
                                                              generator=torch.Generator().manual_seed(3))
    options = KeyframeOptions.from_recipe(changed(kf.cfg, "recipe.sampling.dynamic_threshold=null"),
                                          sampler="dpmpp_2m", steps=3, spacing="trailing", text_guidance=5.0,
                                          image_guidance=1.5, noise_aug_level=0, num_frames=3,
                                          negative_prompt="a green triangle")
    out["keyframe/dpmpp_negative"] = sample_keyframes(kf, PROMPTS, first, 0.03, options,
                                                      generator=torch.Generator().manual_seed(4))

    ip = load_bundle(root / "interpolation", "interpolation")
    keys = torch.randn((2, 4, 3, 8, 8), generator=torch.Generator().manual_seed(5))
    for passes in ([3], [3, 1]):
        options = InterpolationOptions.from_recipe(ip.cfg, sampler="ddim", steps=3, spacing="trailing", guidance=0.5,
                                                   skip_frames=passes)
        out[f"interpolation/passes_{len(passes)}"] = interpolate(ip, keys, PROMPTS, options,
                                                                 generator=torch.Generator().manual_seed(6))
    options = InterpolationOptions.from_recipe(ip.cfg, sampler="ddpm", steps=2, spacing="trailing", guidance=1.0,
                                               skip_frames=[1], residual=False, negative_prompt="a green triangle",
                                               dynamic_threshold=0.99)
    out["interpolation/ddpm_plain"] = interpolate(ip, keys[:1], PROMPTS[:1], options,
                                                  generator=torch.Generator().manual_seed(7))

    decoder = load_video_movq(root / "video_decoder")
    z = torch.randn((1, 4, 9, 8, 8), generator=torch.Generator().manual_seed(8))
    out["decoder/whole"] = decoder.decode_video(z)
    out["decoder/window_4_overlap_2"] = decoder.decode_video(z, window=4, overlap=2)
    return out


def changed(cfg, *overrides: str):
    """A copy of a typed run config with `key=value` overrides (a case that changes a recipe value)."""
    from kvideo.config import to_plain
    from kvideo.registry import load_config

    return load_config(base=to_plain(cfg), overrides=list(overrides), require_complete=False)


@torch.no_grad()
def pipeline_calls(root: Path) -> Dict[str, torch.Tensor]:
    """Whole `Pipeline` calls: t2i first frame + keyframes + two interpolation passes + the video
    decoder; image-to-video with a negative prompt; plain text-to-video keyframes."""
    from kvideo.pipeline import Pipeline

    yaml = root / "pipeline.yaml"
    yaml.write_text("\n".join([f"{s}: {root / s}" for s in ("t2i", "keyframe", "interpolation", "video_decoder")]
                              + ["first_frame_scale: 2", "decode_window: 8", "decode_overlap: 2"]) + "\n")
    pipe = Pipeline.from_config(yaml)
    out = {}
    call = pipe(PROMPTS, seed=3, fps_preset="high", t2i_steps=2, keyframe_steps=2, interpolation_steps=2,
                motion_score=["fast", 0.01], progress=False)
    for name in ("frames", "first_frames", "keyframes"):
        out[f"pipeline/t2v/{name}"] = getattr(call, name)
    image = torch.linspace(-1, 1, 3 * 48 * 64).reshape(1, 3, 48, 64)
    call = pipe(PROMPTS[:1], image=image, seed=0, fps_preset="medium", negative_prompt="a green triangle",
                keyframe_sampler="ddim", keyframe_steps=3, interpolation_steps=2, progress=False)
    out["pipeline/i2v/frames"] = call.frames
    call = pipe(PROMPTS, seed=5, first_frame=False, fps_preset="low", keyframe_steps=2, progress=False)
    out["pipeline/no_first_frame/frames"] = call.frames
    return out


def initial_weights(root: Path) -> Dict[str, torch.Tensor]:
    out = {}
    for stage in STAGES:
        _, model = build_initial(stage, root)
        out.update({f"init/{stage}/{k}": v.detach().clone() for k, v in model.state_dict().items()})
    return out


def compute(root: Path) -> Dict[str, torch.Tensor]:
    """Every golden output from the checkpoints under `root` (a resolved copy of the fixture)."""
    out = initial_weights(root)
    for stage in STAGES:
        out.update({f"train/{stage}/{k}": v for k, v in train_step(stage, root).items()})
    out.update(samples(root))
    out.update(pipeline_calls(root))
    return {k: v.contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# Recording (once) and copying the fixture for a test
# ----------------------------------------------------------------------------------------------


def write_checkpoints(root: Path) -> None:
    """The tiny checkpoints of every stage, built and saved by the code of the day."""
    from kvideo.config import to_plain
    from kvideo.train.checkpoint import save_checkpoint

    for i, stage in enumerate(STAGES):
        s, model = build_initial(stage, root)
        perturb_(model, 100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name == TOKEN_EMBEDDING:
                    p.copy_(token_embedding(p.shape))
        state = model.state_dict()
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        ema = {k: v for k, v in state.items() if k not in frozen}  # as the engine's EMA: trainable + buffers
        save_checkpoint(root / stage, 0, state, ema, {"step": 0}, to_plain(s.cfg), keep=0)


def resolved_copy(dest: Path) -> Path:
    """The fixture checkpoints copied to `dest` with @GOLDEN@ replaced by `dest` and the token
    embedding put back where it was taken out."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(GOLDEN / "checkpoints", dest, dirs_exist_ok=True)
    for path in dest.rglob("config.yaml"):
        path.write_text(path.read_text().replace(PLACEHOLDER, str(dest)))
    for path in dest.rglob("model.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if "text.tower.positional_embedding" in tensors:
            shape = (int(metadata["token_embedding_rows"]), tensors["text.tower.positional_embedding"].shape[1])
            metadata = {k: v for k, v in metadata.items() if k != "token_embedding_rows"}
            tensors[TOKEN_EMBEDDING] = token_embedding(shape)
            save_file(tensors, str(path), metadata=metadata)
    return dest


def record(tmp: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    write_checkpoints(tmp)
    outputs = compute(tmp)
    target = GOLDEN / "checkpoints"
    if target.exists():
        shutil.rmtree(target)
    for stage in STAGES:
        ckpt = tmp / stage / "checkpoints"
        dest = target / stage / "checkpoints"
        dest.mkdir(parents=True)
        (dest / "latest").write_text((ckpt / "latest").read_text())
        for step_dir in ckpt.glob("step_*"):
            (dest / step_dir.name).mkdir()
            for name in ("model.safetensors", "ema.safetensors", "config.yaml"):
                shutil.copy(step_dir / name, dest / step_dir.name / name)
            cfg = dest / step_dir.name / "config.yaml"
            cfg.write_text(cfg.read_text().replace(str(tmp), PLACEHOLDER))
            weights = dest / step_dir.name / "model.safetensors"
            with safe_open(str(weights), framework="pt") as f:
                metadata = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if TOKEN_EMBEDDING in tensors:
                assert torch.equal(tensors[TOKEN_EMBEDDING], token_embedding(tensors[TOKEN_EMBEDDING].shape))
                metadata["token_embedding_rows"] = str(tensors.pop(TOKEN_EMBEDDING).shape[0])
                save_file(tensors, str(weights), metadata=metadata)
    save_file(stored_form(outputs), str(GOLDEN / "outputs.safetensors"), metadata={"host": json.dumps(host())})
    print(f"recorded {len(outputs)} outputs ({sum(v.numel() for v in outputs.values())} numbers)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--record", action="store_true", required=True)
    parser.add_argument("--tmp", default="/tmp/kvideo_golden_record")
    args = parser.parse_args()
    tmp = Path(args.tmp)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    record(tmp)
