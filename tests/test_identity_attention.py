"""Identity tokens and identity attention (issue 28): the identity at init and for weight-0
samples, the gate's algebra and gradients, the reference encoder, config and input errors."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from kvideo.models.blocks import BLOCKS, blocks
from kvideo.models.identity import (
    IdentityAttention, IdentityTokens, ReferenceEncoder, ReferenceEncoderConfig, position_embedding_2d,
    reference_encoder_config,
)
from kvideo.models.interpolation_unet import InterpolationUNet, InterpolationUNetConfig
from kvideo.models.unet import AttentionBlock, UNet, unet_config
from kvideo.models.video_unet import VideoUNet, load_image_weights
from kvideo.registry import count_parameters

from test_unet import CONTEXT_DIM, make_inputs, randomise_norms, tiny_config
from test_video_unet import frame_by_frame, randomise_temporal, tiny_video_config, video_inputs

ON = [True, True]  # identity attention on both levels of the tiny config


def identity_tokens(b=2, n=6, d=CONTEXT_DIM, weight=None, seed=5) -> IdentityTokens:
    g = torch.Generator().manual_seed(seed)
    return IdentityTokens(torch.randn(b, n, d, generator=g), weight=weight)


def identity_model(seed=0, **overrides) -> UNet:
    torch.manual_seed(seed)
    model = UNet(tiny_config(identity_attention=ON, **overrides)).eval()
    randomise_norms(model)  # non-trivial conditional norms everywhere, as after training
    return model


def set_gates(model, value=None, seed=7) -> None:
    """Every identity gate to `value`, or (None) to a random non-zero value, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, IdentityAttention):
                m.gate.fill_(value if value is not None else 0.5 + torch.rand((), generator=g).item())


def without_identity(model: UNet, cls=UNet, cfg=None) -> UNet:
    """The same network built without the option, loaded with the shared weights (strictly)."""
    cfg = cfg if cfg is not None else dataclasses.replace(model.cfg, identity_attention=None)
    plain = cls(cfg).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".identity_attention." not in k})
    return plain


# ---------------------------------------------------------------------------------------------- identity at init


def test_unet_identity_attention_is_the_identity_at_init():
    model = identity_model()
    x, t, context, mask = make_inputs()
    with torch.no_grad():
        plain_out = model(x, t, context, mask)
        out = model(x, t, context, mask, identity=identity_tokens())
        built_without = without_identity(model)(x, t, context, mask)
    assert torch.equal(out, plain_out)
    assert torch.equal(out, built_without)


def test_video_unet_identity_attention_is_the_identity_at_init():
    torch.manual_seed(0)
    video = VideoUNet(tiny_video_config(in_channels=4, identity_attention=ON)).eval()
    randomise_norms(video)
    randomise_temporal(video)
    x, t, context, mask = video_inputs(f=3)
    motion = torch.tensor([3.0, 40.0])
    with torch.no_grad():
        out = video(x, t, context, mask, motion_score=motion, identity=identity_tokens())
        assert torch.equal(out, video(x, t, context, mask, motion_score=motion))
        plain = without_identity(video, VideoUNet, dataclasses.replace(video.cfg, identity_attention=None))
        assert torch.equal(out, plain(x, t, context, mask, motion_score=motion))


def test_default_config_has_no_identity_parameters():
    torch.manual_seed(0)
    model = UNet(tiny_config())
    assert list(model.identity_parameters()) == []
    assert not any("identity" in k for k in model.state_dict())
    assert not any(isinstance(m, IdentityAttention) for m in model.modules())


# ---------------------------------------------------------------------------------------------- trained gates


