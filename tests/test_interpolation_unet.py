"""The interpolation UNet: zero gates give the image model gap by gap, the temporal mask switches
the temporal layers off, the gates learn, and the released parameter count."""

import torch
from einops import rearrange

from kvideo.models.interpolation_unet import (
    InterpolationUNet, InterpolationUNetConfig, interpolation_unet_config, spread_image_convs,
)
from kvideo.models.unet import UNet
from kvideo.models.video_unet import load_image_weights
from kvideo.registry import count_parameters

from test_unet import randomise_norms, tiny_config
from test_video_unet import video_inputs


def tiny_interpolation_config(**overrides) -> InterpolationUNetConfig:
    base = tiny_config(in_channels=20, out_channels=12)
    values = {k: getattr(base, k) for k in base.__dataclass_fields__}
    values.update(overrides)
    return InterpolationUNetConfig(**values)


def open_gates(model: InterpolationUNet, seed: int = 4) -> None:
    """Non-zero gates, temporal convs and skip scale, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("temporal_") and (name.endswith("gate") or ".conv." in name):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        model.skip_embed.scale.fill_(0.5)


def gap_by_gap(unet: UNet, x, t, context, mask):
    g = x.shape[2]
    out = unet(rearrange(x, "b c g h w -> (b g) c h w"), t.repeat_interleave(g), context.repeat_interleave(g, dim=0),
               mask.repeat_interleave(g, dim=0))
    return rearrange(out, "(b g) c h w -> b c g h w", g=g)


def test_zero_gates_are_the_image_model_gap_by_gap():
    torch.manual_seed(0)
    model = InterpolationUNet(tiny_interpolation_config()).eval()
    image = UNet(tiny_config(in_channels=20, out_channels=12)).eval()
    report = load_image_weights(model, image.state_dict())
    assert not report["widened"]
    x, t, context, mask = video_inputs(c=20, f=4)
    out = model(x, t, context, mask, skip_frames=torch.tensor([3, 1]))
    assert torch.allclose(out, gap_by_gap(image, x, t, context, mask), atol=1e-5)


def test_spread_convs_start_as_the_image_model_on_the_mean_noisy_frame():
    torch.manual_seed(0)
    k, c = 3, 4
    model = InterpolationUNet(tiny_interpolation_config()).eval()
    image = UNet(tiny_config(in_channels=c, out_channels=c)).eval()
    state = {n: v for n, v in image.state_dict().items() if not n.startswith(("in_layer.", "out_layer.2."))}
    load_image_weights(model, state)
    spread_image_convs(model, image.state_dict(), k)
    x, t, context, mask = video_inputs(c=(k + 2) * c, f=4)
    out = model(x, t, context, mask, skip_frames=torch.tensor([3, 1]))
    noisy_mean = x[:, c: (k + 1) * c].reshape(2, k, c, *x.shape[2:]).mean(1)  # keyframes are ignored at the start
    expected = gap_by_gap(image, noisy_mean, t, context, mask)
    for j in range(k):
        assert torch.allclose(out[:, j * c: (j + 1) * c], expected, atol=1e-5)
    try:
        spread_image_convs(model, image.state_dict(), 2)
    except ValueError as e:
        assert "2 frames per gap" in str(e)
    else:
        raise AssertionError("a mismatched frames_per_gap must be refused")


def test_temporal_mask_zero_is_the_spatial_model_and_gaps_interact_otherwise():
    torch.manual_seed(0)
    model = InterpolationUNet(tiny_interpolation_config()).eval()
    open_gates(model)
    x, t, context, mask = video_inputs(c=20, f=4)
    skip = torch.tensor([3, 1])
    off = model(x, t, context, mask, skip_frames=skip, temporal_mask=torch.zeros(2))
    assert torch.allclose(off, model(x, t, context, mask, skip_frames=skip, temporal=False), atol=1e-5)
    on = model(x, t, context, mask, skip_frames=skip)
    assert not torch.allclose(on, off, atol=1e-4)
    y = x.clone()
    y[:, :, 3] += 1.0  # change the last gap only
    a, b = model(x, t, context, mask, skip_frames=skip), model(y, t, context, mask, skip_frames=skip)
    assert not torch.allclose(a[:, :, 0], b[:, :, 0], atol=1e-6)  # the first gap sees it
    a = model(x, t, context, mask, skip_frames=skip, temporal_mask=torch.tensor([0.0, 1.0]))
    assert torch.allclose(a[0], off[0], atol=1e-5) and torch.allclose(a[1], on[1], atol=1e-5)  # per sample
    # the skip-frames embedding (behind its scale) reaches the conditional norms
    randomise_norms(model)
    on = model(x, t, context, mask, skip_frames=skip)
    assert not torch.allclose(model(x, t, context, mask, skip_frames=torch.tensor([1, 1]))[0], on[0], atol=1e-5)


def test_gates_receive_gradients_at_init():
    """Zero gates with a zero conv (blend) or a random block (attention) must still learn, and so
    must the skip-frames scale once the norms use the conditioning (as in a loaded t2i UNet)."""
    torch.manual_seed(0)
    model = InterpolationUNet(tiny_interpolation_config())
    randomise_norms(model)
    x, t, context, mask = video_inputs(c=20, f=3)
    model(x, t, context, mask, skip_frames=torch.tensor([3, 1])).square().mean().backward()
    gates = {n: p.grad for n, p in model.named_parameters() if n.endswith("gate")}
    assert gates and all(g is not None and g.abs() > 0 for g in gates.values()), gates
    assert model.skip_embed.scale.grad is not None and model.skip_embed.scale.grad.abs() > 0


def test_released_interpolation_parameter_count():
    with torch.device("meta"):
        model = InterpolationUNet(interpolation_unet_config("kandinsky"))
    counts = count_parameters(model)
    assert abs(counts["total_params"] / 3.98e9 - 1) < 0.02, counts["total_params"]
    assert (model.cfg.in_channels, model.cfg.out_channels) == (20, 12)
