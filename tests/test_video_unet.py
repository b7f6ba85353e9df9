"""The keyframe video UNet: identity at init, image mode, temporal conditioning, parameter counts."""

import pytest
import torch
from einops import rearrange

from kvideo.models.unet import UNet
from kvideo.models.video_unet import (
    FirstFrameAttentionBlock, TemporalAttentionBlock, TemporalResNetBlock, VideoUNet, VideoUNetConfig, load_image_weights, video_unet_config,
)
from kvideo.registry import count_parameters

from test_unet import CONTEXT_DIM, TOKENS, randomise_norms, tiny_config


def tiny_video_config(**overrides) -> VideoUNetConfig:
    base = tiny_config()
    values = {k: getattr(base, k) for k in base.__dataclass_fields__}
    values.update(overrides)
    return VideoUNetConfig(**values)


def video_inputs(b=2, c=4, f=5, h=16, w=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, f, h, w, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    context = torch.randn(b, TOKENS, CONTEXT_DIM, generator=g)
    mask = torch.ones(b, TOKENS, dtype=torch.bool)
    mask[0, 5:] = False
    return x, t, context, mask


def randomise_temporal(model: VideoUNet, seed: int = 3) -> None:
    """Make every temporal layer non-trivial (as after training): no zero-initialised weights left."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.temporal_parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))


def trained_image_unet(in_channels: int = 4) -> UNet:
    torch.manual_seed(0)
    unet = UNet(tiny_config(in_channels=in_channels)).eval()
    randomise_norms(unet)  # non-trivial conditional norms, as a trained model has
    return unet


def frame_by_frame(unet: UNet, x, t, context, mask):
    f = x.shape[2]
    out = unet(rearrange(x, "b c f h w -> (b f) c h w"), t.repeat_interleave(f),
               context.repeat_interleave(f, dim=0), mask.repeat_interleave(f, dim=0))
    return rearrange(out, "(b f) c h w -> b c f h w", f=f)


def test_at_init_the_video_unet_is_the_image_unet_frame_by_frame():
    image = trained_image_unet()
    video = VideoUNet(tiny_video_config(in_channels=9)).eval()
    report = load_image_weights(video, image.state_dict())
    assert report["widened"] == ["in_layer.weight"] and report["new"]
    assert all(k.startswith(("temporal_", "frame_embed", "noise_aug_embed", "motion_embed")) for k in report["new"])
    x, t, context, mask = video_inputs()
    cond = torch.randn(2, 5, 5, 16, 16)  # first-frame latent + mask channels: ignored at init
    out = video(torch.cat([x, cond], 1), t, context, mask, noise_aug_level=torch.tensor([20, 0]),
                motion_score=torch.tensor([3.0, 50.0]))
    expected = frame_by_frame(image, x, t, context, mask)
    assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()
    # and the temporal layers really are there: once trained, frames interact
    randomise_temporal(video)
    out2 = video(torch.cat([x, cond], 1), t, context, mask)
    assert not torch.allclose(out2, expected, atol=1e-3)


def test_temporal_blocks_are_identities_at_init_and_learnable():
    x, emb = torch.randn(2, 16, 4, 6, 6), torch.randn(2, 4, 32)
    for block in (TemporalResNetBlock(16, 32, groups=4), TemporalAttentionBlock(16, 32, groups=4, head_dim=8)):
        out = block(x, emb)
        assert torch.equal(out, x)
        out.square().sum().backward()  # zero-initialised output layers still receive gradients
        grads = [p.grad for p in block.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        assert grads, type(block).__name__


def test_image_mode_is_explicit_and_ignores_temporal_inputs():
    torch.manual_seed(0)
    video = VideoUNet(tiny_video_config()).eval()
    randomise_temporal(video)
    x, t, context, mask = video_inputs()
    a = video(x, t, context, mask, motion_score=torch.tensor([1.0, 2.0]), temporal=False)
    b = video(x, t, context, mask, motion_score=torch.tensor([90.0, 0.0]), temporal=False)
    image = UNet(tiny_config())
    image.load_state_dict({k: v for k, v in video.state_dict().items() if k in image.state_dict()})
    assert torch.equal(a, b)
    assert torch.allclose(a, frame_by_frame(image.eval(), x, t, context, mask), atol=1e-5)
    # one frame in video mode is still video mode (never switched by shape)
    one = video(x[:, :, :1], t, context, mask, motion_score=torch.tensor([90.0, 0.0]))
    assert not torch.allclose(one, a[:, :, :1], atol=1e-4)


def test_temporal_text_pooling_feeds_only_the_temporal_embedding():
    torch.manual_seed(0)
    video = VideoUNet(tiny_video_config(in_channels=4, temporal_text=True)).eval()
    assert "text_pooling" in video.temporal_modules()
    x, t, context, mask = video_inputs()
    plain = VideoUNet(tiny_video_config(in_channels=4)).eval()
    plain.load_state_dict({k: v for k, v in video.state_dict().items() if not k.startswith("text_pooling.")})
    with torch.no_grad():
        assert torch.allclose(video(x, t, context, mask), plain(x, t, context, mask), atol=1e-6)  # zero at init
        emb = video.embed(t, context, mask)
        before = video.temporal_embedding(emb, 5, None, None, None, context, mask)
        randomise_temporal(video)
        other = torch.randn_like(context)
        after = video.temporal_embedding(emb, 5, None, None, None, context, mask)
        assert not torch.allclose(before, after)  # the text now reaches the temporal layers
        assert not torch.allclose(after, video.temporal_embedding(emb, 5, None, None, None, other, mask))
        assert torch.equal(video.embed(t, other, mask) - video.embed(t, context, mask),
                           plain.embed(t, other, mask) - plain.embed(t, context, mask))  # spatial path untouched
    with pytest.raises(ValueError, match="needs the context"):
        video.temporal_embedding(emb, 5, None, None, None)


def test_temporal_embedding_reaches_only_the_temporal_layers():
    """Motion score and noise-augmentation level change the output only through the
    temporal layers: the spatial layers' conditioning is identical, and with the temporal layers
    at init (identities) the output does not move at all."""
    torch.manual_seed(0)
    video = VideoUNet(tiny_video_config()).eval()
    x, t, context, mask = video_inputs()
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(args[1].clone()))
             for name, m in video.named_modules() if name.endswith(("in_resnet", "out_resnet"))
             and not name.startswith("temporal")]

    def run(**kw):
        seen.clear()
        out = video(x, t, context, mask, **kw)
        return out, list(seen)

    base, emb_a = run(motion_score=torch.tensor([1.0, 1.0]), noise_aug_level=torch.tensor([0, 0]))
    moved, emb_b = run(motion_score=torch.tensor([80.0, 5.0]), noise_aug_level=torch.tensor([200, 7]))
    for h in hooks:
        h.remove()
    assert emb_a and all(torch.equal(a, b) for a, b in zip(emb_a, emb_b))  # spatial conditioning unchanged
    assert torch.allclose(base, moved, atol=1e-6)  # temporal identities at init
    randomise_temporal(video)
    base, _ = run(motion_score=torch.tensor([1.0, 1.0]), noise_aug_level=torch.tensor([0, 0]))
    moved, _ = run(motion_score=torch.tensor([80.0, 1.0]), noise_aug_level=torch.tensor([0, 0]))
    assert not torch.allclose(base[0], moved[0], atol=1e-4)  # sample 0's motion changed its output
    assert torch.allclose(base[1], moved[1], atol=1e-5)  # sample 1 untouched


def test_per_frame_timesteps():
    """t (b, f) with every frame at its clip's t is t (b,); a frame's own t conditions every layer
    (spatial and temporal) of that frame, and shapes are checked."""
    torch.manual_seed(0)
    video = VideoUNet(tiny_video_config(temporal_text=True)).eval()
    randomise_norms(video)  # the spatial norms read the time embedding, as after training
    randomise_temporal(video)
    x, t, context, mask = video_inputs(f=4)
    level, motion = torch.tensor([20, 0]), torch.tensor([1.0, 2.0])
    with torch.no_grad():
        clip = video(x, t, context, mask, noise_aug_level=level, motion_score=motion)
        same = video(x, t[:, None].expand(2, 4), context, mask, noise_aug_level=level, motion_score=motion)
        assert torch.allclose(clip, same, atol=1e-5), (clip - same).abs().max()
        frame_t = t[:, None].expand(2, 4).clone()
        frame_t[:, 0] = 0
        anchored = video(x, frame_t, context, mask, noise_aug_level=level, motion_score=motion)
        assert not torch.allclose(anchored[:, :, 0], clip[:, :, 0], atol=1e-4)
        # image mode: frame 0 alone changes
        a = video(x, t, context, mask, temporal=False)
        b = video(x, frame_t, context, mask, temporal=False)
        assert torch.allclose(a[:, :, 1:], b[:, :, 1:], atol=1e-5) and not torch.allclose(a[:, :, 0], b[:, :, 0], atol=1e-4)
    with pytest.raises(ValueError, match="per-frame timesteps"):
        video(x, frame_t[:, :3], context, mask)


def test_frames_interact_only_through_temporal_layers():
    torch.manual_seed(0)
    video = VideoUNet(tiny_video_config()).eval()
    randomise_temporal(video)
    x, t, context, mask = video_inputs(b=1)
    y = x.clone()
    y[:, :, 4] += 1.0  # change the last frame only
    a, b = video(x, t, context, mask), video(y, t, context, mask)
    assert not torch.allclose(a[:, :, 0], b[:, :, 0], atol=1e-5)  # frame 0 sees frame 4
    a, b = video(x, t, context, mask, temporal=False), video(y, t, context, mask, temporal=False)
    assert torch.equal(a[:, :, :4], b[:, :, :4])


def test_grad_checkpointing_same_gradients_and_every_parameter_learns():
    torch.manual_seed(0)
    video = VideoUNet(tiny_video_config())
    randomise_temporal(video)
    x, t, context, mask = video_inputs(f=3)
    grads = []
    for enabled in (False, True):
        video.zero_grad()
        video.set_grad_checkpointing(enabled)
        video(x, t, context, mask, motion_score=torch.tensor([1.0, 2.0])).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in video.named_parameters() if p.grad is not None})
    missing = [n for n, p in video.named_parameters() if n not in grads[0]]
    assert not missing, missing
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5), n


def test_first_frame_attention_reads_frame_0_anywhere_and_starts_as_the_identity():
    torch.manual_seed(0)
    block = FirstFrameAttentionBlock(16, 32, groups=4, head_dim=8)
    x, emb = torch.randn(2, 16, 4, 6, 6), torch.randn(2, 4, 32)
    out = block(x, emb)
    assert torch.equal(out, x)  # zero-initialised output
    out.square().sum().backward()
    assert block.attention.to_out.weight.grad.abs().sum() > 0
    with torch.no_grad():
        block.attention.to_out.weight.normal_(0, 0.1)
        base = block(x, emb)
        y = x.clone()
        y[:, :, 0, 0, 0] += 1.0  # one corner of frame 0
        moved = block(y, emb)
        # every position of every frame reads it, the far corner of frame 3 included ...
        assert not torch.allclose(moved[:, :, 3, 5, 5], base[:, :, 3, 5, 5], atol=1e-5)
        y = x.clone()
        y[:, :, 2] += 1.0  # ... while frame 2 reaches no frame but itself
        moved = block(y, emb)
        assert torch.equal(moved[:, :, [0, 1, 3]], base[:, :, [0, 1, 3]])


def test_first_frame_attention_levels_keep_the_model_at_init_and_learn():
    torch.manual_seed(0)
    plain = VideoUNet(tiny_video_config()).eval()
    video = VideoUNet(tiny_video_config(first_frame_attention=[True, False])).eval()
    new = [k for k in video.state_dict() if k not in plain.state_dict()]
    assert new and all(".first_frame." in k for k in new)
    assert {".".join(k.split(".")[:2]) for k in new} == {"temporal_down.0", "temporal_up.1"}  # up j mirrors down 1 - j
    assert set(new) <= {n for n, _ in video.named_parameters() if any(p is _ for p in video.temporal_parameters())}
    video.load_state_dict(plain.state_dict(), strict=False)
    x, t, context, mask = video_inputs()
    assert torch.allclose(video(x, t, context, mask), plain(x, t, context, mask), atol=1e-6)
    video(x, t, context, mask).square().mean().backward()
    learned = [k for k, p in video.named_parameters() if k in new and p.grad is not None and p.grad.abs().sum() > 0]
    assert any(k.endswith("to_out.weight") for k in learned)
    with pytest.raises(ValueError, match="first_frame_attention"):
        VideoUNet(tiny_video_config(first_frame_attention=[True, True, True]))


def test_bad_inputs_fail_clearly():
    video = VideoUNet(tiny_video_config()).eval()
    x, t, context, mask = video_inputs()
    with pytest.raises(ValueError, match=r"\(b, c, f, h, w\)"):
        video(x[:, :, 0], t, context, mask)
    with pytest.raises(ValueError, match="motion_score"):
        video(x, t, context, mask, motion_score=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="frame_index"):
        video.temporal_embedding(torch.zeros(2, 32), 5, None, None, torch.arange(4))
    with pytest.raises(ValueError, match="temporal_attention"):
        VideoUNet(tiny_video_config(temporal_attention=[True, True]))  # level 0 has no self-attention
    with pytest.raises(ValueError, match="the video UNet expects"):
        load_image_weights(VideoUNet(tiny_video_config()), UNet(tiny_config(model_channels=64)).state_dict())


def test_released_keyframe_parameter_counts():
    """4.149B parameters of which 1.110B temporal (../shared/reference/kandinsky_video.md), within 2%."""
    with torch.device("meta"):
        model = VideoUNet(video_unet_config("kandinsky"))
    counts = count_parameters(model)
    assert abs(counts["total_params"] / 4.149e9 - 1) < 0.02, counts["total_params"]
    assert abs(counts["temporal_params"] / 1.110e9 - 1) < 0.02, counts["temporal_params"]
    assert model.cfg.in_channels == 9
