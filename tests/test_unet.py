"""The Kandinsky 3 UNet on tiny CPU configs, plus the parameter count of the released size on the
meta device."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kvideo.registry import count_parameters

from kvideo.models.unet import (
    UNET_SIZES,
    ConditionalGroupNorm,
    UNet,
    UNetConfig,
    unet_config,
)

CONTEXT_DIM = 32
TOKENS = 8


def tiny_config(**overrides) -> UNetConfig:
    """Channels (32, 64), 8 norm groups, cross-attention on both levels, self-attention on the lower."""
    values = dict(
        in_channels=4, out_channels=4, model_channels=32, init_channels=16, time_embed_dim=64,
        context_dim=CONTEXT_DIM, groups=8, head_dim=16, dim_mult=[1, 2], num_blocks=[1, 2],
        add_cross_attention=[True, True], add_self_attention=[False, True],
    )
    values.update(overrides)
    return UNetConfig(**values)


def make_model(seed: int = 0, **overrides) -> UNet:
    torch.manual_seed(seed)
    return UNet(tiny_config(**overrides)).eval()


def make_inputs(b: int = 2, h: int = 16, w: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, h, w, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    context = torch.randn(b, TOKENS, CONTEXT_DIM, generator=g)
    mask = torch.ones(b, TOKENS, dtype=torch.bool)
    mask[0, 5:] = False  # sample 0 has 5 valid tokens, sample 1 all 8
    return x, t, context, mask


def randomise_norms(model: UNet, seed: int = 2) -> None:
    """Give every conditional norm a non-zero scale/shift Linear (as after some training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ConditionalGroupNorm):
                linear = m.context_mlp[1]
                linear.weight.copy_(0.05 * torch.randn(linear.weight.shape, generator=g))
                linear.bias.copy_(0.05 * torch.randn(linear.bias.shape, generator=g))


def test_output_shape():
    model = make_model()
    x, t, context, mask = make_inputs()
    out = model(x, t, context, mask)
    assert out.shape == (2, 4, 16, 16)
    assert torch.isfinite(out).all()


def test_non_square_and_float_timesteps():
    model = make_model(out_channels=3)
    x, t, context, mask = make_inputs(h=8, w=12)
    out = model(x, t.float() + 0.5, context, mask)
    assert out.shape == (2, 3, 8, 12)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(2, 4, 9, 12), t, context, mask)


def test_conditional_norms_start_as_group_norm():
    model = make_model()
    norms = [m for m in model.modules() if isinstance(m, ConditionalGroupNorm)]
    assert len(norms) > 10
    for norm in norms:
        linear = norm.context_mlp[1]
        assert linear.weight.abs().sum() == 0 and linear.bias.abs().sum() == 0
        c = linear.out_features // 2
        x, emb = torch.randn(2, c, 4, 4), torch.randn(2, linear.in_features)
        torch.testing.assert_close(norm(x, emb), F.group_norm(x, norm.norm.num_groups, eps=norm.norm.eps))


def _grads(model: UNet, x, t, context, mask):
    model.zero_grad(set_to_none=True)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    F.mse_loss(model(x, t, context, mask), target).backward()
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def test_gradients_reach_every_parameter():
    model = make_model().train()
    x, t, context, mask = make_inputs()
    grads = _grads(model, x, t, context, mask)
    # At init the conditioning vector only feeds the zero-initialised norm Linears: the time MLP
    # and the attention pooling get no gradient yet, by design. Everything else does, including
    # the zero-initialised Linears themselves (so they can leave zero).
    for name, g in grads.items():
        feeds_only_zero_init = name.startswith(("time_embed.", "feature_pooling."))
        nonzero = g is not None and g.abs().sum() > 0
        assert nonzero != feeds_only_zero_init, name
    assert any(".context_mlp.1.weight" in n and grads[n].abs().sum() > 0 for n in grads)
    # once the norms have moved off zero, every parameter gets a gradient
    randomise_norms(model)
    grads = _grads(model, x, t, context, mask)
    dead = [name for name, g in grads.items() if g is None or g.abs().sum() == 0]
    assert not dead, dead


