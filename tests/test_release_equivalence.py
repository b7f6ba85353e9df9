"""kvideo's Kandinsky 3 UNet and MoVQ compute what diffusers' reference implementations compute.

Route, for each network (tiny configs, fp32, CPU):

    a random kvideo model, every parameter drawn afresh (many start at zero: a test on zeros
    proves nothing)
      -> its state dict under the release's names (kvideo.release, the inverse map)
      -> back through the release -> kvideo map: the same tensors under the same names
      -> diffusers' names by the maps of diffusers' own conversion scripts, re-expressed below
      -> a strict load into the diffusers model of the matching config
      -> the same inputs through both: outputs equal within RTOL (relative to the output's scale)

The diffusers maps here are written from the scripts, not from kvideo.release, so a wrong rule
in kvideo.release lands a tensor in the wrong place (or nowhere) and the comparison fails;
`test_*_detects_a_swapped_tensor` shows that the random weights make such a swap visible.
diffusers' MoVQ script reads unwrapped encoder norms, so the release's one MoVQ rule (the
encoder's `norm_layer` wrapping) is checked against the release's structure instead: every
encoder GroupNorm, and nothing else, is wrapped.

Known difference, not a key-map matter: kvideo pools the context with the mean of the *valid*
tokens, the release and diffusers with the mean of all of them (kvideo.models.unet). The
equality tests use an all-valid mask; the padded test shows that this query is the only
difference.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Dict, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kvideo.models.movq import MoVQ, MovqConfig, movq_config
from kvideo.models.unet import UNet, UNetConfig, unet_config
from kvideo.release import K3_UNET, MOVQ, k3_unet_to_kvideo, movq_to_kvideo, to_release_names

diffusers = pytest.importorskip("diffusers")

RTOL = 1e-5
State = Dict[str, torch.Tensor]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b|: the error relative to the reference output's scale."""
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def rerandomise(module: nn.Module, seed: int) -> None:
    """Draw every parameter afresh: N(0, 1/fan_in) for weights, N(0, 0.5^2) for vectors and scalars."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(module.named_parameters()):
        std = 1 / math.sqrt(p[0].numel()) if p.ndim >= 2 else 0.5
        p.copy_(torch.randn(p.shape, generator=g) * std)


def swap(state: State, a: str, b: str) -> State:
    """`state` with the tensors of keys a and b exchanged (two equally shaped tensors)."""
    out = dict(state)
    out[a], out[b] = state[b], state[a]
    return out


# ----------------------------------------------------------------------------------------------
# diffusers' names, re-expressed from its conversion scripts
# ----------------------------------------------------------------------------------------------
# scripts/convert_kandinsky3_unet.py (huggingface/diffusers @ 83d1e6ae): plain substring
# replacements, then `resnet_attn_blocks.i.{0,1,2}` -> resnets_in.i / attentions.(i+1) /
# resnets_out.i (attentions.0 is the level's self-attention). It reads a K3 checkpoint that also
# holds the T5 projection as projection_lin / projection_ln.

K3_TO_DIFFUSERS = (
    ("to_time_embed.1", "time_embedding.linear_1"), ("to_time_embed.3", "time_embedding.linear_2"),
    ("in_layer", "conv_in"), ("out_layer.0", "conv_norm_out"), ("out_layer.2", "conv_out"),
    ("down_samples", "down_blocks"), ("up_samples", "up_blocks"),
    ("projection_lin", "encoder_hid_proj.projection_linear"), ("projection_ln", "encoder_hid_proj.projection_norm"),
    ("feature_pooling", "add_time_condition"), ("to_query", "to_q"), ("to_key", "to_k"), ("to_value", "to_v"),
    ("output_layer", "to_out.0"), ("self_attention_block", "attentions.0"),
)


def diffusers_unet_name(key: str) -> str:
    """An original Kandinsky 3 UNet name -> diffusers' Kandinsky3UNet name."""
    for old, new in K3_TO_DIFFUSERS:
        key = key.replace(old, new)
    m = re.search(r"\.resnet_attn_blocks\.(\d+)\.([012])\.", key)
    if m:
        i = int(m.group(1))
        part = {"0": f"resnets_in.{i}", "1": f"attentions.{i + 1}", "2": f"resnets_out.{i}"}[m.group(2)]
        key = key.replace(m.group(0), f".{part}.")
    return key


# scripts/convert_kandinsky_to_diffusers.py (@ 89764711), the movq_* functions. It reads the
# MoVQGAN names with plain encoder norms (`norm1.weight`), so the release's encoder wrapping
# (`norm1.norm_layer.weight`) is undone first; decoder norms keep theirs. Attention q/k/v/proj_out
# are 1x1 convs in the checkpoint and Linears in diffusers (`[:, :, 0, 0]`).

