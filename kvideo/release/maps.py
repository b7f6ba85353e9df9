"""The key maps of the released models, and the few transformations a rename cannot express.

    k3_unet_to_kvideo(state, unet)          Kandinsky 3 `kandinsky3/model/unet.py` UNet     -> UNet
    t2v_to_kvideo(state, unet)              KV1.1 `t2v.pt['unet']` (video mode)             -> VideoUNet
    first_frame_to_kvideo(state, unet)      KV1.1 `t2v.pt['unet']` (image mode)             -> UNet (t2i)
    interpolation_to_kvideo(state, unet)    KV1.1 `interpolation.pt['unet']`                -> InterpolationUNet
    movq_to_kvideo(state, movq)             K3 / KV1.1 `movq.pt`                            -> MoVQ
    video_movq_to_kvideo(state, movq)       KV1.1 `video_movq.pt`                           -> VideoMoVQ

Each returns a `kvideo.release.keys.Conversion`; the target is built from the kvideo config the
release corresponds to (`kvideo.release.convert.RELEASE_MODEL_OPTIONS`), on the meta device when
only the report is wanted. Beyond renaming:

- The t2v UNet has two 9-channel input convs: `in_layer` (keyframes) and `image_in_layer` (the
  first frame, made in image mode with channels 4-8 zero). kvideo's first-frame model is a t2i
  UNet: the t2v spatial weights with `in_layer = image_in_layer[:, :4]`, exact in image mode.
- The interpolation UNet adds a perturbation-time embedding, always called with perturbation 0:
  te = (1 - m) to_time_embed(t) + m P, P = perturbation_to_time_embed(0). It folds exactly into
  the last linear layer: W' = (1 - m) W, b' = (1 - m) b + m P.
- The video MoVQ's temporal attention has separate q, k, v 1x1 convs (kvideo: one fused qkv), and
  its norm is called without the latent (`conv_y` / `conv_b` exist but are never used): kvideo's
  spatial norm becomes that plain GroupNorm with conv_y = 0 -> 1, conv_b = 0 -> 0.

The `*_to_release` functions run the other way (a kvideo state dict -> the release's layout):
the tests build release-layout checkpoints of tiny models with them.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
from torch import nn

from kvideo.release.keys import Conversion, Fields, KeyMap, Rename, convert

Tensors = Dict[str, torch.Tensor]

# ----------------------------------------------------------------------------------------------
# Kandinsky 3 UNet (the spatial layers of every Kandinsky UNet)
# ----------------------------------------------------------------------------------------------
# Unchanged on both sides: in_layer, out_layer.{0,2}, feature_pooling.attention.to_{query,key,value},
# down_samples.L / up_samples.J, in_norm / out_norm / attention.to_* / feed_forward.{0,2} (1x1
# convs on both sides), context_mlp.1. The release's Identity layers (no cross-attention on
# level 0, no self-attention) have no parameters, nor do kvideo's `None`s.

SPATIAL = (
    Rename("^to_time_embed.1", "time_embed.mlp.0"),  # to_time_embed.0 is the sinusoid, .2 the SiLU
    Rename("^to_time_embed.3", "time_embed.mlp.2"),
    Rename("output_layer", "to_out"),  # every Attention, the pooling's included
    Rename("self_attention_block", "self_attention"),
    Rename("resnet_attn_blocks.{i}.0", "units.{i}.in_resnet"),
    Rename("resnet_attn_blocks.{i}.1", "units.{i}.cross_attention"),
    Rename("resnet_attn_blocks.{i}.2", "units.{i}.out_resnet"),
    Rename("resnet_blocks.{i}.group_norm", "blocks.{i}.norm"),
    Rename("resnet_blocks.{i}.projection", "blocks.{i}.conv"),
    Rename("resnet_blocks.{i}.up_sample", "blocks.{i}.up"),
    Rename("resnet_blocks.{i}.down_sample", "blocks.{i}.down"),
    Rename("shortcut_up_sample", "shortcut_up"),
    Rename("shortcut_projection", "shortcut_proj"),
    Rename("shortcut_down_sample", "shortcut_down"),
)
K3_UNET = KeyMap("Kandinsky 3 UNet", SPATIAL)


def k3_unet_to_kvideo(state: Mapping[str, torch.Tensor], unet: nn.Module) -> Conversion:
    """A released Kandinsky 3 UNet state dict (original names) -> `unet`'s names (a kvideo UNet
    built with `unet_config("kandinsky")`; with `pool_query: all` it computes what the release does)."""
    return convert(state, K3_UNET, unet.state_dict())


# ----------------------------------------------------------------------------------------------
# Kandinsky Video 1.1 keyframe (t2v) UNet
# ----------------------------------------------------------------------------------------------
# The release's unit i holds five modules: .0 ResNet, .1 cross-attention, .2 ResNet, .3 and .4 the
# temporal ResNets of .0 and .2; kvideo keeps those two in `temporal_{side}.L.resnets` at slots
# 2i and 2i + 1. Each temporal ResNet block j is [norm (.0), SiLU, Conv3d (.2)].

UNIT_SLOT = Fields(
    to_kvideo=lambda g: {**g, "slot": 2 * int(g["i"]) + int(g["block"]) - 3},
    to_release=lambda g: {**g, "i": int(g["slot"]) // 2, "block": 3 + int(g["slot"]) % 2},
)

T2V_UNET = KeyMap("Kandinsky Video 1.1 t2v UNet", SPATIAL + (
    Rename("^to_temporal_embed.1", "frame_embed.mlp.0"),
    Rename("^to_temporal_embed.3", "frame_embed.mlp.2"),
    Rename("^temporal_noise_aug_time_encoding.1", "noise_aug_embed.mlp.0"),
    Rename("^temporal_noise_aug_time_encoding.3", "noise_aug_embed.mlp.2"),
    Rename("^temporal_motion_score_encoding.1", "motion_embed.mlp.0"),
    Rename("^temporal_motion_score_encoding.3", "motion_embed.mlp.2"),
    Rename("^{side}_samples.{level}.resnet_attn_blocks.{i}.{block}.temporal_resnet_blocks.{j}.0",
           "temporal_{side}.{level}.resnets.{slot}.blocks.{j}.norm", fields=UNIT_SLOT),
    Rename("^{side}_samples.{level}.resnet_attn_blocks.{i}.{block}.temporal_resnet_blocks.{j}.2",
           "temporal_{side}.{level}.resnets.{slot}.blocks.{j}.conv", fields=UNIT_SLOT),
    Rename("^{side}_samples.{level}.temporal_attention_block.temporal_norm", "temporal_{side}.{level}.attention.in_norm"),
    Rename("^{side}_samples.{level}.temporal_attention_block.ff_norm", "temporal_{side}.{level}.attention.out_norm"),
    Rename("^{side}_samples.{level}.temporal_attention_block.temporal_attention",
           "temporal_{side}.{level}.attention.attention"),
    Rename("^{side}_samples.{level}.temporal_attention_block.feed_forward",
           "temporal_{side}.{level}.attention.feed_forward"),
))
IMAGE_IN_LAYER = "image_in_layer."  # the t2v UNet's image-mode input conv: the first-frame model's


def t2v_to_kvideo(state: Mapping[str, torch.Tensor], unet: nn.Module) -> Conversion:
    """`t2v.pt['unet']` -> a kvideo VideoUNet (the keyframe model). `image_in_layer.*` is the
    first-frame model's (`first_frame_to_kvideo`), reported as consumed."""
    conversion = convert({k: v for k, v in state.items() if not k.startswith(IMAGE_IN_LAYER)}, T2V_UNET,
                         unet.state_dict())
    for key in state:
        if key.startswith(IMAGE_IN_LAYER):
            conversion.consumed[key] = "the first-frame (t2i) model's in_layer"
    return conversion


