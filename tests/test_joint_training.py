"""Joint image-video training and motion-free guidance in the keyframe stage."""

from dataclasses import dataclass, replace

import pytest
import torch

from kvideo.diffusion import GuidanceTerm, SamplerSpec, sample, text_image_guided
from kvideo.inference.conditioning import KeyframeCondition, Prompts, conditioned_input, select_rows
from kvideo.inference.loading import load_bundle
from kvideo.inference.sampling import KeyframeOptions, sample_keyframes
from kvideo.registry import load_config
from kvideo.train.stages.keyframe import KeyframeStage

from test_keyframe import KEYFRAME_CONFIG, PROMPT, keyframe_run, tiny_keyframe_overrides  # noqa: F401 (fixture)


@dataclass
class Cond:
    a: torch.Tensor
    mf: torch.Tensor


def test_motion_free_guidance_is_the_formula_in_one_forward():
    """eps_0 + w_I (eps_I - eps_0) + w_T (eps_TI - eps_I) + w_M (eps_TI - eps_TI,mf), from one
    batched forward of four branches, against the four predictions computed one by one."""
    calls = []

    def net(x, t, cond):
        calls.append(x.shape[0])
        return x * cond.a[:, None] + t[:, None] * 0.01 + cond.mf[:, None].float() * 3

    x, t = torch.randn(2, 5), torch.tensor([3, 7])
    ti, i, n = (Cond(torch.tensor([v, v + 0.5]), torch.zeros(2, dtype=torch.bool)) for v in (1.0, 2.0, 4.0))
    free = replace(ti, mf=torch.ones(2, dtype=torch.bool))
    w_t, w_i, w_m = 5.0, 2.0, 1.5
    got = text_image_guided(net, ti, i, n, w_t, w_i, [GuidanceTerm(free, w_m)])(x, t)
    assert calls == [8]  # one forward of 4 x 2 samples
    e_ti, e_i, e_0, e_mf = (net(x, t, c) for c in (ti, i, n, free))
    expected = e_0 + w_i * (e_i - e_0) + w_t * (e_ti - e_i) + w_m * (e_ti - e_mf)
    assert torch.allclose(got, expected, atol=1e-5)
    # w_M = 0 is the three-way guidance, three branches
    calls.clear()
    three = text_image_guided(net, ti, i, n, w_t, w_i, [GuidanceTerm(free, 0.0)])(x, t)
    assert calls == [6] and torch.allclose(three, expected - w_m * (e_ti - e_mf), atol=1e-5)


def test_sample_keyframes_motion_branch_is_the_motion_free_unet_call(keyframe_run):  # noqa: F811
    """w_T = w_I = 0 and w_M = 1 leave eps_0 + eps_TI - eps_TI,mf: checked against sampling with
    the three UNet calls made by hand."""
    bundle = load_bundle(keyframe_run, "keyframe")
    model, scale = bundle.denoiser, bundle.recipe.motion.scale
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.unet.temporal_parameters():
            p.add_(0.05 * torch.randn_like(p))
    first = torch.randn(1, 4, 8, 8)
    text, null = model.context([PROMPT]), model.unconditional_context(1)

    def unet(ctx, has_image, free):
        return lambda x, t: model.unet(conditioned_input(x, first, torch.tensor([has_image])), t, ctx.tokens, ctx.mask,
                                       noise_aug_level=torch.zeros(1, dtype=torch.long),
                                       motion_score=torch.tensor([0.1]) * scale, motion_free=torch.tensor([free]))

    full, no_image, free = unet(text, 1.0, False), unet(null, 0.0, False), unet(text, 1.0, True)
    spec = SamplerSpec("ddim", steps=2)
    options = KeyframeOptions(spec, text_guidance=0.0, image_guidance=0.0, noise_aug_level=0, num_frames=3,
                              motion_guidance=1.0)
    with torch.no_grad():
        got = sample_keyframes(bundle, [PROMPT], first, 0.1, options, generator=torch.Generator().manual_seed(1))
        x_T = torch.randn((1, 4, 3, 8, 8), generator=torch.Generator().manual_seed(1))
        expected = sample(lambda x, t: no_image(x, t) + full(x, t) - free(x, t), bundle.schedule, x_T, spec,
                          target="eps")
        assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
        plain = sample_keyframes(bundle, [PROMPT], first, 0.1, replace(options, motion_guidance=0.0),
                                 generator=torch.Generator().manual_seed(1))
        assert not torch.allclose(got, plain, atol=1e-4)