MOVQ_ATTENTION = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def diffusers_movq_name(key: str, levels: int) -> str:
    """A release MoVQ name -> diffusers' VQModel(norm_type="spatial") name."""
    if key.startswith("encoder."):
        key = key.replace(".norm_layer.", ".")
    key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.attn\.", r"encoder.down_blocks.\1.attentions.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", key)
    # decoder.up.i is level i (0 = full resolution); diffusers' up_blocks run from the lowest resolution
    key = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.block\.", r"decoder.up_blocks.\1.resnets.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.attn\.", r"decoder.up_blocks.\1.attentions.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsample\.", r"decoder.up_blocks.\1.upsamplers.0.", key)
    key = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m.group(1)) - 1}.", key)
    key = key.replace(".mid.attn_1.", ".mid_block.attentions.0.")
    key = key.replace(".nin_shortcut.", ".conv_shortcut.").replace("coder.norm_out.", "coder.conv_norm_out.")
    norm = "group_norm" if key.startswith("encoder.") else "spatial_norm"
    key = re.sub(r"(attentions\.\d+)\.norm\.", rf"\1.{norm}.", key)
    return re.sub(r"(attentions\.\d+)\.(q|k|v|proj_out)\.", lambda m: f"{m.group(1)}.{MOVQ_ATTENTION[m.group(2)]}.", key)


def diffusers_movq_state(release: State, levels: int) -> State:
    """A release MoVQ state dict (plus a codebook) under diffusers' names and shapes."""
    out = {}
    for key, tensor in release.items():
        name = diffusers_movq_name(key, levels)
        if re.search(r"attentions\.\d+\.to_(q|k|v|out\.0)\.weight$", name):
            tensor = tensor[:, :, 0, 0]
        out[name] = tensor
    return out


# ----------------------------------------------------------------------------------------------
# The UNet: kvideo UNet (image mode) vs diffusers Kandinsky3UNet
# ----------------------------------------------------------------------------------------------
# diffusers fixes add_cross_attention / add_self_attention to the release's (F, T, T, T) and
# zips them with the levels, so only a 4-level config mirrors correctly; its init channels are
# block_out_channels[0] // 2, expansion 4, compression 2, out_channels = in_channels.

RAW_DIM = 24  # the text encoder's width, before diffusers' encoder_hid_proj


def tiny_unet_config() -> UNetConfig:
    """4 levels of 16/32/32/64 channels, init 8, 4 norm groups, heads of 8: 1.1M parameters."""
    return UNetConfig(
        in_channels=4, out_channels=4, model_channels=16, init_channels=8, time_embed_dim=32, context_dim=16,
        groups=4, head_dim=8, dim_mult=[1, 2, 2, 4], num_blocks=[3, 3, 3, 3],
        add_cross_attention=[False, True, True, True], add_self_attention=[False, True, True, True],
    )


def diffusers_unet(cfg: UNetConfig) -> nn.Module:
    """diffusers' Kandinsky3UNet with the architecture of `cfg`."""
    assert len(set(cfg.num_blocks)) == 1 and cfg.init_channels == cfg.model_channels // 2
    return diffusers.Kandinsky3UNet(
        in_channels=cfg.in_channels, time_embedding_dim=cfg.time_embed_dim, groups=cfg.groups,
        attention_head_dim=cfg.head_dim, layers_per_block=cfg.num_blocks[0],
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.dim_mult),
        cross_attention_dim=cfg.context_dim, encoder_hid_dim=RAW_DIM,
    )


def text_projection(cfg: UNetConfig, seed: int) -> State:
    """The T5 projection (Linear without bias, LayerNorm) in the K3 names diffusers' script reads."""
    g = torch.Generator().manual_seed(seed)
    return {
        "projection_lin.weight": torch.randn(cfg.context_dim, RAW_DIM, generator=g) / math.sqrt(RAW_DIM),
        "projection_ln.weight": 1 + 0.5 * torch.randn(cfg.context_dim, generator=g),
        "projection_ln.bias": 0.5 * torch.randn(cfg.context_dim, generator=g),
    }


def project(raw: torch.Tensor, projection: State) -> torch.Tensor:
    """The tokens kvideo's UNet takes: diffusers' encoder_hid_proj applied outside the network."""
    x = F.linear(raw, projection["projection_lin.weight"])
    return F.layer_norm(x, x.shape[-1:], projection["projection_ln.weight"], projection["projection_ln.bias"])