def first_frame_to_kvideo(state: Mapping[str, torch.Tensor], unet: nn.Module) -> Conversion:
    """`t2v.pt['unet']` in image mode -> a kvideo t2i UNet: every spatial weight, and the image
    input conv's first `unet.in_layer.in_channels` input channels as `in_layer` (the others see
    zeros in image mode). The temporal weights and the keyframe `in_layer` are the keyframe
    model's, reported as consumed."""
    target = unet.state_dict()
    spatial = {k: v for k, v in state.items() if K3_UNET.to_kvideo(k) in target and not k.startswith("in_layer.")}
    conversion = convert(spatial, K3_UNET, target)
    for key in state:
        if key not in spatial and not key.startswith(IMAGE_IN_LAYER):
            conversion.consumed[key] = "the keyframe model's"
    channels = target["in_layer.weight"].shape[1]
    image_in = {"weight": (slice(None), slice(None, channels)), "bias": slice(None)}  # the image mode's inputs
    for name, part in image_in.items():
        key = IMAGE_IN_LAYER + name
        if key in state:
            conversion.consumed[key] = f"in_layer.{name} of the first-frame model"
            conversion.derive(f"in_layer.{name}", state[key][part], f"{key}, input channels :{channels}")
    return conversion


def t2v_to_release(state: Mapping[str, torch.Tensor], image_in_layer: Mapping[str, torch.Tensor]) -> Tensors:
    """A kvideo VideoUNet state dict -> `t2v.pt['unet']`'s layout, with `image_in_layer` ({weight,
    bias}, 9 input channels) as the image-mode input conv; 2-d temporal feed-forward weights
    become the release's 1x1 convs."""
    out = {T2V_UNET.to_release(k): _as_conv(k, v) for k, v in state.items()}
    out.update({IMAGE_IN_LAYER + k: v for k, v in image_in_layer.items()})
    return out