@pytest.fixture
def stage_and_model(tmp_path, shapes_shards, movq_run, t2i_run):
    def make(**extra):
        cfg = load_config([KEYFRAME_CONFIG], tiny_keyframe_overrides(tmp_path / "run", shapes_shards, movq_run, t2i_run,
                                                                     **extra))
        stage = KeyframeStage(cfg, torch.device("cpu"))
        return stage, stage.build_model()
    return make


def _batch(b=4, f=4):
    g = torch.Generator().manual_seed(0)
    return {"latents": torch.randn(b, 4, f, 8, 8, generator=g), "caption": [PROMPT] * b,
            "motion_score": torch.rand(b, generator=g)}


def test_image_samples_are_single_frames_in_image_mode_and_losses_are_per_kind(stage_and_model):
    stage, model = stage_and_model(**{"recipe.images.share": 0.5, "recipe.motion_free": 1.0})
    seen = []

    def net(x_t, t, cond):
        seen.append((tuple(x_t.shape), cond.image_mode, cond.motion_free, cond.has_image.clone()))
        return model(x_t, t, cond)

    batch = _batch()
    torch.manual_seed(4)
    with torch.no_grad():
        loss, logs = stage.loss(model, {"main": net}, batch, 0, "main")
    kinds = {s[1]: s for s in seen}
    assert set(kinds) == {False, True}, seen  # one video call and one image call in the step
    video, image = kinds[False], kinds[True]
    assert video[0][2] == 4 and image[0][2] == 1 and video[0][0] + image[0][0] == 4
    assert image[2] is None and not image[3].any()  # images: no first frame, no temporal layer to free
    assert video[2].all()  # recipe.motion_free 1.0: every video sample motion-free
    assert {"keyframe/mse_video", "keyframe/mse_image", "keyframe/mse"} <= set(logs)
    n_video, n_image = video[0][0], image[0][0]
    expected = (logs["keyframe/mse_video"] * n_video + logs["keyframe/mse_image"] * n_image) / 4
    assert float(loss) == pytest.approx(expected, rel=1e-5)  # plain MSE: the loss is the sample-weighted mean


def test_an_image_sample_is_the_spatial_unet_on_one_frame(stage_and_model):
    """The image call bypasses every temporal layer: the UNet in image mode on [x_t | 0 | 0]."""
    _, model = stage_and_model()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.unet.temporal_parameters():
            p.add_(0.05 * torch.randn_like(p))
        x, t = torch.randn(2, 4, 1, 8, 8), torch.tensor([5, 600])
        cond = KeyframeCondition(Prompts([PROMPT, ""]), torch.zeros(2, 4, 8, 8), torch.zeros(2), torch.zeros(2),
                                 torch.tensor([0.1, 0.3]), 300.0, image_mode=True)
        got = model(x, t, cond)
        text = model.context([PROMPT, ""])
        plain = conditioned_input(x, torch.zeros(2, 4, 8, 8), torch.zeros(2))
        expected = model.unet(plain, t, text.tokens, text.mask, temporal=False)
        assert torch.equal(got, expected)
        assert not torch.allclose(got, model.unet(plain, t, text.tokens, text.mask), atol=1e-5)
    with pytest.raises(ValueError, match="one frame"):
        model(torch.randn(2, 4, 3, 8, 8), t, cond)