def test_weight_zero_samples_are_unconditioned_and_weight_one_samples_are_not():
    model = identity_model()
    set_gates(model)
    x, t, context, mask = make_inputs()
    with torch.no_grad():
        plain = model(x, t, context, mask)
        out = model(x, t, context, mask, identity=identity_tokens(weight=torch.tensor([0.0, 1.0])))
        assert torch.equal(out[0], plain[0])  # reference dropped: exactly the model without identity
        assert not torch.allclose(out[1], plain[1], atol=1e-4)
        # a sample without any valid token is unconditioned too (and no NaN from an empty softmax)
        tokens = identity_tokens()
        tokens.mask[0] = False
        empty = model(x, t, context, mask, identity=tokens)
        assert torch.isfinite(empty).all()
        assert torch.equal(empty[0], plain[0]) and not torch.allclose(empty[1], plain[1], atol=1e-4)


def test_masked_identity_tokens_are_ignored():
    model = identity_model()
    set_gates(model)
    x, t, context, mask = make_inputs()
    tokens = identity_tokens()
    tokens.mask[:, 4:] = False
    changed = IdentityTokens(tokens.tokens.clone(), tokens.mask, tokens.weight)
    changed.tokens[:, 4:] = 100 * torch.randn(2, 2, CONTEXT_DIM)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, context, mask, identity=changed),
                                   model(x, t, context, mask, identity=tokens), rtol=1e-5, atol=1e-5)


def test_identity_attention_is_linear_in_weight_at_a_fixed_gate():
    """out = x + gate * weight * (block(x) - x), per sample."""
    torch.manual_seed(0)
    module = IdentityAttention(AttentionBlock(16, 32, context_dim=24, groups=4, head_dim=8)).double()
    with torch.no_grad():
        module.gate.fill_(0.7)
    x, emb = torch.randn(3, 16, 4, 5, dtype=torch.float64), torch.randn(3, 32, dtype=torch.float64)
    tokens, mask = torch.randn(3, 6, 24, dtype=torch.float64), torch.ones(3, 6, dtype=torch.bool)
    weight = torch.tensor([0.0, 1.0, 2.5], dtype=torch.float64)
    with torch.no_grad():
        out = module(x, emb, tokens, mask, weight)
        direct = x + 0.7 * weight.reshape(3, 1, 1, 1) * (module.block(x, emb, tokens, mask) - x)
        torch.testing.assert_close(out, direct, rtol=1e-12, atol=1e-12)
        assert torch.equal(out[0], x[0])
        step = module(x, emb, tokens, mask, torch.ones(3, dtype=torch.float64)) - x  # weight 1
        torch.testing.assert_close(out - x, weight.reshape(3, 1, 1, 1) * step, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="cross-attention"):
        IdentityAttention(AttentionBlock(16, 32, context_dim=None, groups=4, head_dim=8))


def test_identity_dim_other_than_the_context_width():
    model = identity_model(identity_dim=24)
    set_gates(model)
    x, t, context, mask = make_inputs()
    block = model.down_samples[0].units[0].identity_attention.block
    assert block.attention.to_key.in_features == 24
    with torch.no_grad():
        out = model(x, t, context, mask, identity=identity_tokens(d=24))
    assert not torch.allclose(out, model(x, t, context, mask), atol=1e-4)
    with pytest.raises(ValueError, match=r"identity tokens must be \(2, n, 24\)"):
        model(x, t, context, mask, identity=identity_tokens(d=CONTEXT_DIM))


def test_video_unet_repeats_each_clips_tokens_for_its_frames():
    """With the temporal layers at init, the video UNet with identity is the image UNet with the
    same identity attention applied frame by frame, each frame reading its clip's tokens."""
    image = identity_model()
    set_gates(image)
    video = VideoUNet(tiny_video_config(in_channels=4, identity_attention=ON)).eval()
    report = load_image_weights(video, image.state_dict())
    assert not [k for k in report["new"] if ".identity_attention." in k]  # the image model's identity weights load
    x, t, context, mask = video_inputs(f=3)
    tokens = identity_tokens(weight=torch.tensor([1.0, 0.5]))
    with torch.no_grad():
        out = video(x, t, context, mask, identity=tokens)
        frames = tokens.repeat_interleave(3)
        expected = rearrange(image(rearrange(x, "b c f h w -> (b f) c h w"), t.repeat_interleave(3),
                                   context.repeat_interleave(3, dim=0), mask.repeat_interleave(3, dim=0),
                                   identity=frames), "(b f) c h w -> b c f h w", f=3)
        assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()
        assert not torch.allclose(out, frame_by_frame(image, x, t, context, mask), atol=1e-4)
    with pytest.raises(ValueError, match=r"identity tokens must be \(2, n"):
        video(x, t, context, mask, identity=frames)  # per-frame tokens are not per-clip tokens
    with pytest.raises(TypeError, match="unexpected keyword"):
        video(x, t, context, mask, motion=torch.ones(2))