class UNetPair:
    """A re-randomised kvideo UNet and a diffusers Kandinsky3UNet loaded through the release's names."""

    def __init__(self, change_release: Optional[Callable[[State], State]] = None) -> None:
        torch.manual_seed(0)
        self.cfg = tiny_unet_config()
        self.kvideo = UNet(self.cfg).eval()
        rerandomise(self.kvideo, seed=1)
        own = self.kvideo.state_dict()
        self.release = to_release_names(own, K3_UNET)
        self.conversion = k3_unet_to_kvideo(self.release, self.kvideo)
        self.projection = text_projection(self.cfg, seed=2)
        release = {**self.release, **self.projection}
        if change_release is not None:
            release = change_release(release)
        self.diffusers_state = {diffusers_unet_name(k): v for k, v in release.items()}
        self.diffusers = diffusers_unet(self.cfg).eval()
        self.diffusers.load_state_dict(self.diffusers_state, strict=True)

    def inputs(self, b: int = 2, n: int = 5, seed: int = 3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(b, self.cfg.in_channels, 16, 16, generator=g)
        t = torch.tensor([981, 17])[:b]
        raw = torch.randn(b, n, RAW_DIM, generator=g)
        return x, t, raw, torch.ones(b, n, dtype=torch.bool)

    @torch.no_grad()
    def outputs(self, x, t, raw, mask):
        """(kvideo, diffusers) predictions for the same inputs."""
        ours = self.kvideo(x, t, project(raw, self.projection), mask)
        theirs = self.diffusers(x, t, encoder_hidden_states=raw, encoder_attention_mask=mask).sample
        return ours, theirs


@pytest.fixture(scope="module")
def unet_pair() -> UNetPair:
    return UNetPair()


def test_unet_key_maps_cover_every_parameter(unet_pair):
    pair = unet_pair
    assert pair.conversion.complete and not pair.conversion.reshaped, pair.conversion.report()
    own = pair.kvideo.state_dict()
    assert pair.conversion.state_dict.keys() == own.keys()
    assert all(torch.equal(pair.conversion.state_dict[k], own[k]) for k in own)  # release -> kvideo undoes the inverse
    theirs = pair.diffusers.state_dict()
    assert pair.diffusers_state.keys() == theirs.keys()  # nothing left over on either side
    assert all(pair.diffusers_state[k].shape == theirs[k].shape for k in theirs)
    assert all(v.abs().max() > 0 for v in own.values())  # no zero-initialised tensor left


def test_unet_key_maps_cover_the_released_size():
    """The 3.0B release: kvideo's `kandinsky` UNet, renamed through the release's names, has
    exactly diffusers' default Kandinsky3UNet keys and shapes (built on the meta device)."""
    with torch.device("meta"):
        unet = UNet(unet_config("kandinsky"))
        theirs = diffusers.Kandinsky3UNet().state_dict()
    release = to_release_names(unet.state_dict(), K3_UNET)
    assert k3_unet_to_kvideo(release, unet).complete
    renamed = {diffusers_unet_name(k): v.shape for k, v in release.items()}
    expected = {k: v.shape for k, v in theirs.items() if not k.startswith("encoder_hid_proj.")}
    assert renamed == expected
    assert len(renamed) == 1068


def test_unet_image_mode_equals_diffusers(unet_pair):
    ours, theirs = unet_pair.outputs(*unet_pair.inputs())
    assert theirs.abs().max() > 0.1
    error = relative_error(ours, theirs)
    print(f"UNet relative error {error:.2e}")
    assert error < RTOL


def test_unet_padded_context_differs_only_in_the_pooling_query(unet_pair):
    """With padding, kvideo's pooled query (mean of the valid tokens) is not diffusers' (mean of
    all tokens). The same network with diffusers' query, assembled from kvideo's own parts,
    matches: the cross-attention masks agree."""
    pair = unet_pair
    x, t, raw, mask = pair.inputs()
    mask[0, 3:] = False  # sample 0 has 3 valid tokens of 5
    ours, theirs = pair.outputs(x, t, raw, mask)
    assert relative_error(ours, theirs) > 1e-3
    with torch.no_grad():
        context = project(raw, pair.projection)
        pooling = pair.kvideo.feature_pooling.attention
        pooled = pooling(context.mean(dim=1, keepdim=True), context, mask)[:, 0]  # (b, time_embed_dim)
        emb = pair.kvideo.time_embed(t) + pooled
        all_token_query = pair.kvideo.run_levels(x, emb, context, mask)
    assert relative_error(all_token_query, theirs) < RTOL


def test_unet_comparison_detects_a_swapped_tensor():
    """Two equally shaped tensors exchanged on the way to diffusers: the outputs part."""
    a = "down_samples.2.resnet_attn_blocks.1.1.in_norm.context_mlp.1.weight"
    b = "down_samples.2.resnet_attn_blocks.1.1.out_norm.context_mlp.1.weight"
    pair = UNetPair(change_release=lambda state: swap(state, a, b))
    ours, theirs = pair.outputs(*pair.inputs())
    assert relative_error(ours, theirs) > 1e-3


# ----------------------------------------------------------------------------------------------
# The MoVQ: kvideo MoVQ vs diffusers VQModel(norm_type="spatial")
# ----------------------------------------------------------------------------------------------
# diffusers' SpatialNorm always uses 32 groups, so the tiny model keeps 32 and widths of 32/64.
#
# Around the quantiser: the cascade never quantises (the release decodes the continuous latent,
# diffusers' `force_not_quantize=True`), so the main comparison is encode -> continuous latent and
# continuous latent -> decode. The codebook is compared apart: with the same (re-randomised)
# codebook both pick the same codes for the same latent, and the full quantised round trip
# (kvideo `forward(x, quantize=True)`, diffusers `forward(x)`) agrees. The release has no codebook:
# the one loaded into diffusers is kvideo's.


def tiny_movq_config() -> MovqConfig:
    """f = 4, widths 32/64/64, 32 norm groups, attention at the lowest level, 64 codes."""
    return MovqConfig(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_levels=[-1], z_channels=4, embed_dim=4,
                      n_embed=64, norm_groups=32, resolution=16)


def diffusers_movq(cfg: MovqConfig) -> nn.Module:
    """diffusers' VQModel with the architecture of `cfg` (attention at the lowest level only)."""
    levels = len(cfg.ch_mult)
    assert cfg.norm_groups == 32 and cfg.z_channels == cfg.embed_dim and [a % levels for a in cfg.attn_levels] == [levels - 1]
    return diffusers.VQModel(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.z_channels,
        down_block_types=("DownEncoderBlock2D",) * (levels - 1) + ("AttnDownEncoderBlock2D",),
        up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * (levels - 1),
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
        num_vq_embeddings=cfg.n_embed, vq_embed_dim=cfg.embed_dim, norm_num_groups=cfg.norm_groups,
        norm_type="spatial",
    )


class MovqPair:
    """A re-randomised kvideo MoVQ and a diffusers VQModel loaded through the release's names."""

    def __init__(self, change_release: Optional[Callable[[State], State]] = None) -> None:
        torch.manual_seed(0)
        self.cfg = tiny_movq_config()
        self.kvideo = MoVQ(self.cfg).eval()
        rerandomise(self.kvideo, seed=1)
        own = self.kvideo.state_dict()
        names = to_release_names(own, MOVQ)
        self.release = {k: v for k, v in names.items() if not k.startswith("quantize.")}  # as in movq.pt
        self.conversion = movq_to_kvideo(self.release, self.kvideo)
        release = dict(self.release)
        if change_release is not None:
            release = change_release(release)
        release["quantize.embedding.weight"] = own["quantize.embedding.weight"]  # the script needs one
        self.diffusers_state = diffusers_movq_state(release, len(self.cfg.ch_mult))
        self.diffusers = diffusers_movq(self.cfg).eval()
        self.diffusers.load_state_dict(self.diffusers_state, strict=True)

    def images(self, b: int = 2, seed: int = 3) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.rand(b, 3, 16, 16, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def movq_pair() -> MovqPair:
    return MovqPair()


def test_movq_key_maps_cover_every_parameter(movq_pair):
    pair = movq_pair
    conversion = pair.conversion
    assert not conversion.unmapped and not conversion.reshaped, conversion.report()
    assert sorted(conversion.unfilled) == ["quantize.embedding.weight", "quantize.usage"]
    conversion.require(unfilled_ok=("quantize.",))
    # the release wraps every encoder GroupNorm in a SpatialNorm(zq=None): `<norm>.norm_layer.*`
    norms = [name for name, m in pair.kvideo.encoder.named_modules() if isinstance(m, nn.GroupNorm)]
    wrapped = {f"encoder.{name}.norm_layer.{p}" for name in norms for p in ("weight", "bias")}
    assert {k for k in pair.release if k.startswith("encoder.") and ".norm_layer." in k} == wrapped
    own = pair.kvideo.state_dict()
    assert all(torch.equal(conversion.state_dict[k], own[k]) for k in conversion.state_dict)
    theirs = pair.diffusers.state_dict()
    assert pair.diffusers_state.keys() == theirs.keys()
    assert all(pair.diffusers_state[k].shape == theirs[k].shape for k in theirs)


def test_movq_key_maps_cover_the_released_size():
    """The released 270M MoVQ (widths 256/512/512/1024): kvideo's `kandinsky` MoVQ, through the
    release's names, has exactly the keys and shapes of diffusers' VQModel of that config."""
    cfg = movq_config("kandinsky")
    with torch.device("meta"):
        movq = MoVQ(cfg)
        theirs = diffusers_movq(cfg).state_dict()
    release = {k: v for k, v in to_release_names(movq.state_dict(), MOVQ).items() if k != "quantize.usage"}
    assert len(release) == 431  # the release's 430 and the codebook
    renamed = {k: v.shape for k, v in diffusers_movq_state(release, len(cfg.ch_mult)).items()}
    assert renamed == {k: v.shape for k, v in theirs.items()}


def test_movq_encode_and_decode_equal_diffusers(movq_pair):
    pair = movq_pair
    x = pair.images()
    with torch.no_grad():
        z, z_ref = pair.kvideo.encode(x), pair.diffusers.encode(x).latents
        decoded = pair.kvideo.decode(z_ref)
        decoded_ref = pair.diffusers.decode(z_ref, force_not_quantize=True).sample
    errors = relative_error(z, z_ref), relative_error(decoded, decoded_ref)
    print(f"MoVQ relative errors: encode {errors[0]:.2e}, decode {errors[1]:.2e}")
    assert z_ref.abs().max() > 0.1 and decoded_ref.abs().max() > 0.1
    assert max(errors) < RTOL


def test_movq_quantiser_equals_diffusers(movq_pair):
    """Same codes for the same latent, and the same quantised round trip. (The loss values agree;
    diffusers' legacy quantiser puts beta on the codebook term, kvideo on the commitment term,
    which changes the gradients only.)"""
    pair = movq_pair
    x = pair.images()
    with torch.no_grad():
        z = pair.diffusers.encode(x).latents
        zq, loss, info = pair.kvideo.quantize(z)
        zq_ref, loss_ref, (_, _, indices_ref) = pair.diffusers.quantize(z)
        rec, _, _ = pair.kvideo(x, quantize=True)
        rec_ref = pair.diffusers(x).sample
    assert torch.equal(info["indices"].flatten(), indices_ref.flatten())
    assert info["used_codes"] > 2  # not every position snapped to one code
    torch.testing.assert_close(zq, zq_ref, rtol=0, atol=0)
    torch.testing.assert_close(loss, loss_ref, rtol=RTOL, atol=0)
    assert relative_error(rec, rec_ref) < RTOL


def test_movq_comparison_detects_a_swapped_tensor():
    """Two equally shaped tensors exchanged on the way to diffusers: the outputs part."""
    pair = MovqPair(change_release=lambda state: swap(state, "encoder.mid.attn_1.q.weight", "encoder.mid.attn_1.k.weight"))
    x = pair.images()
    with torch.no_grad():
        z, z_ref = pair.kvideo.encode(x), pair.diffusers.encode(x).latents
    assert relative_error(z, z_ref) > 1e-3


# ----------------------------------------------------------------------------------------------
# kvideo.release's reporting
# ----------------------------------------------------------------------------------------------


def test_conversion_reports_what_is_left_over_and_refuses_bad_shapes():
    with torch.device("meta"):
        unet = UNet(tiny_unet_config())
    release = to_release_names(unet.state_dict(), K3_UNET)
    release["projection_lin.weight"] = release.pop("to_time_embed.1.weight")  # one foreign, one missing
    conversion = k3_unet_to_kvideo(release, unet)
    assert conversion.unmapped == ["projection_lin.weight"]
    assert conversion.unfilled == ["time_embed.mlp.0.weight"]
    assert not conversion.complete and "1 release keys unmapped" in conversion.report()
    with pytest.raises(KeyError, match="time_embed.mlp.0.weight"):
        conversion.require()
    release = to_release_names(unet.state_dict(), K3_UNET)
    release["in_layer.weight"] = torch.empty(8, 4, 3, 1, device="meta")
    with pytest.raises(ValueError, match="in_layer.weight"):
        k3_unet_to_kvideo(release, unet)
    # a 1x1 conv weight fits a Linear and a [1] gate a scalar; nothing else is reshaped
    squeezed = movq_to_kvideo({"quant_conv.weight": torch.ones(4, 4)}, MoVQ(tiny_movq_config()))
    assert squeezed.reshaped == ["quant_conv.weight"] and squeezed.state_dict["quant_conv.weight"].shape == (4, 4, 1, 1)
