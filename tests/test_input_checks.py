"""Bad values stop start-up with the dotted key or the argument's name: config ranges, data.size
against the model's downsampling, sampling settings, blank prompts and pictures of any kind."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import MOVQ_CONFIG, ROOT, T2I_CONFIG, tiny_movq_overrides
from kvideo.config import ConfigError
from kvideo.data.images import read_image
from kvideo.diffusion import SamplerSpec
from kvideo.inference.sampling import FirstFrameOptions, InterpolationOptions, KeyframeOptions
from kvideo.registry import load_config
from kvideo.train.engine import train

KEYFRAME = ROOT / "configs" / "keyframe" / "shapes.yaml"
INTERPOLATION = ROOT / "configs" / "interpolation" / "shapes.yaml"
BASE = ["run_dir=x", "data.shards=x", "recipe.movq=x"]


@pytest.mark.parametrize("config, override, message", [
    (KEYFRAME, "train.batch_size=0", "'train.batch_size' = 0: must be >= 1"),
    (KEYFRAME, "train.log_every=0", "'train.log_every' = 0: must be >= 1"),
    (KEYFRAME, "train.checkpoint_every=0", "'train.checkpoint_every' = 0: must be >= 1"),
    (KEYFRAME, "train.grad_accum=0", "'train.grad_accum' = 0: must be >= 1"),
    (KEYFRAME, "train.lr=-0.1", "'train.lr' = -0.1: must be >= 0"),
    (KEYFRAME, "train.betas=[0.9,1.0]", "'train.betas' = [0.9, 1.0]: must be a list whose every element is in [0, 1)"),
    (KEYFRAME, "train.schedule=cosin", "'train.schedule' = 'cosin': must be one of constant, cosine, linear"),
    (KEYFRAME, "data.fps=0", "'data.fps' = 0.0: must be > 0"),
    (KEYFRAME, "data.fps=-24", "'data.fps' = -24.0: must be > 0"),
    (KEYFRAME, "data.size=[64,0]", "'data.size' = [64, 0]: must be a list whose every element is >= 1"),
    (KEYFRAME, "data.timeout_s=-1", "'data.timeout_s' = -1.0: must be >= 0"),
    (KEYFRAME, "recipe.sampling.steps=0", "'recipe.sampling.steps' = 0: must be >= 1"),
    (KEYFRAME, "recipe.sampling.text_guidance=-1", "'recipe.sampling.text_guidance' = -1.0: must be >= 0"),
    (KEYFRAME, "recipe.sampling.sampler=euler", "'recipe.sampling.sampler' = 'euler': must be one of ddpm, ddim"),
    (KEYFRAME, "recipe.dropout.text=1.5", "'recipe.dropout.text' = 1.5: must be in [0, 1]"),
    (KEYFRAME, "recipe.noise_aug.max_level=-1", "'recipe.noise_aug.max_level' = -1: must be >= 0"),
    (KEYFRAME, "recipe.diffusion.target=epsilon", "'recipe.diffusion.target' = 'epsilon': must be one of eps"),
    (INTERPOLATION, "recipe.passes=[{stride: 0}]", "'recipe.passes.0.stride' = 0: must be >= 1"),
    (INTERPOLATION, "recipe.frames_per_gap=0", "'recipe.frames_per_gap' = 0: must be >= 1"),
])
def test_a_value_out_of_range_names_its_key(config, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config([config], BASE + [override])


def test_every_shipped_config_is_in_range():
    for path in sorted((ROOT / "configs").glob("*/*.yaml")):
        if path.parent.name in ("movq", "t2i", "keyframe", "interpolation", "video_decoder"):
            load_config([path], ["run_dir=x", "data.shards=x"], require_complete=False)


def test_a_size_the_model_cannot_divide_stops_start_up(tmp_path, shapes_shards):
    cfg = load_config([MOVQ_CONFIG], tiny_movq_overrides(tmp_path / "run", shapes_shards, **{"data.size": "[34,34]"}))
    with pytest.raises(ValueError, match=r"data.size \[34, 34\] must be divisible by 4 \(the model's total "
                                         r"downsampling\): e.g. \[32, 32\]"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("make, name", [
    (lambda: SamplerSpec(steps=0), "steps = 0: must be an integer >= 1"),
    (lambda: SamplerSpec(timestep_shift=0.0), "timestep_shift = 0.0: must be > 0"),
    (lambda: SamplerSpec(dynamic_threshold=1.5), "dynamic_threshold = 1.5"),
    (lambda: FirstFrameOptions(guidance=-1.0), "'guidance' = -1.0: must be >= 0"),
    (lambda: FirstFrameOptions(height=0), "'height' = 0: must be >= 1"),
    (lambda: KeyframeOptions(image_guidance=-0.5), "'image_guidance' = -0.5: must be >= 0"),
    (lambda: KeyframeOptions(noise_aug_level=-1), "'noise_aug_level' = -1: must be >= 0"),
    (lambda: KeyframeOptions(num_frames=0), "'num_frames' = 0: must be >= 1"),
    (lambda: InterpolationOptions(skip_frames=(3, -1)), "'skip_frames' = \\(3, -1\\)"),
])
def test_sampling_settings_are_checked_by_name(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_steps_zero_from_the_command_line_is_an_error_not_the_default():
    t2i = load_config([T2I_CONFIG], BASE)
    with pytest.raises(ValueError, match="steps = 0"):
        FirstFrameOptions.from_recipe(t2i, steps=0)
    assert FirstFrameOptions.from_recipe(t2i, steps=None).spec.steps == t2i.recipe.sampling.steps


def test_a_blank_prompt_is_the_null_context():
    from kvideo.inference.loading import build_stage_denoiser

    cfg = load_config([T2I_CONFIG], BASE + ["model.model_channels=16", "model.init_channels=8",
                                            "model.time_embed_dim=32", "model.context_dim=16", "model.groups=4",
                                            "model.head_dim=8", "model.dim_mult=[1,2]", "model.num_blocks=[1,1]",
                                            "model.add_cross_attention=[false,true]",
                                            "model.add_self_attention=[false,true]", "recipe.text_encoder.out_dim=16",
                                            "recipe.text_encoder.context_length=16"])
    torch.manual_seed(0)
    denoiser = build_stage_denoiser(cfg).eval()
    prompt = "a red circle moving left slowly on a white background"
    mixed = denoiser.context(["", prompt, None, "   "])
    alone = denoiser.context([prompt])
    null = denoiser.unconditional_context(4)
    for row in (0, 2, 3):
        assert torch.equal(mixed.tokens[row], null.tokens[row]) and torch.equal(mixed.mask[row], null.mask[row])
    assert torch.equal(mixed.tokens[1], alone.tokens[0]) and torch.equal(mixed.mask[1], alone.mask[0])
    assert torch.equal(denoiser.context([""]).tokens, denoiser.unconditional_context(1).tokens)


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_pictures_of_any_mode_and_orientation_read_as_rgb(tmp_path):
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # transparent: shown on white
    out = read_image(_png(rgba))
    assert out.shape == (2, 4, 3) and out.dtype == np.uint8
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (255, 0, 0)
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    assert tuple(read_image(_png(pal))[0, 0]) == (0, 255, 0)
    deep = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert read_image(_png(deep)).min() == 255  # 16-bit white is 8-bit white, not clipped garbage
    assert tuple(read_image(_png(Image.new("L", (2, 2), 128)))[0, 0]) == (128, 128, 128)
    cmyk = tmp_path / "cmyk.tif"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(cmyk)
    r, g, b = (int(v) for v in read_image(cmyk)[4, 4])
    assert r > 200 and g < 60 and b < 60
    # EXIF orientation 6 (rotate 90 clockwise to view): a 40x20 stored picture is shown 20 wide, 40 high
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = tmp_path / "rotated.jpg"
    stored.save(rotated, exif=exif, quality=100)
    shown = read_image(rotated)
    assert shown.shape == (40, 20, 3)
    assert shown[3, 16, 0] > 200 and shown[3, 16, 2] < 60  # the stored top-left is now top-right
    assert shown[3, 3, 0] < 60 and shown[3, 3, 2] > 200
    with pytest.raises(ValueError, match="cannot read image 'README.md'"):
        read_image("README.md")
