"""The inference layer's contracts: named conditions, the options a recipe gives, the stage
registries, and activation checkpointing of the video decoder's training module."""

import dataclasses

import pytest
import torch
from einops import rearrange

from kvideo.inference.conditioning import (NETWORK_CALLS, IdentityCondition, ImageCondition, InterpolationCondition,
                                           KeyframeCondition, Prompts, TextContext, TextVideoCondition, call_network,
                                           conditioned_input)
from kvideo.inference.sampling import FirstFrameOptions, InterpolationOptions, KeyframeOptions
from kvideo.registry import load_config

from conftest import ROOT
from test_video_movq import TINY, latents, randomise_temporal


def test_every_named_stage_has_a_training_stage_and_a_schema():
    from kvideo.registry import STAGES as SCHEMAS
    from kvideo.train.stages import STAGES

    assert set(STAGES) == set(SCHEMAS)
    assert all(cls.name == name for name, cls in STAGES.items())


def test_every_condition_kind_has_one_network_call():
    assert set(NETWORK_CALLS) == {ImageCondition, KeyframeCondition, TextVideoCondition, InterpolationCondition,
                                  IdentityCondition}

    @dataclasses.dataclass
    class Unregistered:
        text: Prompts

    with pytest.raises(TypeError, match="no network call for a condition of kind Unregistered"):
        call_network(None, torch.zeros(1), torch.zeros(1), Unregistered(Prompts(["a"])))


def test_conditions_are_validated_when_made():
    text = TextContext(torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="first has batch size 1, the text 2"):
        KeyframeCondition(text, torch.zeros(1, 4, 8, 8), torch.ones(1), torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match=r"first must be a \(b, c, h, w\) latent"):
        KeyframeCondition(text, torch.zeros(2, 4, 1, 8, 8), torch.ones(2), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match=r"keys must be \(b, c, g \+ 1, h, w\)"):
        InterpolationCondition(text, torch.zeros(2, 4, 8, 8), torch.ones(2), 3)
    with pytest.raises(ValueError, match=r"drop must be \(2,\)"):
        Prompts(["a", "b"], torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="TextContext"):
        TextContext(torch.zeros(2, 3, 4), torch.ones(2, 4))


def test_dropout_makes_a_condition():
    cond = KeyframeCondition(Prompts(["a", "b", "c"]), torch.randn(3, 4, 8, 8), torch.ones(3, dtype=torch.bool),
                             torch.tensor([5, 6, 7]), torch.tensor([0.1, 0.2, 0.3]), 2.0)
    dropped = cond.dropped(text=torch.tensor([True, False, False]), image=torch.tensor([False, True, False]))
    assert dropped.text.drop.tolist() == [True, False, False]
    assert dropped.has_image.tolist() == [True, False, True]
    assert dropped.noise_level.tolist() == [5, 0, 7]  # a sample without its first frame has level 0
    assert torch.equal(dropped.first, cond.first) and dropped.motion_scale == 2.0
    # the input the UNet sees: no first frame and no mask where the image was dropped
    x = conditioned_input(torch.zeros(3, 4, 2, 8, 8), dropped.first, dropped.has_image)
    assert x[1, 4:].abs().sum() == 0 and x[0, 8, 0].eq(1).all() and x[0, 8, 1].eq(0).all()


def test_options_come_from_the_recipe_and_changes_name_their_field():
    kf = load_config([ROOT / "configs" / "keyframe" / "shapes.yaml"], ["run_dir=x", "data.shards=x", "recipe.movq=x"])
    s = kf.recipe.sampling
    options = KeyframeOptions.from_recipe(kf)
    assert (options.spec.sampler, options.spec.steps, options.spec.spacing) == (s.sampler, s.steps, s.spacing)
    assert (options.text_guidance, options.image_guidance, options.num_frames) == \
        (s.text_guidance, s.image_guidance, kf.data.num_frames)
    assert options.noise_aug_level == kf.recipe.noise_aug.sample_level
    changed = KeyframeOptions.from_recipe(kf, steps=7, sampler="ddim", text_guidance=None, use_image=False)
    assert changed.spec.steps == 7 and changed.spec.sampler == "ddim" and not changed.use_image
    assert changed.text_guidance == s.text_guidance  # None keeps the recipe's value
    with pytest.raises(ValueError, match="unknown setting 'guidance'.*text_guidance"):
        KeyframeOptions.from_recipe(kf, guidance=3.0)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        KeyframeOptions.from_recipe(kf, sampler="euler")

    ip = load_config([ROOT / "configs" / "interpolation" / "shapes.yaml"], ["run_dir=x", "data.shards=x", "recipe.movq=x"])
    assert InterpolationOptions.from_recipe(ip).skip_frames == tuple(p.skip_frames for p in ip.recipe.passes)
    assert InterpolationOptions.from_recipe(ip, skip_frames=[1]).skip_frames == (1,)
    t2i = load_config([ROOT / "configs" / "t2i" / "shapes.yaml"], ["run_dir=x", "data.shards=x", "recipe.movq=x"])
    first = FirstFrameOptions.from_recipe(t2i, height=128)
    assert (first.height, first.width) == (128, t2i.data.size[1])


def test_the_video_decoder_trains_with_activation_checkpointing():
    """Same loss and gradients with `train.grad_checkpointing` on as off (the video decoder's
    training module had no switch before)."""
    from kvideo.models.video_movq import VideoMoVQ, video_movq_config
    from kvideo.train.stages.autoencoder import AutoencoderWithDiscriminator

    torch.manual_seed(0)
    model = AutoencoderWithDiscriminator(VideoMoVQ(video_movq_config("shapes", **TINY)), torch.nn.Identity())
    randomise_temporal(model.ae)
    z = rearrange(latents(b=1, f=4), "b c f h w -> (b f) c h w")

    def grads(enabled: bool):
        model.zero_grad()
        model.set_grad_checkpointing(enabled)
        loss = model.ae(z, num_frames=4).square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.ae.decoder.parameters() if p.grad is not None]

    loss_off, off = grads(False)
    loss_on, on = grads(True)
    assert model.ae.decoder.grad_checkpointing
    assert torch.equal(loss_on, loss_off) and len(on) == len(off) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(on, off))
