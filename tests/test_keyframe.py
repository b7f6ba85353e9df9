"""Stage keyframe on tiny models: initialised from a t2i run, conditioning, dropout, guidance, I2V."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kvideo.diffusion import SamplerSpec, sample, with_known
from kvideo.inference.conditioning import KeyframeCondition, Prompts, conditioned_input
from kvideo.inference.denoiser import make_schedule
from kvideo.inference.loading import load_bundle
from kvideo.inference.sampling import KeyframeOptions, resolve_motion_score, sample_keyframes, sampling_noise_level
from kvideo.recipes import ConditionDropout, MotionConfig, NoiseAugConfig
from kvideo.registry import load_config
from kvideo.inference import checkpoints as ckpt
from kvideo.train.engine import train
from kvideo.train.stages.keyframe import KeyframeStage, draw_dropout, draw_noise_levels

from conftest import ROOT, tiny_t2i_overrides

KEYFRAME_CONFIG = ROOT / "configs" / "keyframe" / "shapes.yaml"
PROMPT = "a red circle moving left quickly on a black background"


def tiny_keyframe_overrides(run_dir, shards, movq_run, t2i_run, **extra):
    values = dict(item.split("=", 1) for item in tiny_t2i_overrides(run_dir, shards, movq_run))
    values.update({"data.num_frames": 4, "data.fps": 12.0, "recipe.init_from": str(t2i_run), "train.batch_size": 2,
                   "recipe.latent_scale": 1.0, "recipe.diffusion.target": "eps", "recipe.sampling.steps": 2,
                   "recipe.sampling.spacing": "leading"})  # eps cannot start at the zero-SNR t = 999
    values.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def keyframe_run(tmp_path_factory, shapes_shards, movq_run, t2i_run) -> Path:
    run = tmp_path_factory.mktemp("keyframe")
    train(load_config([KEYFRAME_CONFIG], tiny_keyframe_overrides(run, shapes_shards, movq_run, t2i_run)))
    return run


def test_keyframe_trains_from_the_t2i_checkpoint(keyframe_run, t2i_run):
    last = ckpt.latest_checkpoint(keyframe_run)
    assert last.name == "step_0000003"
    assert '"keyframe/mse"' in (keyframe_run / "metrics.jsonl").read_text()
    assert (keyframe_run / "previews" / "step_0000003.png").is_file()
    weights = ckpt.load_weights(last, "model")[0]
    assert any(k.startswith("unet.temporal_down") for k in weights)
    assert weights["unet.in_layer.weight"].shape[1] == 9  # x_t | first frame | mask


def test_a_sampling_plan_the_model_cannot_follow_stops_before_training(tmp_path, shapes_shards, movq_run, t2i_run):
    overrides = tiny_keyframe_overrides(tmp_path / "run", shapes_shards, movq_run, t2i_run,
                                        **{"recipe.sampling.spacing": "trailing"})
    with pytest.raises(ValueError, match=r"recipe.sampling \(spacing 'trailing'\) with recipe.diffusion \(target 'eps'\)"):
        train(load_config([KEYFRAME_CONFIG], overrides))
    assert not (tmp_path / "run" / "checkpoints").exists()


def build_keyframe_model(cfg):
    """The keyframe model as training builds it (recipe.init_from loaded in)."""
    return KeyframeStage(cfg, torch.device("cpu")).build_model()


def test_init_from_loads_spatial_weights_and_train_spatial_false_freezes_them(tmp_path, shapes_shards, movq_run,
                                                                              t2i_run):
    t2i_weights = ckpt.load_weights(ckpt.latest_checkpoint(t2i_run), "ema")[0]
    cfg = load_config([KEYFRAME_CONFIG], tiny_keyframe_overrides(tmp_path / "a", shapes_shards, movq_run, t2i_run))
    model = build_keyframe_model(cfg)
    state = model.state_dict()
    for key, value in t2i_weights.items():
        if key == "unet.in_layer.weight":
            assert torch.equal(state[key][:, :4], value) and not state[key][:, 4:].any()
        else:
            assert torch.equal(state[key], value), key
    # the 1.0 recipe: spatial layers frozen through a real training run
    run = tmp_path / "frozen"
    train(load_config([KEYFRAME_CONFIG], tiny_keyframe_overrides(run, shapes_shards, movq_run, t2i_run, **{
        "recipe.train_spatial": "false", "train.max_steps": 2, "train.checkpoint_every": 2,
        "train.preview_every": 0, "train.lr": 0.01})))
    after = ckpt.load_weights(ckpt.latest_checkpoint(run), "model")[0]
    for key, value in t2i_weights.items():
        if key.startswith("unet.down_samples") or key.startswith("text."):
            assert torch.equal(after[key], value), key
    moved = [k for k in after if k.startswith("unet.temporal") and not torch.equal(after[k], state[k])]
    assert moved  # the temporal layers trained


def test_spatial_lr_scale_trains_loaded_layers_slower(tmp_path, shapes_shards, movq_run, t2i_run):
    import json

    from kvideo.train.stages.base import Phase
    from kvideo.train.stages.diffusion import video_phase

    cfg = load_config([KEYFRAME_CONFIG], tiny_keyframe_overrides(tmp_path / "a", shapes_shards, movq_run, t2i_run))
    model = build_keyframe_model(cfg)
    groups = video_phase(model, 0.25).param_groups(1e-3)
    assert [g["name"] for g in groups] == ["spatial", "rest"] and groups[0]["lr"] == 0.25e-3
    temporal = {id(p) for p in model.unet.temporal_parameters()}
    assert {id(p) for p in groups[1]["params"]} == temporal
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])
    assert len(video_phase(model, 1.0).param_groups(1e-3)) == 1
    with pytest.raises(ValueError, match="in both"):
        Phase("main", model, lr_scales=[("a", list(model.unet.parameters()), 0.5),
                                        ("b", list(model.unet.in_layer.parameters()), 0.5)]).param_groups(1e-3)
    # a real run logs both rates, the spatial one at the scale through the schedule
    run = tmp_path / "scaled"
    train(load_config([KEYFRAME_CONFIG], tiny_keyframe_overrides(run, shapes_shards, movq_run, t2i_run, **{
        "recipe.spatial_lr_scale": 0.25, "train.max_steps": 2, "train.checkpoint_every": 2,
        "train.preview_every": 0})))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "main/lr_spatial" in r]
    assert logged and all(r["main/lr_spatial"] == pytest.approx(0.25 * r["main/lr"]) for r in logged)


def test_conditioned_input_layout():
    x_t, first = torch.randn(2, 4, 3, 5, 5), torch.randn(2, 4, 5, 5)
    out = conditioned_input(x_t, first, torch.tensor([True, False]))
    assert out.shape == (2, 9, 3, 5, 5)
    assert torch.equal(out[:, :4], x_t)
    assert torch.equal(out[0, 4:8, 0], first[0]) and not out[0, 4:8, 1:].any()
    assert not out[1, 4:].any()  # no image: zeros and mask 0
    assert torch.equal(out[0, 8, 0], torch.ones(5, 5)) and not out[0, 8, 1:].any()
    every = conditioned_input(x_t, first, torch.tensor([True, False]), everywhere=True)
    assert torch.equal(every[:, :4], x_t) and torch.equal(every[:, 8], out[:, 8])  # the same mask
    assert all(torch.equal(every[0, 4:8, i], first[0]) for i in range(3)) and not every[1, 4:].any()


def test_conditioning_dropout_rates_are_disjoint_and_as_configured():
    g = torch.Generator().manual_seed(0)
    text, image = draw_dropout(ConditionDropout(text=0.1, image=0.2, both=0.05), 200_000, g)
    both = (text & image).float().mean()
    assert abs(float(both) - 0.05) < 0.005
    assert abs(float((text & ~image).float().mean()) - 0.1) < 0.005
    assert abs(float((image & ~text).float().mean()) - 0.2) < 0.005
    with pytest.raises(ValueError, match="recipe.dropout"):
        draw_dropout(ConditionDropout(text=0.5, image=0.5, both=0.1), 4)


def test_noise_augmentation_levels():
    g = torch.Generator().manual_seed(0)
    levels = draw_noise_levels(NoiseAugConfig(max_level=100), 50_000, g)
    assert levels.min() == 0 and levels.max() == 100 and abs(float(levels.float().mean()) - 50) < 1
    log_levels = draw_noise_levels(NoiseAugConfig(distribution="log_uniform", max_level=100), 50_000, g)
    assert log_levels.max() <= 100 and float(log_levels.float().median()) < 15  # favours small levels
    assert not draw_noise_levels(NoiseAugConfig(enabled=False), 10).any()
    # sampling gives the level the model was trained with: 0 for a model trained without augmentation
    assert sampling_noise_level(NoiseAugConfig(sample_level=20)) == 20
    assert sampling_noise_level(NoiseAugConfig(enabled=False, sample_level=20)) == 0
    with pytest.raises(ValueError, match="distribution"):
        draw_noise_levels(NoiseAugConfig(distribution="beta"), 4)


def test_motion_presets_and_numbers():
    cfg = MotionConfig(presets={"slow": 0.06, "fast": 0.16}, default="slow")
    assert resolve_motion_score(cfg, "fast") == 0.16
    assert resolve_motion_score(cfg, "0.3") == 0.3 and resolve_motion_score(cfg, None) == 0.06
    with pytest.raises(ValueError, match="slow=0.06, fast=0.16"):
        resolve_motion_score(cfg, "normal")
    # every preset of the shipped configs resolves, and so does each config's default
    for name in ("shapes", "kandinsky"):
        rc = load_config([ROOT / "configs" / "keyframe" / f"{name}.yaml"], require_complete=False).recipe
        for preset in list(rc.motion.presets) + [None]:
            resolve_motion_score(rc.motion, preset)


def test_three_way_guidance_branches_are_the_right_conditions(keyframe_run):
    """w_T = w_I = 1 gives the text+image branch alone and w_T = w_I = 0 the unconditional one,
    each checked against sampling with that branch built by hand (the UNet called directly)."""
    bundle = load_bundle(keyframe_run, "keyframe")
    model, cfg = bundle.denoiser, bundle.cfg
    torch.manual_seed(0)
    with torch.no_grad():  # a trained model's temporal layers are not identities: make them matter
        for p in model.unet.temporal_parameters():
            p.add_(0.05 * torch.randn_like(p))
    schedule = make_schedule(cfg.recipe.diffusion)
    assert torch.equal(schedule.alphas_cumprod, bundle.schedule.alphas_cumprod)
    assert cfg.recipe.diffusion.target == "eps" and cfg.recipe.latent_scale == 1.0
    first = torch.randn(1, 4, 8, 8)
    scale = cfg.recipe.motion.scale

    def options(w, **changes):
        return KeyframeOptions(SamplerSpec("ddim", steps=2), text_guidance=w, image_guidance=w,
                               **{"noise_aug_level": 0, "num_frames": 3, **changes})

    def unet_call(ctx, ctx_mask, has_image, motion=0.1):
        def direct(x, t):
            return model.unet(conditioned_input(x, first, torch.tensor([has_image])), t, ctx, ctx_mask,
                              noise_aug_level=torch.zeros(1, dtype=torch.long),
                              motion_score=torch.tensor([motion]) * scale)
        return direct

    text = model.context([PROMPT])
    tokens, mask = text.tokens, text.mask
    null_tokens, null_mask = model.text.null_context(1)
    for w, (ctx, ctx_mask, has_image) in ((1.0, (tokens, mask, 1.0)), (0.0, (null_tokens, null_mask, 0.0))):
        got = sample_keyframes(bundle, [PROMPT], first, 0.1, options(w), generator=torch.Generator().manual_seed(1))
        x_T = torch.randn((1, 4, 3, 8, 8), generator=torch.Generator().manual_seed(1))
        expected = sample(unet_call(ctx, ctx_mask, has_image), schedule, x_T, SamplerSpec("ddim", steps=2), target="eps")
        assert torch.allclose(got, expected, atol=1e-4), (w, (got - expected).abs().max())
    # without the first frame a branch has noise level 0, as in training (where the image is
    # dropped the level is zeroed): the unconditional branch, and use_image=False's text branch
    g = torch.Generator().manual_seed(1)
    torch.randn(first.shape, generator=g)  # the noise-augmentation draw comes first
    x_T = torch.randn((1, 4, 3, 8, 8), generator=g)
    for w, use_image, ctx, ctx_mask in ((0.0, True, null_tokens, null_mask), (1.0, False, tokens, mask)):
        got = sample_keyframes(bundle, [PROMPT], first, 0.1, options(w, use_image=use_image, noise_aug_level=20),
                               generator=torch.Generator().manual_seed(1))
        expected = sample(unet_call(ctx, ctx_mask, 0.0), schedule, x_T, SamplerSpec("ddim", steps=2), target="eps")
        assert torch.allclose(got, expected, atol=1e-4), (w, use_image, (got - expected).abs().max())
    # the motion score reaches the model (through recipe.motion.scale)
    faster = sample_keyframes(bundle, [PROMPT], first, 0.5, options(1.0), generator=torch.Generator().manual_seed(1))
    slower = sample_keyframes(bundle, [PROMPT], first, 0.1, options(1.0), generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(faster, slower, atol=1e-4)
    # keep_first_frame: the same guided call with frame 0's x0 held to the clean first frame
    # (noise augmentation reaches only the model's conditioning channels), kept exactly
    with_image = unet_call(tokens, mask, 1.0)
    held = sample_keyframes(bundle, [PROMPT], first, 0.1, options(1.0, keep_first_frame=True),
                            generator=torch.Generator().manual_seed(1))
    frame0 = torch.zeros(1, 1, 3, 1, 1, dtype=torch.bool)
    frame0[:, :, 0] = True
    x_T = torch.randn((1, 4, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    expected = sample(with_known(with_image, schedule, "eps", first[:, :, None], frame0), schedule, x_T,
                      SamplerSpec("ddim", steps=2), target="eps")
    assert torch.allclose(held, expected, atol=1e-4), (held - expected).abs().max()
    assert torch.allclose(held[:, :, 0], first, atol=1e-5)
    free = sample_keyframes(bundle, [PROMPT], first, 0.1, options(1.0), generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(free[:, :, 1:], held[:, :, 1:], atol=1e-4)


def test_keyframe_condition_is_the_unet_call_on_the_conditioned_input(keyframe_run):
    """denoiser(x, t, KeyframeCondition) is the UNet on [x_t | first | mask] with the level and the
    motion score times recipe.motion.scale (the old keyframe_net), for Prompts and TextContext alike;
    `dropped` gives the training branches: null text, and no image at level 0."""
    bundle = load_bundle(keyframe_run, "keyframe")
    model, scale = bundle.denoiser, bundle.recipe.motion.scale
    g = torch.Generator().manual_seed(2)
    x, first = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t, level, motion = torch.tensor([10, 500]), torch.tensor([0, 30]), torch.tensor([0.1, 0.4])
    has_image = torch.tensor([1.0, 0.0])
    prompts = [PROMPT, "a blue square moving up slowly on a white background"]
    text = model.context(prompts)
    with torch.no_grad():
        direct = model.unet(conditioned_input(x, first, has_image), t, text.tokens, text.mask, noise_aug_level=level,
                            motion_score=motion * scale)
        for cond_text in (text, Prompts(prompts)):
            got = model(x, t, KeyframeCondition(cond_text, first, has_image, level, motion, scale))
            assert torch.equal(got, direct)
        # training's dropout: sample 0 loses its text, sample 1 its image
        cond = KeyframeCondition(Prompts(prompts), first, torch.ones(2, dtype=torch.bool), level.flip(0), motion, scale)
        dropped = cond.dropped(text=torch.tensor([True, False]), image=torch.tensor([False, True]))
        assert dropped.has_image.tolist() == [True, False] and dropped.noise_level.tolist() == [30, 0]
        mixed = model.context(prompts, drop=torch.tensor([True, False]))
        null_tokens, _ = model.text.null_context(1)
        assert torch.equal(mixed.tokens[0], null_tokens[0]) and torch.equal(mixed.tokens[1], text.tokens[1])
        expected = model.unet(conditioned_input(x, first, torch.tensor([True, False])), t, mixed.tokens, mixed.mask,
                              noise_aug_level=torch.tensor([30, 0]), motion_score=motion * scale)
        assert torch.equal(model(x, t, dropped), expected)
    with pytest.raises(ValueError, match="batch size"):
        KeyframeCondition(text, first[:1], has_image, level, motion, scale)
    # model.first_frame_everywhere: the model's own input layout, read by the network call
    model.unet.cfg.first_frame_everywhere = True
    try:
        with torch.no_grad():
            got = model(x, t, KeyframeCondition(text, first, has_image, level, motion, scale))
            every = model.unet(conditioned_input(x, first, has_image, everywhere=True), t, text.tokens, text.mask,
                               noise_aug_level=level, motion_score=motion * scale)
        assert torch.equal(got, every) and not torch.allclose(got, direct)
    finally:
        model.unet.cfg.first_frame_everywhere = False
    # model.anchor_first_frame: where an image is given, the first-frame latent is frame 0 of x_t
    # and frame 0's timestep is its noise level; the sample without an image is untouched
    model.unet.cfg.anchor_first_frame = True
    try:
        with torch.no_grad():
            got = model(x, t, KeyframeCondition(text, first, has_image, level, motion, scale))
            anchored_x = x.clone()
            anchored_x[0, :, 0] = first[0]
            frame_t = torch.tensor([[0, 10, 10], [500, 500, 500]])  # sample 0: level 0 at frame 0
            expected = model.unet(conditioned_input(anchored_x, first, has_image), frame_t, text.tokens, text.mask,
                                  noise_aug_level=level, motion_score=motion * scale)
        assert torch.equal(got, expected)
        assert torch.allclose(got[1], direct[1], atol=1e-5) and not torch.allclose(got[0], direct[0], atol=1e-4)
    finally:
        model.unet.cfg.anchor_first_frame = False


def test_anchor_first_frame_trains_on_the_other_frames_and_samples_the_first(tmp_path, shapes_shards, movq_run,
                                                                             t2i_run):
    """With model.anchor_first_frame the loss leaves frame 0 out where a first frame is given
    (the network's frame-0 output cannot move it) and counts it where the image is dropped;
    sampling returns the first frame as frame 0 exactly."""
    overrides = tiny_keyframe_overrides(tmp_path / "run", shapes_shards, movq_run, t2i_run,
                                        **{"model.anchor_first_frame": "true", "train.max_steps": 2})
    cfg = load_config([KEYFRAME_CONFIG], overrides)
    stages = {rate: KeyframeStage(load_config([KEYFRAME_CONFIG], overrides + [
        "recipe.dropout.text=0", "recipe.dropout.both=0", f"recipe.dropout.image={rate}"]), torch.device("cpu"))
        for rate in (0.0, 1.0)}
    model = stages[0.0].build_model()
    assert model.unet.cfg.anchor_first_frame
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(2, 4, 4, 8, 8, generator=g), "caption": [PROMPT, PROMPT],
             "motion_score": torch.tensor([0.1, 0.2])}

    def loss_with(frame0_offset, image_dropout):
        stage = stages[image_dropout]

        def net(x_t, t, cond):
            out = model(x_t, t, cond).clone()
            out[:, :, 0] += frame0_offset
            return out

        torch.manual_seed(3)
        return stage.loss(model, {"main": net}, batch, 0, "main")[0]

    with torch.no_grad():
        assert torch.equal(loss_with(0.0, 0.0), loss_with(50.0, 0.0))  # frame 0 is an input, not a target
        assert loss_with(50.0, 1.0) > loss_with(0.0, 1.0) + 100  # no image: frame 0 is denoised as any frame
    train(cfg)
    bundle = load_bundle(tmp_path / "run", "keyframe")
    first = torch.randn(1, 4, 8, 8, generator=g)
    options = KeyframeOptions(SamplerSpec("ddim", steps=2), num_frames=3, noise_aug_level=20)
    video = sample_keyframes(bundle, [PROMPT], first, 0.1, options, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(video[:, :, 0], first, atol=1e-5)


def _sample(tmp_path, monkeypatch, run, name, *extra):
    """sample.py's keyframe video (decoded from its mp4) and the frames it gave the encoder."""
    import sample
    import kvideo.data.video_io as video_io

    written, encode = [], video_io.write_video
    out = tmp_path / name
    with monkeypatch.context() as patch:
        patch.setattr(video_io, "write_video", lambda path, frames, fps: (written.append(frames.copy()),
                                                                           encode(path, frames, fps)))
        code = sample.main(["--stage", "keyframe", "--checkpoint", str(run), "--prompt", PROMPT, "--out", str(out),
                            "--steps", "2", "--sampler", "dpmpp_2m", *extra])
    assert code == 0 and len(written) == 1
    frames, _ = video_io.read_video(str(out))
    return frames, written[0]


def test_image_to_video_and_same_seed_same_video(tmp_path, monkeypatch, keyframe_run):
    image = tmp_path / "first.png"
    rgb = np.zeros((40, 48, 3), dtype=np.uint8)
    rgb[10:25, 12:30] = (230, 25, 25)
    Image.fromarray(rgb).save(image)
    same = ("--image", str(image), "--seed", "3", "--motion-score", "fast")
    a, a_frames = _sample(tmp_path, monkeypatch, keyframe_run, "a.mp4", *same)
    b, b_frames = _sample(tmp_path, monkeypatch, keyframe_run, "b.mp4", *same)
    assert a.shape == (4, 32, 32, 3)  # data.num_frames keyframes at the model's size
    # The frames, not the mp4s: x264 (through PyAV) now and then encodes identical frames
    # differently, and by more than a level (measured 2026-12-05: one frame 14 levels apart, at
    # random in about a third of runs after a training in the same process; see
    # kvideo.data.video_io.write_video). The sampling itself must be exact.
    assert np.array_equal(a_frames, b_frames)
    c, _ = _sample(tmp_path, monkeypatch, keyframe_run, "c.mp4", "--image", str(image), "--seed", "4",
                   "--motion-score", "0.0")
    assert not np.array_equal(a, c)
    # no --image: the first frame comes from the t2i run named by recipe.init_from
    d, _ = _sample(tmp_path, monkeypatch, keyframe_run, "d.mp4", "--seed", "3")
    assert d.shape == a.shape


def test_sample_keyframe_errors_are_clear(tmp_path, keyframe_run, capsys):
    import sample

    code = sample.main(["--stage", "keyframe", "--checkpoint", str(keyframe_run), "--prompt", PROMPT, "--out",
                        str(tmp_path / "x.mp4"), "--motion-score", "normal", "--image", str(ROOT / "README.md")])
    assert code == 2 and "README.md" in capsys.readouterr().err
    code = sample.main(["--stage", "keyframe", "--checkpoint", str(keyframe_run), "--prompt", PROMPT, "--out",
                        str(tmp_path / "x.mp4"), "--motion-score", "normal", "--steps", "1"])
    assert code == 2 and "unknown motion preset 'normal'" in capsys.readouterr().err


def test_evaluate_keyframes_scores_canonical_prompts(tmp_path, keyframe_run, capsys):
    import json

    from tools import evaluate_keyframes

    code = evaluate_keyframes.main(["--checkpoint", str(keyframe_run), "--all-checkpoints", "--limit", "2",
                                    "--steps", "1", "--motion-score", "fast", "--spacing", "leading",
                                    "--dynamic-threshold", "none", "--timestep-shift", "3", "--motion-guidance", "2",
                                    "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "results.json").read_text())[0]
    assert result["spacing"] == "leading" and result["dynamic_threshold"] is None and result["timestep_shift"] == 3
    assert result["motion_guidance"] == 2.0
    cvs = [r["area_cv"] for r in result["videos_detail"] if r["split"] == "seen" and r["area_cv"] is not None]
    expected_cv = sum(cvs) / len(cvs) if cvs else None
    assert result["seen"]["mean_area_cv"] == (pytest.approx(expected_cv) if cvs else None)
    assert "mean_color_drift" in result["seen"]
    asked = result["asked_px_per_24fps_frame"]
    assert set(result["all"]["speed_by_asked"]) == {"slow", "fast"} and abs(asked["fast"] / asked["slow"] - 3) < 1e-9
    # every canonical prompt's asked speed is its preset; the measured means are over those videos
    for name in ("slow", "fast"):
        speeds = [r["speed_px_per_24fps_frame"] for r in result["videos_detail"]
                  if r["asked_speed"] == name and r["speed_px_per_24fps_frame"] is not None]
        got = result["all"]["speed_by_asked"][name]
        assert (got is None) if not speeds else abs(got - sum(speeds) / len(speeds)) < 1e-9
    assert result["step"] == 3 and result["seen"]["n"] == 2 and result["held_out"]["n"] == 2
    assert all(r["motion_score"] == 0.164 for r in result["videos_detail"])
    assert 0.0 <= result["seen"]["direction"] <= 1.0 and result["seen"]["frame0_psnr"] > 0
    assert "| step_0000003 |" in capsys.readouterr().out
    # the tiny run predicts eps: trailing spacing would start it at the zero-SNR timestep
    assert evaluate_keyframes.main(["--checkpoint", str(keyframe_run), "--limit", "1", "--steps", "1",
                                    "--spacing", "trailing"]) == 2
    assert "start at the zero-SNR timestep 999" in capsys.readouterr().err
