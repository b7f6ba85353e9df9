"""MoVQ autoencoder, its discriminator, and the shared layers they use (CPU, < 40 s)."""

from __future__ import annotations

import math

import pytest
import torch

import kvideo.nn.layers as layers
from kvideo.models.discriminator import PatchDiscriminator, adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from kvideo.models.movq import MOVQ_SIZES, MoVQ, MovqConfig, VectorQuantizer, downsample, movq_config
from kvideo.nn import attention
from kvideo.registry import count_parameters


def tiny_config(**overrides) -> MovqConfig:
    """f = 4, widths 8/16/16, attention at the lowest level, 32 codes."""
    cfg = MovqConfig(ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, norm_groups=4, n_embed=32, resolution=32)
    for name, value in overrides.items():
        setattr(cfg, name, value)
    return cfg


def images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


# ----------------------------------------------------------------------------------------------
# Shared layers
# ----------------------------------------------------------------------------------------------


def test_attention_matches_reference_and_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v
    torch.testing.assert_close(attention(q, k, v), ref)
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()  # causal
    logits = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(attention(q, k, v, mask=mask), torch.softmax(logits, -1) @ v)
    with pytest.raises(ValueError, match="b, heads, n, d"):
        attention(q[0], k[0], v[0])
    # bf16 on the CPU (its own kernel path): the same result within bf16 precision, gradients too
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    out = attention(qb, kb, vb, mask=mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), torch.softmax(logits, -1) @ v, atol=3e-2, rtol=3e-2)
    out.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad.float()).all() for t in (qb, kb, vb))


# ----------------------------------------------------------------------------------------------
# MoVQ: shapes and gradients
# ----------------------------------------------------------------------------------------------


def test_forward_backward_reaches_encoder_decoder_and_codebook():
    torch.manual_seed(0)
    model = MoVQ(tiny_config())
    x = images(2, 32, 32)
    recon, vq_loss, info = model(x)
    assert recon.shape == x.shape
    assert vq_loss.ndim == 0 and vq_loss.item() > 0
    assert info["indices"].shape == (2, 8, 8) and info["indices"].dtype == torch.long
    assert 1.0 <= info["perplexity"].item() <= 32
    ((recon - x).square().mean() + vq_loss).backward()
    for name in ("encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "quant_conv.weight",
                 "quantize.embedding.weight", "post_quant_conv.weight", "decoder.conv_in.weight",
                 "decoder.up.2.attn.0.norm.conv_y.weight", "decoder.conv_out.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_encode_is_continuous_and_decode_inverts_the_shape():
    torch.manual_seed(0)
    model = MoVQ(tiny_config()).eval()
    x = images(2, 32, 32)
    with torch.no_grad():
        z = model.encode(x)
        assert z.shape == (2, 4, 8, 8)
        zq, _, _ = model.quantize(z)
        assert not torch.allclose(z, zq), "encode() must return the pre-quantisation latent"
        assert model.decode(z).shape == (2, 3, 32, 32)
        # the latent is the spatial-norm condition too: the same decoder input with another
        # condition gives another image
        h = model.post_quant_conv(z)
        assert not torch.allclose(model.decoder(h, z), model.decoder(h, zq))
        recon, vq_loss, info = model(x, quantize=False)
        torch.testing.assert_close(recon, model.decode(z))
        assert vq_loss.item() == 0 and info == {}


def test_scale_down_decodes_the_downsampled_continuous_latent():
    """The scale-equivariance branch (recipe.scale_equivariance): info["recon_down"] is the decoder
    on the continuous latent downsampled by k, whatever latent the main reconstruction decodes,
    and its gradient reaches the encoder."""
    torch.manual_seed(0)
    model = MoVQ(tiny_config())
    x = images(2, 32, 48)
    recon, _, info = model(x, scale_down=2)
    with torch.no_grad():
        z = model.encode(x)
        torch.testing.assert_close(info["recon_down"], model.decode(downsample(z, 2)))
        torch.testing.assert_close(recon, model.decode(model.quantize(z)[0]))  # the main path is unchanged
    assert info["recon_down"].shape == (2, 3, 16, 24)
    assert model(x, quantize=False, scale_down=4)[2]["recon_down"].shape == (2, 3, 8, 12)
    info["recon_down"].square().mean().backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert "recon_down" not in model(x)[2]


def test_downsample_filters_image_and_latent_alike():
    g = torch.Generator().manual_seed(0)
    flat = torch.full((1, 3, 8, 12), 0.3)
    torch.testing.assert_close(downsample(flat, 4), torch.full((1, 3, 2, 3), 0.3))
    x = torch.randn(2, 4, 8, 8, generator=g)
    assert downsample(x, 2).shape == (2, 4, 4, 4)
    assert downsample(x, 2).std() < 0.75 * x.std()  # a low-pass filter, not a subsampling
    half = downsample(x.bfloat16(), 2)  # as under bf16 autocast
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), downsample(x.bfloat16().float(), 2), atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="recipe.scale_equivariance.factors: 3 does not divide the 8x8"):
        downsample(x, 3)