# ---------------------------------------------------------------------------------------------- gradients


def _loss(model, identity, seed=3):
    x, t, context, mask = make_inputs()
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return F.mse_loss(model(x, t, context, mask, identity=identity), target)


def test_at_init_only_the_gate_gets_a_gradient():
    """A zero gate: its own gradient weight * <dL/dout, block(x) - x> is not zero, while the block
    behind it (and whatever made the tokens) gets exactly zero until the gate moves."""
    model = identity_model().train()
    encoder = ReferenceEncoder(ReferenceEncoderConfig(token_dim=CONTEXT_DIM))
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    tokens, token_mask = encoder(latent)
    _loss(model, IdentityTokens(tokens, token_mask)).backward()
    gated = [m for m in model.modules() if isinstance(m, IdentityAttention)]
    assert len(gated) == 6  # a unit's each: down 1 + 2, up 2 + 1 (tiny_config's num_blocks [1, 2])
    for m in gated:
        assert m.gate.grad is not None and m.gate.grad.abs() > 0
        for name, p in m.block.named_parameters():
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name
    for name, p in encoder.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name
    # once the gates have moved, the blocks and the encoder learn
    model.zero_grad()
    encoder.zero_grad()
    set_gates(model)
    _loss(model, IdentityTokens(*encoder(latent))).backward()
    learning = [*(p for m in gated for p in m.parameters()), *encoder.parameters()]
    assert all(p.grad.abs().sum() > 0 for p in learning)