def test_grad_checkpointing_same_gradients():
    model = make_model().train()
    randomise_norms(model)
    x, t, context, mask = make_inputs()
    reference = _grads(model, x, t, context, mask)
    model.set_grad_checkpointing(True)
    assert all(m.grad_checkpointing for m in model.down_samples)
    checkpointed = _grads(model, x, t, context, mask)
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)


def test_context_mask_respected():
    model = make_model()
    randomise_norms(model)  # so the pooled text reaches the output through the norms too
    x, t, context, mask = make_inputs()
    out = model(x, t, context, mask)
    changed = context.clone()
    changed[0, 5:] = 100 * torch.randn(3, CONTEXT_DIM)  # only the masked tokens of sample 0
    torch.testing.assert_close(model(x, t, changed, mask), out, rtol=1e-5, atol=1e-5)
    # without the mask the same change does reach the output
    assert not torch.allclose(model(x, t, changed, None), model(x, t, context, None), atol=1e-4)
    with pytest.raises(ValueError, match="valid context token"):
        model(x, t, context, torch.zeros_like(mask))


def test_output_depends_on_t_and_context():
    model = make_model()
    x, t, context, mask = make_inputs()
    out = model(x, t, context, mask)
    # text reaches the output through the cross-attention even with zero-initialised norms
    assert not torch.allclose(model(x, t, torch.randn_like(context), mask), out, atol=1e-4)
    # the timestep reaches it through the conditional norms once they are off zero
    randomise_norms(model)
    out = model(x, t, context, mask)
    assert not torch.allclose(model(x, t + 100, context, mask), out, atol=1e-4)
    assert not torch.allclose(model(x, t, torch.randn_like(context), mask), out, atol=1e-4)


def test_shapes_size_runs():
    torch.manual_seed(0)
    model = UNet(unet_config("shapes")).eval()
    cfg = model.cfg
    out = model(torch.randn(2, 4, 16, 16), torch.tensor([0, 999]), torch.randn(2, 5, cfg.context_dim))
    assert out.shape == (2, 4, 16, 16)


def test_configs_are_omegaconf_schemas():
    for name, cfg in UNET_SIZES.items():
        structured = OmegaConf.structured(cfg)
        assert OmegaConf.to_object(structured) == cfg, name
    merged = OmegaConf.merge(OmegaConf.structured(UNetConfig), {"dim_mult": [1, 2], "init_channels": None})
    assert list(merged.dim_mult) == [1, 2] and merged.init_channels is None
    with pytest.raises(TypeError):
        unet_config("shapes", channels=3)


def test_bad_configs_fail_clearly():
    with pytest.raises(ValueError, match="num_blocks"):
        UNet(tiny_config(num_blocks=[1]))
    with pytest.raises(ValueError, match="groups"):
        UNet(tiny_config(groups=12))
    with pytest.raises(ValueError, match="head_dim"):
        UNet(tiny_config(head_dim=24))


def test_kandinsky_size_parameter_count():
    with torch.device("meta"):
        model = UNet(unet_config("kandinsky"))
    counts = count_parameters(model)
    total, per_module = counts["total_params"], counts["modules"]
    print(f"kandinsky UNet: {total:,} parameters; {per_module}")
    assert abs(total - 3.0e9) / 3.0e9 < 0.02
    assert dataclasses.asdict(model.cfg) == dataclasses.asdict(UNetConfig())


def test_tiny_unet_overfits_a_fixed_batch_with_the_diffusion_loss():
    """UNet + kvideo.diffusion.training_loss learn: on one fixed batch (fixed t and noise) the
    eps-prediction loss falls by 10x within a few hundred steps."""
    from kvideo.diffusion import LossSpec, Schedule, training_loss

    model = make_model().train()
    schedule = Schedule.from_name("squaredcos_cap_v2", zero_terminal_snr=True)
    x0, _, context, mask = make_inputs(b=4, h=8, w=8)
    g = torch.Generator().manual_seed(3)
    t = torch.randint(50, 950, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def loss():
        value, _ = training_loss(lambda x_t, tt: model(x_t, tt, context=context, context_mask=mask), schedule, x0,
                                 LossSpec(target="eps"), t=t, noise=noise)
        return value.mean()

    with torch.no_grad():
        first = float(loss())
    for _ in range(300):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
        if float(value.detach()) < first / 10:
            break
    with torch.no_grad():
        last = float(loss())
    assert last < first / 10, (first, last)
