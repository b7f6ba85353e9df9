"""Stage interpolation on tiny models: pass arithmetic, gap layout, guidance branches, training."""

from pathlib import Path

import pytest
import torch

from dataclasses import replace

from omegaconf import OmegaConf

from kvideo.diffusion import SamplerSpec, sample
from kvideo.inference.conditioning import InterpolationCondition, Prompts, gap_input
from kvideo.inference.denoiser import make_schedule
from kvideo.inference.gaps import frames_after_passes, gap_blend, merge_gaps, split_gaps
from kvideo.inference.loading import load_bundle
from kvideo.inference.sampling import InterpolationOptions, interpolate
from kvideo.registry import load_config, model_info
from kvideo.inference import checkpoints as ckpt
from kvideo.train.engine import train
from kvideo.train.stages.interpolation import InterpolationStage

from conftest import ROOT, tiny_t2i_overrides

CONFIG = ROOT / "configs" / "interpolation" / "shapes.yaml"
PROMPT = "a blue square moving up slowly on a gray background"


def tiny_interpolation_overrides(run_dir, shards, movq_run, t2i_run, **extra):
    values = dict(item.split("=", 1) for item in tiny_t2i_overrides(run_dir, shards, movq_run))
    values.update({"data.num_frames": 9, "recipe.gaps": 2, "recipe.init_from": str(t2i_run), "train.batch_size": 2,
                   "recipe.latent_scale": 1.0, "model.in_channels": 20, "model.out_channels": 12,
                   "recipe.preview_steps": 2})
    values.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def interpolation_run(tmp_path_factory, shapes_shards, movq_run, t2i_run) -> Path:
    run = tmp_path_factory.mktemp("interpolation")
    train(load_config([CONFIG], tiny_interpolation_overrides(run, shapes_shards, movq_run, t2i_run)))
    return run


def build_interpolation_model(cfg):
    """The interpolation model as training builds it (recipe.init_from loaded in)."""
    return InterpolationStage(cfg, torch.device("cpu")).build_model()


def with_target(bundle, target):
    """The bundle with its recipe's prediction target changed (the samplers read it from there)."""
    cfg = OmegaConf.create(OmegaConf.to_container(bundle.cfg))
    cfg.recipe.diffusion.target = target
    return replace(bundle, cfg=cfg)


def test_pass_arithmetic():
    assert frames_after_passes(12, 1) == 45 and frames_after_passes(12, 2) == 177
    assert frames_after_passes(8, 1) == 29 and frames_after_passes(5, 0) == 5
    assert frames_after_passes(4, 1, frames_per_gap=1) == 7


def test_split_and_merge_gaps_round_trip():
    frames = torch.arange(9, dtype=torch.float32).reshape(1, 1, 9, 1, 1).expand(2, 4, 9, 3, 3).clone()
    keys, new = split_gaps(frames, 3)
    assert keys[0, 0, :, 0, 0].tolist() == [0, 4, 8]
    assert new.shape == (2, 12, 2, 3, 3)
    assert new[0, :, 0, 0, 0].tolist() == [1] * 4 + [2] * 4 + [3] * 4  # (k c): frame-major channels
    assert torch.equal(merge_gaps(keys, new, 3), frames)
    with pytest.raises(ValueError, match="do not split"):
        split_gaps(frames[:, :, :8], 3)


def test_gap_input_and_the_unconditional_branch():
    keys, x_t = torch.randn(2, 4, 3, 5, 5), torch.randn(2, 12, 2, 5, 5)
    inp = gap_input(x_t, keys, torch.tensor([1.0, 0.0]))
    assert inp.shape == (2, 20, 2, 5, 5)
    assert torch.equal(inp[0, :4], keys[0, :, :2]) and torch.equal(inp[0, 16:], keys[0, :, 1:])
    assert torch.equal(inp[:, 4:16], x_t)
    assert not inp[1, :4].any() and not inp[1, 16:].any()  # zeroed keyframes