def test_non_square_size_and_size_errors():
    torch.manual_seed(0)
    model = MoVQ(tiny_config())
    x = images(1, 48, 80)
    with torch.no_grad():
        z = model.encode(x)
        assert z.shape == (1, 4, 12, 20)
        assert model.decode(z).shape == (1, 3, 48, 80)
    with pytest.raises(ValueError, match="divisible"):
        model.encode(images(1, 50, 80))
    with pytest.raises(ValueError, match="expects"):
        model.decode(torch.zeros(1, 3, 12, 20))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="norm_groups"):
        MoVQ(tiny_config(norm_groups=3))
    with pytest.raises(ValueError, match="attn_levels"):
        MoVQ(tiny_config(attn_levels=[3]))
    with pytest.raises(KeyError, match="known sizes"):
        movq_config("huge")
    with pytest.raises(TypeError, match="no field"):
        movq_config("shapes", channels=3)


# ----------------------------------------------------------------------------------------------
# MoVQ: named sizes
# ----------------------------------------------------------------------------------------------


def test_kandinsky_parameter_counts_match_released_movqgan_270m():
    with torch.device("meta"):
        model = MoVQ(movq_config("kandinsky"))
    info = count_parameters(model)
    counts = info["modules"]
    assert info["total_params"] == pytest.approx(270.6e6, rel=0.02)
    assert counts["encoder"] == pytest.approx(109.5e6, rel=0.02)
    assert counts["decoder"] == pytest.approx(161.1e6, rel=0.02)
    assert counts["quantize"] == 16384 * 4
    assert model.downsample_factor == 8
    assert list(dict(model.named_children())) == ["encoder", "quant_conv", "quantize", "post_quant_conv", "decoder"]


def test_shapes_size_maps_64px_to_16x16x4_latent():
    torch.manual_seed(0)
    model = MoVQ(movq_config("shapes"))
    assert model.latent_shape(64, 64) == (4, 16, 16)
    with torch.no_grad():
        recon, _, info = model(images(1, 64, 64))
    assert recon.shape == (1, 3, 64, 64) and info["indices"].shape == (1, 16, 16)
    assert MOVQ_SIZES["shapes"].ch_mult == [1, 2, 2]  # movq_config returned a copy


def test_state_dict_without_usage_buffer_loads_strictly():
    torch.manual_seed(0)
    model = MoVQ(tiny_config())
    state = {k: v for k, v in model.state_dict().items() if k != "quantize.usage"}  # as released
    MoVQ(tiny_config()).load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------------
# Codebook usage and dead codes
# ----------------------------------------------------------------------------------------------


def quantizer_with_four_codes_in_use(n_embed: int = 16) -> VectorQuantizer:
    """Codes 0-3 at the corners of a square, all others far away; 50 training passes that only
    ever select codes 0-3 (equally often)."""
    vq = VectorQuantizer(n_embed, 2, usage_decay=0.9, dead_code_threshold=0.05)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.full((n_embed, 2), 100.0) + torch.arange(n_embed)[:, None])
        vq.embedding.weight[:4] = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    corners = vq.embedding.weight[:4].detach()
    vq.train()
    for _ in range(50):
        z = corners.repeat(4, 1) + 0.1 * torch.randn(16, 2, generator=g)  # (16, 2), 4 per code
        z = z.T.reshape(1, 2, 4, 4)  # (b=1, c=2, h=4, w=4)
        vq(z)
    return vq


def test_usage_statistics():
    vq = quantizer_with_four_codes_in_use()
    stats = vq.codebook_usage()
    assert stats["used_fraction"] == pytest.approx(4 / 16)
    assert stats["dead"] == 12
    assert stats["perplexity"] == pytest.approx(4.0, rel=1e-3)
    # eval passes do not update the statistics
    before = vq.usage.clone()
    vq.eval()
    vq(torch.full((1, 2, 2, 2), 100.0))
    torch.testing.assert_close(vq.usage, before)
    vq.reset_usage()
    assert vq.codebook_usage() == {"used_fraction": 0.0, "perplexity": 0.0, "dead": 16}