def test_select_rows_takes_every_tensor_and_prompt():
    cond = KeyframeCondition(Prompts(["a", "b", "c"], torch.tensor([True, False, True])), torch.randn(3, 4, 2, 2),
                             torch.ones(3), torch.tensor([1, 2, 3]), torch.rand(3), 2.0, torch.tensor([True, False, False]))
    rows = torch.tensor([False, True, True])
    got = select_rows(cond, rows)
    assert got.text.texts == ["b", "c"] and got.text.drop.tolist() == [False, True]
    assert torch.equal(got.first, cond.first[1:]) and got.noise_level.tolist() == [2, 3]
    assert got.motion_free.tolist() == [False, False] and got.motion_scale == 2.0


def test_first_frames_from_the_keyframe_checkpoint_in_image_mode(keyframe_run):  # noqa: F811
    """One UNet for first frames and keyframes: sample_first_frames on a keyframe bundle is the
    video UNet in image mode with text guidance, and the pipeline option uses it."""
    from kvideo.diffusion import text_guided
    from kvideo.inference.sampling import FirstFrameOptions, sample_first_frames
    from kvideo.pipeline import Pipeline, PipelineConfig

    bundle = load_bundle(keyframe_run, "keyframe")
    model = bundle.denoiser
    options = FirstFrameOptions.from_recipe(bundle.cfg, sampler="ddim", steps=2, height=32, width=32)
    assert options.guidance == bundle.cfg.recipe.sampling.text_guidance
    with torch.no_grad():
        got = sample_first_frames(bundle, [PROMPT], options, generator=torch.Generator().manual_seed(1))
        text, null = model.context([PROMPT]), model.unconditional_context(1)
        zero = torch.zeros(1, 4, 8, 8)

        def image_mode(ctx):
            return lambda x, t: model.unet(conditioned_input(x, zero, torch.zeros(1)), t, ctx.tokens, ctx.mask,
                                           temporal=False)

        x_T = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1))[:, :, None]
        w = options.guidance
        latents = sample(lambda x, t: (w + 1) * image_mode(text)(x, t) - w * image_mode(null)(x, t), bundle.schedule,
                         x_T, options.spec, target=bundle.recipe.diffusion.target, data_range=bundle.recipe.latent_scale)
        expected = bundle.movq.decode(latents[:, :, 0] / bundle.recipe.latent_scale).clamp(-1, 1)
        assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert text_guided  # the branches are stacked as text_guided stacks them (one forward)
    pipe = Pipeline(PipelineConfig(keyframe=str(keyframe_run), first_frame_model="keyframe", first_frame_scale=1))
    out = pipe([PROMPT], t2i_sampler="ddim", t2i_steps=2, keyframe_steps=2, num_keyframes=3, fps_preset="low",
               progress=False)
    assert out.settings["first_frame"]["source"] == "keyframe" and out.frames.shape[2] == 3
    with pytest.raises(ValueError, match="first_frame_model"):
        Pipeline(PipelineConfig(keyframe=str(keyframe_run), t2i=str(keyframe_run), first_frame_model="keyframe"))


def write_image_shards(root, n_good=4):
    """n_good good image samples (png or jpg + caption), a bad caption, an undecodable png, and a
    caption without an image, in one tar shard."""
    import io
    import json
    import tarfile

    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(root / "images-000000.tar", "w") as tar:
        for i in range(n_good):
            buf = io.BytesIO()
            fmt = "PNG" if i % 2 == 0 else "JPEG"
            Image.fromarray(np.full((20, 30, 3), 40 * i, dtype=np.uint8)).save(buf, format=fmt)
            add(tar, f"img{i}.{'png' if fmt == 'PNG' else 'jpg'}", buf.getvalue())
            add(tar, f"img{i}.json", json.dumps({"caption": f"picture {i}"}).encode())
        if n_good:
            add(tar, "badcap.png", buf.getvalue())
            add(tar, "badcap.json", json.dumps({"caption": ""}).encode())
            add(tar, "broken.png", b"not a png at all")
            add(tar, "broken.json", json.dumps({"caption": "broken"}).encode())
        add(tar, "noimage.json", json.dumps({"caption": "no image"}).encode())
    return root