def test_interpolation_trains_from_t2i_and_guidance_branches(interpolation_run):
    assert ckpt.latest_checkpoint(interpolation_run).name == "step_0000003"
    assert (interpolation_run / "previews" / "step_0000003.png").is_file()
    bundle = with_target(load_bundle(interpolation_run, "interpolation"), "v")
    model, cfg = bundle.denoiser, bundle.cfg
    assert cfg.recipe.frames_per_gap == 3 and cfg.recipe.latent_scale == 1.0
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.unet.temporal_parameters():
            p.add_(0.1 * torch.randn_like(p))
    schedule = make_schedule(cfg.recipe.diffusion)
    assert torch.equal(schedule.alphas_cumprod, bundle.schedule.alphas_cumprod)
    keys = torch.randn(1, 4, 3, 8, 8)
    spec = SamplerSpec("ddim", steps=2, spacing="trailing")
    out = interpolate(bundle, keys, [PROMPT], InterpolationOptions(spec, skip_frames=(3, 1)),
                      generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 4, frames_after_passes(3, 2), 8, 8)
    assert torch.equal(out[:, :, ::16], keys)  # keyframes pass through both passes unchanged
    # w = 0: the conditional branch alone, checked against sampling it by hand (the UNet called directly)
    got = interpolate(bundle, keys, [PROMPT], InterpolationOptions(spec, guidance=0.0, skip_frames=(3,)),
                      generator=torch.Generator().manual_seed(1))
    text = model.context([PROMPT])
    x_T = torch.randn((1, 12, 2, 8, 8), generator=torch.Generator().manual_seed(1))

    def direct(x, t):
        keep = torch.ones(1)
        return model.unet(gap_input(x, keys, keep), t, text.tokens, text.mask, skip_frames=torch.full((1,), 3),
                          temporal_mask=keep)

    new = sample(direct, schedule, x_T, spec, target="v")
    assert torch.allclose(got, merge_gaps(keys, new, 3), atol=1e-5)


def test_interpolation_condition_is_the_unet_call_on_the_gap_input(interpolation_run):
    """denoiser(x, t, InterpolationCondition) is the UNet on [left | x_t | right] per gap with the
    pass's skip_frames and `keep` as the temporal mask (the old interpolation_net), for Prompts and
    TextContext alike; keep 0 is the unconditional branch (zeroed keyframes)."""
    model = load_bundle(interpolation_run, "interpolation").denoiser
    g = torch.Generator().manual_seed(3)
    keys, x = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 12, 2, 8, 8, generator=g)
    t, keep = torch.tensor([100, 900]), torch.tensor([1.0, 0.0])
    prompts = [PROMPT, "a red circle moving left quickly on a black background"]
    text = model.context(prompts)
    with torch.no_grad():
        for skip in (3, 1):
            direct = model.unet(gap_input(x, keys, keep), t, text.tokens, text.mask,
                                skip_frames=torch.full((2,), skip), temporal_mask=keep)
            for cond_text in (text, Prompts(prompts)):
                assert torch.equal(model(x, t, InterpolationCondition(cond_text, keys, keep, skip)), direct)
    with pytest.raises(ValueError, match="keys must be"):
        InterpolationCondition(text, keys[:, :, 0], keep, 3)


def test_gap_blend_is_linear_between_keyframes():
    frames = torch.arange(9, dtype=torch.float32).reshape(1, 1, 9, 1, 1).expand(2, 4, 9, 3, 3).clone()
    keys, new = split_gaps(frames, 3)
    assert torch.allclose(gap_blend(keys, 3), new)  # frames linear in time: the blend is exact
    keys = torch.randn(2, 4, 3, 5, 5)
    blend = merge_gaps(keys, gap_blend(keys, 3), 3)
    assert torch.allclose(blend[:, :, 2], (keys[:, :, 0] + keys[:, :, 1]) / 2, atol=1e-6)
    assert torch.allclose(blend[:, :, 5], 0.75 * keys[:, :, 1] + 0.25 * keys[:, :, 2], atol=1e-6)


def test_residual_recipe_starts_as_the_blend_and_trains(tmp_path, shapes_shards, movq_run, t2i_run):
    overrides = {"recipe.residual": "true", "recipe.diffusion.target": "x0"}
    cfg = load_config([CONFIG], tiny_interpolation_overrides(tmp_path / "a", shapes_shards, movq_run, t2i_run,
                                                             **overrides))
    stage = InterpolationStage(cfg, torch.device("cpu"))
    model = stage.build_model().eval()
    keys = torch.randn(1, 4, 3, 8, 8)
    options = InterpolationOptions(SamplerSpec("ddim", steps=3, spacing="trailing"), skip_frames=(3,), residual=True)
    out = interpolate(stage.bundle(model), keys, [PROMPT], options, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, merge_gaps(keys, gap_blend(keys, 3), 3), atol=1e-6)  # zero residual at init
    run = tmp_path / "run"
    train(load_config([CONFIG], tiny_interpolation_overrides(run, shapes_shards, movq_run, t2i_run, **overrides,
                                                             **{"train.max_steps": 2, "train.checkpoint_every": 2})))
    bundle = load_bundle(run, "interpolation", which="model")
    model, cfg = bundle.denoiser, bundle.cfg
    assert InterpolationOptions.from_recipe(cfg).residual
    assert cfg.recipe.residual and model.unet.out_layer[2].weight.abs().sum() > 0  # the output conv learned