def test_restart_dead_codes_moves_only_unused_codes():
    vq = quantizer_with_four_codes_in_use()
    before = vq.embedding.weight.detach().clone()
    samples = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    restarted = vq.restart_dead_codes(samples, generator=torch.Generator().manual_seed(2))
    after = vq.embedding.weight.detach()
    assert restarted == 12
    torch.testing.assert_close(after[:4], before[:4])  # used codes untouched
    assert (after[4:] != before[4:]).all()
    for code in after[4:]:  # every restarted code is one of the samples, no sample used twice
        assert (samples == code).all(dim=1).sum() == 1
    assert len({tuple(c.tolist()) for c in after[4:]}) == 12
    assert vq.codebook_usage()["dead"] == 0  # grace period
    assert vq.restart_dead_codes(samples) == 0
    # fewer samples than dead codes: drawn with replacement
    vq.reset_usage()
    assert vq.restart_dead_codes(samples[:3]) == 16
    with pytest.raises(ValueError, match="z_samples"):
        vq.restart_dead_codes(samples.T)


# ----------------------------------------------------------------------------------------------
# Gradient checkpointing
# ----------------------------------------------------------------------------------------------


def test_grad_checkpointing_gives_the_same_gradients(monkeypatch):
    torch.manual_seed(0)
    model = MoVQ(tiny_config(dropout=0.1))
    x = images(2, 32, 32)

    def grads(seed):
        model.zero_grad()
        torch.manual_seed(seed)
        recon, vq_loss, _ = model(x)
        ((recon - x).square().mean() + vq_loss).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads(1)
    calls = []
    real = layers.checkpoint
    monkeypatch.setattr(layers, "checkpoint", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    model.set_grad_checkpointing(True)
    assert model.encoder.grad_checkpointing and model.decoder.grad_checkpointing
    checkpointed = grads(1)
    assert len(calls) > 0 and all(kw["use_reentrant"] is False for kw in calls)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    model.set_grad_checkpointing(False)
    calls.clear()
    grads(1)
    assert calls == []


# ----------------------------------------------------------------------------------------------
# Discriminator and GAN losses
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["group", "batch", "none"])
def test_patch_discriminator_shapes(norm):
    disc = PatchDiscriminator(ndf=16, n_layers=2, norm=norm, norm_groups=4)
    assert disc(images(2, 64, 64)).shape == (2, 1, 14, 14)
    assert PatchDiscriminator(ndf=8, n_layers=3, norm_groups=4)(images(1, 64, 64)).shape == (1, 1, 6, 6)
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(norm="layer")


def test_hinge_losses():
    two = torch.full((2, 1, 3, 3), 2.0)
    assert hinge_d_loss(two, -two).item() == 0.0  # confident and right
    assert hinge_d_loss(torch.zeros(2, 1), torch.zeros(2, 1)).item() == 1.0
    assert hinge_d_loss(-two, two).item() == pytest.approx(3.0)  # 0.5 * (3 + 3)
    assert hinge_g_loss(two).item() == -2.0


def test_adaptive_gan_weight_is_finite_and_keeps_the_graph():
    torch.manual_seed(0)
    model, disc = MoVQ(tiny_config()), PatchDiscriminator(ndf=8, n_layers=2, norm_groups=4)
    x = images(2, 32, 32)
    recon, vq_loss, _ = model(x)
    rec_loss = (recon - x).abs().mean()
    g_loss = hinge_g_loss(disc(recon))
    weight = adaptive_gan_weight(rec_loss, g_loss, model.last_layer_weight())
    assert weight.ndim == 0 and torch.isfinite(weight) and 0 < weight.item() <= 1e4
    assert not weight.requires_grad
    # a generator loss without gradient at the last layer hits the clamp
    assert adaptive_gan_weight(rec_loss, 0 * g_loss, model.last_layer_weight(), max_weight=5.0).item() == 5.0
    (rec_loss + weight * g_loss + vq_loss).backward()  # the graph was retained
    assert model.last_layer_weight().grad is not None
    with torch.no_grad():
        recon, _, _ = model(x)
        with pytest.raises(RuntimeError, match="no autograd graph"):
            adaptive_gan_weight((recon - x).abs().mean(), hinge_g_loss(disc(recon)), model.last_layer_weight())
