"""The temporal video decoder: identity at init, frames interact once trained, window blending,
the released parameter count."""

import pytest
import torch
from einops import rearrange

from kvideo.models.movq import MoVQ
from kvideo.models.video_movq import VideoMoVQ, blend_weights, video_movq_config, window_starts
from kvideo.registry import count_parameters

TINY = dict(ch=8, ch_mult=[1, 2], num_res_blocks=1, norm_groups=4, n_embed=16, attn_levels=[-1])


def tiny_video_movq(seed=0) -> VideoMoVQ:
    torch.manual_seed(seed)
    return VideoMoVQ(video_movq_config("shapes", **TINY)).eval()


def randomise_temporal(model: VideoMoVQ, seed=1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.temporal_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))


def latents(b=2, f=7, seed=2):
    return torch.randn(b, 4, f, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_at_init_the_video_decoder_is_the_image_decoder():
    model = tiny_video_movq()
    image = MoVQ(video_movq_config("shapes", **TINY))
    image.load_state_dict({k: v for k, v in model.state_dict().items() if k in image.state_dict()})
    z = latents()
    expected = rearrange(image.eval().decode(rearrange(z, "b c f h w -> (b f) c h w")), "(b f) c h w -> b c f h w", b=2)
    assert torch.allclose(model.decode_video(z), expected, atol=1e-5)
    assert torch.allclose(model.decode_video(z, window=3, overlap=1), expected, atol=1e-5)


def test_trained_temporal_layers_mix_frames_and_every_one_learns():
    model = tiny_video_movq()
    randomise_temporal(model)
    z = latents(b=1)
    y = z.clone()
    y[:, :, 6] += 1.0
    a, b = model.decode_video(z), model.decode_video(y)
    assert not torch.allclose(a[:, :, 0], b[:, :, 0], atol=1e-6)  # frame 0 sees frame 6
    fresh = tiny_video_movq()
    fresh.train()
    fresh.decode_video(z).square().mean().backward()
    gates = [m.gate.grad for m in fresh.temporal_convs.modules() if hasattr(m, "gate")]
    assert gates and all(g is not None and g.abs() > 0 for g in gates)
    assert all(m.proj_out.weight.grad.abs().sum() > 0 for m in fresh.temporal_attn.values())


def test_window_blending():
    assert window_starts(10, None, 2) == [0] and window_starts(10, 16, 2) == [0]
    assert window_starts(10, 4, 1) == [0, 3, 6]
    assert window_starts(11, 4, 1) == [0, 3, 6, 7]  # the last window flush with the end
    with pytest.raises(ValueError, match="overlap"):
        window_starts(10, 4, 4)
    # the weights of every frame sum to more than zero and each window's ramps are symmetric
    total = torch.zeros(11)
    for s in window_starts(11, 4, 1):
        total[s: s + 4] += blend_weights(4, s, 11, 1)
    assert (total > 0).all()
    assert blend_weights(6, 0, 20, 2).tolist() == pytest.approx([1, 1, 1, 1, 2 / 3, 1 / 3])
    # with trained temporal layers a window decode is a blend of whole-window decodes: frames
    # covered by one window only equal that window decoded on its own
    model = tiny_video_movq()
    randomise_temporal(model)
    z = latents(b=1, f=10)
    windowed = model.decode_video(z, window=6, overlap=2)
    first = model.decode_video(z[:, :, :6])
    assert torch.allclose(windowed[:, :, :4], first[:, :, :4], atol=1e-5)
    assert torch.isfinite(windowed).all()


def test_released_video_decoder_parameter_count():
    """The release's 556.6M is its decoder alone, temporal convs in the middle blocks included:
    the decoder's layers plus their temporal convs and attentions here, exactly."""
    with torch.device("meta"):
        model = VideoMoVQ(video_movq_config("kandinsky"))
    assert model.cfg.temporal_mid_blocks
    decoder = sum(p.numel() for m in (model.decoder, model.temporal_convs, model.temporal_attn) for p in m.parameters())
    assert decoder == 556_645_919
    assert count_parameters(model)["total_params"] == 666_196_811