def test_interpolation_config_errors(tmp_path, shapes_shards, movq_run, t2i_run):
    from kvideo.train.stages import STAGES

    cfg = load_config([CONFIG], tiny_interpolation_overrides(tmp_path, shapes_shards, movq_run, t2i_run,
                                                             **{"data.num_frames": 8}))
    with pytest.raises(ValueError, match="data.num_frames = 8 is too short"):
        STAGES["interpolation"](cfg, torch.device("cpu"))


def test_input_and_output_convs_start_from_the_t2i_convs(tmp_path, shapes_shards, movq_run, t2i_run):
    from kvideo.inference.checkpoints import load_stage_weights

    image, _ = load_stage_weights(t2i_run, "t2i")
    w_in, w_out = image["unet.in_layer.weight"], image["unet.out_layer.2.weight"]
    # (the residual recipe zeroes the output conv instead: test_residual_recipe_starts_as_the_blend_and_trains)
    overrides = tiny_interpolation_overrides(tmp_path, shapes_shards, movq_run, t2i_run, **{"recipe.residual": "false"})
    spread = build_interpolation_model(load_config([CONFIG], overrides)).unet
    assert torch.equal(spread.in_layer.weight[:, :4], torch.zeros_like(w_in))  # left keyframe
    assert torch.allclose(spread.in_layer.weight[:, 4:8], w_in / 3) and torch.allclose(spread.in_layer.weight[:, 12:16], w_in / 3)
    assert torch.equal(spread.out_layer[2].weight[8:], w_out)
    fresh = build_interpolation_model(load_config([CONFIG], overrides + ["recipe.init_convs=fresh"])).unet
    assert not torch.allclose(fresh.in_layer.weight[:, 4:8], w_in / 3)
    with pytest.raises(ValueError, match="recipe.init_convs"):
        build_interpolation_model(load_config([CONFIG], overrides + ["recipe.init_convs=copy"]))


def test_released_interpolation_config_size():
    info = model_info(load_config([ROOT / "configs" / "interpolation" / "kandinsky.yaml"], require_complete=False))
    assert abs(info["total_params"] / 3.98e9 - 1) < 0.02


def test_linear_blend_is_exact_on_a_linear_ramp():
    from tools.evaluate_interpolation import linear_blend

    t = torch.arange(9, dtype=torch.float32)  # 9 frames = 2 gaps of 3 new frames
    video = (t[None, :, None, None] * torch.ones(3, 9, 2, 2)) / 8
    blend = linear_blend(video[:, ::4], 3)
    torch.testing.assert_close(blend, video[:, [1, 2, 3, 5, 6, 7]])


def test_evaluate_interpolation_against_blending(tmp_path, interpolation_run, capsys):
    import json

    from tools import evaluate_interpolation

    code = evaluate_interpolation.main(["--checkpoint", str(interpolation_run), "--limit", "2", "--steps", "1",
                                        "--out", str(tmp_path)])
    assert code == 0
    r = json.loads((tmp_path / "results.json").read_text())[0]
    assert r["all"]["n"] == 4 and r["seen"]["n"] == 2 and r["held_out"]["n"] == 2
    assert r["all"]["model_psnr"] > 0 and r["all"]["ceiling_psnr"] > 0
    assert r["all"]["model_minus_blend_db"] == pytest.approx(r["all"]["model_psnr"] - r["all"]["blend_psnr"])
    assert list(tmp_path.glob("*.png")) and "| step_" in capsys.readouterr().out


def test_sample_interpolation_inserts_frames(tmp_path, interpolation_run):
    import numpy as np

    import sample
    from kvideo.data.video_io import probe, read_video, write_video

    keys = tmp_path / "keys.mp4"
    write_video(str(keys), np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8), fps=6)
    out = tmp_path / "video.mp4"
    code = sample.main(["--stage", "interpolation", "--checkpoint", str(interpolation_run), "--input", str(keys),
                        "--prompt", PROMPT, "--out", str(out), "--steps", "1"])
    assert code == 0
    frames, _ = read_video(str(out))
    assert frames.shape == (4 * 3 - 3, 32, 32, 3) and probe(str(out))["fps"] == pytest.approx(24.0)
    assert sample.main(["--stage", "interpolation", "--checkpoint", str(interpolation_run), "--input", str(keys),
                        "--out", str(out), "--passes", "2"]) == 2
    # without a prompt: the null text, as the unconditional branch
    assert sample.main(["--stage", "interpolation", "--checkpoint", str(interpolation_run), "--input", str(keys),
                        "--out", str(out), "--steps", "1"]) == 0