def test_grad_checkpointing_same_output_and_gradients():
    model = identity_model().train()
    set_gates(model)
    identity = identity_tokens(weight=torch.tensor([1.0, 0.3]))
    results = []
    for enabled in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enabled)
        loss = _loss(model, identity)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_off, off), (loss_on, on) = results
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-6, atol=1e-7)
    assert set(on) == set(off) and any(".identity_attention." in n for n in off)
    for name in off:
        torch.testing.assert_close(on[name], off[name], rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------- names and counts


def test_parameter_names_counts_and_blocks():
    model = identity_model()
    keys = [k for k in model.state_dict() if ".identity_attention." in k]
    assert "down_samples.0.units.0.identity_attention.gate" in keys
    assert "up_samples.0.units.1.identity_attention.block.attention.to_key.weight" in keys
    assert all(k.startswith(("down_samples.", "up_samples.")) and ".units." in k for k in keys)
    added = sum(p.numel() for p in model.identity_parameters())
    plain = without_identity(model)
    assert count_parameters(model)["total_params"] - count_parameters(plain)["total_params"] == added
    assert sum(isinstance(b, IdentityAttention) for b in blocks(model)) == 6 and IdentityAttention in BLOCKS
    # only where asked: level 0 off, level 1 on
    half = UNet(tiny_config(identity_attention=[False, True]))
    assert not any(".identity_attention." in k for k in half.state_dict() if k.startswith(("down_samples.0.",
                                                                                          "up_samples.1.")))
    assert any(k.startswith("down_samples.1.units.1.identity_attention.") for k in half.state_dict())


# ---------------------------------------------------------------------------------------------- reference encoder


def test_reference_encoder_tokens_at_any_latent_size():
    torch.manual_seed(0)
    encoder = ReferenceEncoder(ReferenceEncoderConfig()).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for (h, w), n in (((16, 16), 64), ((12, 20), 60)):
            latent = torch.randn(2, 4, h, w, generator=g)
            tokens, mask = encoder(latent)
            assert tokens.shape == (2, n, 128) and mask.shape == (2, n) and mask.dtype == torch.bool and mask.all()
            assert torch.isfinite(tokens).all()
            other, _ = encoder(torch.randn(2, 4, h, w, generator=g))
            assert not torch.allclose(tokens, other, atol=1e-3)  # a different reference, different tokens
        # positions are encoded: a uniform latent still gives a different token per patch
        flat, _ = encoder(torch.ones(1, 4, 8, 8))
        assert torch.cdist(flat[0], flat[0]).add(torch.eye(16) * 1e3).min() > 1e-3
    with pytest.raises(ValueError, match="divisible by patch = 2"):
        encoder(torch.randn(1, 4, 15, 16))
    with pytest.raises(ValueError, match=r"\(b, 4, h, w\)"):
        encoder(torch.randn(1, 3, 16, 16))


def test_position_embedding_2d():
    pos = position_embedding_2d(3, 5, 8)
    assert pos.shape == (15, 8)
    rows, cols = rearrange(pos, "(h w) d -> h w d", h=3).split(4, dim=-1)
    assert torch.equal(rows[:, 0], rows[:, 4]) and torch.equal(cols[0], cols[2])  # row / column features
    assert len({tuple(p.tolist()) for p in pos}) == 15


def test_reference_encoder_parameter_counts():
    shapes = count_parameters(ReferenceEncoder(ReferenceEncoderConfig()))["total_params"]
    with torch.device("meta"):
        kandinsky = count_parameters(ReferenceEncoder(reference_encoder_config("kandinsky")))["total_params"]
    print(f"reference encoder: shapes {shapes / 1e6:.3f}M, kandinsky {kandinsky / 1e6:.1f}M parameters")
    # shapes: patch conv 4*128*4 + 128; 2 layers of 2 LayerNorms, attention 4 * 128^2, MLP 128*512*2 + 640;
    # projection 128*128 + 128; LayerNorm 256
    layer = 2 * 256 + 4 * 128 ** 2 + 2 * 128 * 512 + 512 + 128
    assert shapes == 4 * 128 * 4 + 128 + 2 * layer + 128 * 128 + 128 + 256 == 414_464
    assert 50e6 < kandinsky < 60e6
    assert reference_encoder_config("kandinsky").token_dim == unet_config("kandinsky").context_dim == 4096


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("overrides, match", [
    (dict(identity_attention=[True, True], add_cross_attention=[False, True]), "identity_attention: .*cross-attention"),
    (dict(identity_attention=[True]), "identity_attention needs one entry per level"),
    (dict(identity_attention=[False, True], identity_dim=0), "identity_dim"),
])
def test_bad_configs_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        UNet(tiny_config(**overrides))


def test_interpolation_unet_rejects_identity_attention():
    base = tiny_config()
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    cfg = InterpolationUNetConfig(**{**values, "in_channels": 12, "out_channels": 4, "identity_attention": ON})
    with pytest.raises(ValueError, match="InterpolationUNetConfig.identity_attention"):
        InterpolationUNet(cfg)


def test_bad_identity_tokens_and_inputs_raise():
    tokens = torch.randn(2, 6, CONTEXT_DIM)
    with pytest.raises(ValueError, match=r"tokens must be \(b, n, d\)"):
        IdentityTokens(tokens[0])
    with pytest.raises(ValueError, match="mask must be bool"):
        IdentityTokens(tokens, mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        IdentityTokens(tokens, mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match=r"weight must be a float \(2,\)"):
        IdentityTokens(tokens, weight=torch.ones(2, 1))
    with pytest.raises(ValueError, match=r"weight must be a float"):
        IdentityTokens(tokens, weight=torch.ones(2, dtype=torch.long))
    x, t, context, mask = make_inputs()
    with pytest.raises(ValueError, match="without identity attention"):
        UNet(tiny_config())(x, t, context, mask, identity=IdentityTokens(tokens))
    with pytest.raises(ValueError, match=r"identity tokens must be \(2, n, 32\)"):
        identity_model()(x, t, context, mask, identity=IdentityTokens(tokens[:1]))