def test_image_shards_draw_by_step_skip_bad_samples_and_resume_exactly(tmp_path):
    from kvideo.data.image_shards import ImageShards

    shards = write_image_shards(tmp_path / "images")
    images = ImageShards(str(shards), (16, 16), seed=3)
    assert len(images) == 6  # the caption without an image is no image sample
    seen = []
    for step in range(6):
        frames, captions = images.draw(step, 3, per_step=4)
        assert frames.shape == (3, 3, 16, 16) and frames.min() >= -1 and frames.max() <= 1
        assert all(c.startswith("picture ") for c in captions)  # the bad ones were skipped
        seen += captions
    assert set(seen) == {f"picture {i}" for i in range(4)}
    assert images.skipped["caption"] >= 1 and images.skipped["undecodable"] >= 1
    again = ImageShards(str(shards), (16, 16), seed=3)  # a resumed run: the same images at the same step
    a, b = images.draw(4, 2, per_step=4), again.draw(4, 2, per_step=4)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    other_rank = images.draw(4, 2, per_step=4, rank=1, world=2)
    assert images.draw(4, 2, per_step=4, rank=0, world=2)[1] != other_rank[1]  # ranks draw other positions
    with pytest.raises(RuntimeError, match="no image sample"):
        ImageShards(str(write_image_shards(tmp_path / "none", n_good=0)), (16, 16))


def test_image_samples_from_image_shards_carry_their_captions(stage_and_model, tmp_path):
    shards = write_image_shards(tmp_path / "images")
    stage, model = stage_and_model(**{"recipe.images.share": 1.0, "recipe.images.source": "shards",
                                      "recipe.images.shards": str(shards), "recipe.dropout.text": 0.0,
                                      "recipe.dropout.both": 0.0})
    seen = []

    def net(x_t, t, cond):
        seen.append((tuple(x_t.shape), cond.text.texts))
        return model(x_t, t, cond)

    with torch.no_grad():
        loss, logs = stage.loss(model, {"main": net}, _batch(), 0, "main")
    # share 1.0 keeps one clip (every step trains the temporal layers); the other three are images
    video, image = sorted(seen, key=lambda s: s[0][2], reverse=True)
    assert len(seen) == 2 and video[0][:3] == (1, 4, 4) and image[0][:3] == (3, 4, 1)
    assert all(c.startswith("picture ") for c in image[1]) and video[1] == [PROMPT]
    assert torch.isfinite(loss) and "keyframe/mse_image" in logs and "data/skipped_images" in logs
    with pytest.raises(ValueError, match="recipe.images.shards"):
        stage_and_model(**{"recipe.images.source": "shards"})


def test_joint_training_runs_on_two_ddp_processes(tmp_path, shapes_shards, movq_run, t2i_run):
    """Joint training on two DDP processes, where a step may have images on one rank and none on
    the other, or only images drawn (share 0.9 of a batch of 2): the run must neither fail nor
    hang. (Before the null context stayed in the graph, any keyframe run on two ranks failed:
    a step that dropped no caption left the null embedding without a gradient.)"""
    from kvideo.inference import checkpoints as ckpt

    from test_engine import _run_script

    run = tmp_path / "run"
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", str(KEYFRAME_CONFIG),
            *tiny_keyframe_overrides(run, shapes_shards, movq_run, t2i_run, **{
                "train.max_steps": 4, "train.num_threads": 1, "recipe.images.share": 0.9, "recipe.motion_free": 0.5,
                "train.preview_every": 0})]
    proc = _run_script(args, {"OMP_NUM_THREADS": "1"})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert ckpt.latest_checkpoint(run).name == "step_0000004"