# ----------------------------------------------------------------------------------------------
# Kandinsky Video 1.1 interpolation UNet
# ----------------------------------------------------------------------------------------------
# Every Block of every spatial ResNet has a `temporal_projection_new` (a gated Conv3d): kvideo's
# `temporal_{side}.L.convs.{slot}.{j}`, slot 2i / 2i + 1 for unit i's in / out ResNet. The level's
# temporal attention has two gates (`temporal_merge1/2`: kvideo's `attention_gates: 2`), the skip
# frames an embedding table (`skip_embedding: table`).

RESNET_SLOT = Fields(
    to_kvideo=lambda g: {**g, "slot": 2 * int(g["i"]) + (g["resnet"] == "out")},
    to_release=lambda g: {**g, "i": int(g["slot"]) // 2, "resnet": "out" if int(g["slot"]) % 2 else "in"},
)
_CONV = "^{side}_samples.{level}.units.{i}.{resnet}_resnet.resnet_blocks.{j}.temporal_projection_new"
_ATTENTION = "^{side}_samples.{level}.temporal_attention_block"

INTERPOLATION_UNET = KeyMap("Kandinsky Video 1.1 interpolation UNet", SPATIAL + (
    Rename(_CONV + ".temporal_merge", "temporal_{side}.{level}.convs.{slot}.{j}.gate", fields=RESNET_SLOT),
    Rename(_CONV + ".temporal_projection", "temporal_{side}.{level}.convs.{slot}.{j}.conv", fields=RESNET_SLOT),
    Rename(_ATTENTION + ".temporal_merge1", "temporal_{side}.{level}.attention.gate"),
    Rename(_ATTENTION + ".temporal_merge2", "temporal_{side}.{level}.attention.gate_ff"),
    Rename(_ATTENTION, "temporal_{side}.{level}.attention.block"),
    Rename("^skip_merge", "skip_embed.scale"),
    Rename("^skip_embeddings", "skip_embed.table"),
))
PERTURBATION = "perturbation_to_time_embed."
TIME_MERGE = "time_embed_merge"


def _perturbation_embedding(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """P = perturbation_to_time_embed(0): (time_embed_dim,), kvideo's TimestepEmbedding (the
    release's sinusoid and MLP) run on the release's weights in float64."""
    from torch.func import functional_call

    from kvideo.models.unet import TimestepEmbedding

    weights = {f"mlp.{0 if k.startswith('1.') else 2}.{k[2:]}": state[PERTURBATION + k].double()
               for k in ("1.weight", "1.bias", "3.weight", "3.bias")}
    w1 = weights["mlp.0.weight"]
    with torch.device("meta"):
        embed = TimestepEmbedding(w1.shape[1], w1.shape[0])
    return functional_call(embed, weights, (torch.zeros(1, device=w1.device),))[0]


def interpolation_to_kvideo(state: Mapping[str, torch.Tensor], unet: nn.Module) -> Conversion:
    """`interpolation.pt['unet']` -> a kvideo InterpolationUNet, the perturbation embedding folded
    into `time_embed.mlp.2` (exact: the release always passes perturbation time 0)."""
    folded = [k for k in state if k.startswith(PERTURBATION) or k == TIME_MERGE]
    conversion = convert({k: v for k, v in state.items() if k not in folded}, INTERPOLATION_UNET, unet.state_dict())
    if not folded:
        return conversion
    m = state[TIME_MERGE].reshape(()).double()
    p = _perturbation_embedding(state)
    w, b = conversion.state_dict["time_embed.mlp.2.weight"], conversion.state_dict["time_embed.mlp.2.bias"]
    how = "(1 - time_embed_merge) to_time_embed.3 + time_embed_merge perturbation_to_time_embed(0)"
    conversion.derive("time_embed.mlp.2.weight", ((1 - m) * w.double()).to(w.dtype), how)
    conversion.derive("time_embed.mlp.2.bias", ((1 - m) * b.double() + m * p).to(b.dtype), how)
    for key in folded:
        conversion.consumed[key] = "folded into time_embed.mlp.2 (perturbation time 0)"
    return conversion


def interpolation_to_release(state: Mapping[str, torch.Tensor], perturbation: Mapping[str, torch.Tensor],
                             merge: float) -> Tensors:
    """A kvideo InterpolationUNet state dict -> `interpolation.pt['unet']`'s layout, with the
    perturbation embedding `perturbation` ({1,3}.{weight,bias}) mixed in by `merge` (!= 1) and
    `to_time_embed.3` unfolded so that folding gives `state` back."""
    out = {INTERPOLATION_UNET.to_release(k): _as_conv(k, v) for k, v in state.items()}
    out.update({PERTURBATION + k: v for k, v in perturbation.items()})
    out[TIME_MERGE] = torch.tensor([merge], dtype=state["time_embed.mlp.2.weight"].dtype)
    p = _perturbation_embedding(out)
    w, b = state["time_embed.mlp.2.weight"].double(), state["time_embed.mlp.2.bias"].double()
    out["to_time_embed.3.weight"] = (w / (1 - merge)).to(state["time_embed.mlp.2.weight"].dtype)
    out["to_time_embed.3.bias"] = ((b - merge * p) / (1 - merge)).to(state["time_embed.mlp.2.bias"].dtype)
    return out


def _as_conv(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """A kvideo temporal feed-forward's Linear weight [o, i] -> the release's 1x1 conv [o, i, 1, 1];
    a scalar gate -> the release's [1]."""
    if tensor.ndim == 0:
        return tensor.reshape(1)
    if key.startswith("temporal_") and ".feed_forward." in key and tensor.ndim == 2:
        return tensor[:, :, None, None]
    return tensor


# ----------------------------------------------------------------------------------------------
# MoVQ and the video MoVQ
# ----------------------------------------------------------------------------------------------
# The Kandinsky 3 / Kandinsky Video 1.1 `movq.pt` builds every encoder norm as a
# SpatialNorm(zq=None) around a GroupNorm, so its encoder norms are named
# `encoder.down.0.block.0.norm1.norm_layer.weight`; kvideo's encoder norms are plain GroupNorms
# (`...norm1.weight`, the MoVQGAN names). Every other name is the same on both sides. The
# release has no codebook (`quantize.*`: it never quantises); its decoder takes the continuous
# latent, as `MoVQ.decode` does.

MOVQ_RULES = (Rename("{norm}.norm_layer", "{norm}", scope="encoder."),)
MOVQ = KeyMap("MoVQ", MOVQ_RULES)
NO_CODEBOOK = ("quantize.",)  # kvideo keys the release lacks (its decoder never quantises)


def movq_to_kvideo(state: Mapping[str, torch.Tensor], movq: nn.Module) -> Conversion:
    """A released MoVQ state dict (`movq.pt`) -> `movq`'s names.

    The release lacks `quantize.embedding.weight` (and kvideo's `quantize.usage` buffer): they
    come back as unfilled, so load with `strict=False` after
    `conversion.require(unfilled_ok=NO_CODEBOOK)`; `decode` never reads the codebook."""
    return convert(state, MOVQ, movq.state_dict())


# The video decoder: every decoder ResNet block's `temporal_merge{n}` / `temporal_projection{n}`
# (n = 1 after conv1, 2 after conv2) is kvideo's `temporal_convs.<block>.{n - 1}`; the temporal
# attentions are `temporal_attn.mid_attn_1` and `temporal_attn.up_{u}_attn_{i}`.
AFTER_CONV = Fields(to_kvideo=lambda g: {**g, "after": int(g["n"]) - 1},
                    to_release=lambda g: {**g, "n": int(g["after"]) + 1})
VIDEO_MOVQ = KeyMap("Kandinsky Video 1.1 video MoVQ", MOVQ_RULES + (
    Rename("^decoder.mid.block_{b}.temporal_merge{n}", "temporal_convs.mid_block_{b}.{after}.gate", fields=AFTER_CONV),
    Rename("^decoder.mid.block_{b}.temporal_projection{n}", "temporal_convs.mid_block_{b}.{after}.conv",
           fields=AFTER_CONV),
    Rename("^decoder.up.{u}.block.{b}.temporal_merge{n}", "temporal_convs.up_{u}_block_{b}.{after}.gate",
           fields=AFTER_CONV),
    Rename("^decoder.up.{u}.block.{b}.temporal_projection{n}", "temporal_convs.up_{u}_block_{b}.{after}.conv",
           fields=AFTER_CONV),
    Rename("^decoder.mid.temporal_attn_1", "temporal_attn.mid_attn_1"),
    Rename("^decoder.up.{u}.temporal_attn.{i}", "temporal_attn.up_{u}_attn_{i}"),
))
QKV = ("q", "k", "v")
UNUSED_NORM = ("conv_y", "conv_b")  # the temporal attention's norm is called without the latent
# kvideo's spatial norm norm(x) * conv_y(zq) + conv_b(zq) is the plain GroupNorm with these
PLAIN_NORM = {"conv_y.weight": 0.0, "conv_y.bias": 1.0, "conv_b.weight": 0.0, "conv_b.bias": 0.0}


def _temporal_attention_prefixes(keys) -> list:
    return sorted({k[: k.index(".q.")] for k in keys if ".temporal_attn" in k and ".q." in k})


def video_movq_to_kvideo(state: Mapping[str, torch.Tensor], movq: nn.Module) -> Conversion:
    """`video_movq.pt` -> a kvideo VideoMoVQ (`temporal_mid_blocks: true` when the file has the
    middle blocks' temporal convs): q, k, v fused into qkv, the unused norm inputs set so kvideo's
    norm is the plain GroupNorm the release runs. The codebook is unfilled, as for `movq.pt`."""
    state = dict(state)
    fused: Dict[str, str] = {}
    consumed: Dict[str, str] = {}
    for prefix in _temporal_attention_prefixes(state):
        for name in ("weight", "bias"):
            parts = [state.pop(f"{prefix}.{p}.{name}") for p in QKV]
            state[f"{prefix}.qkv.{name}"] = torch.cat(parts, dim=0)
            fused[f"{prefix}.qkv.{name}"] = name
            for p in QKV:
                consumed[f"{prefix}.{p}.{name}"] = f"fused into {VIDEO_MOVQ.to_kvideo(prefix)}.qkv.{name}"
        for unused in UNUSED_NORM:
            for name in ("weight", "bias"):
                key = f"{prefix}.norm.{unused}.{name}"
                if state.pop(key, None) is not None:
                    consumed[key] = "never used by the release (its norm is called without the latent)"
    conversion = convert(state, VIDEO_MOVQ, movq.state_dict())
    conversion.consumed.update(consumed)
    for prefix in _temporal_attention_prefixes(consumed):
        target = VIDEO_MOVQ.to_kvideo(prefix) + ".norm."
        like = conversion.state_dict[VIDEO_MOVQ.to_kvideo(prefix) + ".qkv.weight"]
        shapes = movq.state_dict()
        for name, value in PLAIN_NORM.items():
            conversion.derive(target + name, torch.full(shapes[target + name].shape, value, dtype=like.dtype,
                                                        device=like.device), f"{value:g}: a plain GroupNorm")
    return conversion


def video_movq_to_release(state: Mapping[str, torch.Tensor], unused: Optional[Mapping[str, torch.Tensor]] = None
                          ) -> Tensors:
    """A kvideo VideoMoVQ state dict -> `video_movq.pt`'s layout: qkv split into q, k, v; the
    temporal attention norms' conv_y / conv_b from `unused` (release names), which the release
    never reads, else kvideo's."""
    out: Tensors = {}
    for key, value in state.items():
        name = VIDEO_MOVQ.to_release(key)
        if ".qkv." in name:
            prefix, kind = name.split(".qkv.")
            for part, chunk in zip(QKV, value.chunk(3, dim=0)):
                out[f"{prefix}.{part}.{kind}"] = chunk.clone()
        else:
            out[name] = value.reshape(1) if value.ndim == 0 else value
    out.update(unused or {})
    return out


# ----------------------------------------------------------------------------------------------
# The T5 projection
# ----------------------------------------------------------------------------------------------
# `t5_projections.pt['projection_base']` is nn.Sequential(Linear(4096, 4096, bias=False),
# LayerNorm(4096)); kvideo's text encoder calls them `proj` and `norm` (with
# `projection_bias: false`). The release's `projection_interpolation` is loaded but never used by
# its pipeline: interpolation is conditioned through `projection_base` too.

T5_PROJECTION = KeyMap("Kandinsky Video 1.1 T5 projection", (Rename("^0", "proj"), Rename("^1", "norm")))
