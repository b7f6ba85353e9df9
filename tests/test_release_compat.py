"""The options that make kvideo compute what the released Kandinsky Video 1.1 computes.

Each option (a config key whose default keeps kvideo's computation) is compared with the
release's formula written out here with plain tensor operations (group norms by hand, attention
by hand, loops over frames), on tiny float64 models whose every parameter is drawn afresh (the
zero-initialised ones included: the conditional norms' Linears, zero convs, gates and scales; on
zeros most of these comparisons would prove nothing). Each option is also shown to change the
output, and each bad value to be refused with an error naming its key. That the defaults compute
what they computed before is the existing tests' job (test_unet, test_video_unet,
test_interpolation_unet, test_golden, ...).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from kvideo.models.interpolation_unet import GatedTemporalAttention, InterpolationUNet
from kvideo.models.temporal_layers import TemporalAttentionBlock, TemporalConvLayer, TemporalResNetBlock
from kvideo.models.unet import Attention, ConditionalGroupNorm, ResNetBlock, UNet
from kvideo.models.video_movq import video_movq_config
from kvideo.models.video_unet import VideoUNet
from kvideo.nn.temporal import TemporalConvBlend

from test_interpolation_unet import tiny_interpolation_config
from test_unet import tiny_config
from test_video_unet import tiny_video_config, video_inputs

RTOL = 1e-6
C, E, GROUPS, HEAD_DIM = 16, 32, 4, 8  # block-level tests: 16 channels in 4 groups, 2 heads


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b|."""
    return float((a - b).abs().max().detach() / b.abs().max().detach())


@torch.no_grad()
def rerandomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter drawn afresh in float64: N(0, 1/fan_in) for weights, N(0, 0.5^2) for vectors
    and scalars (gates, scales, biases)."""
    module.double()
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(module.named_parameters()):
        std = 1 / math.sqrt(p[0].numel()) if p.ndim >= 2 else 0.5
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)
    return module.eval()


def block_inputs(b: int = 2, f: int = 5, size: int = 4, seed: int = 1):
    """x (b, C, f, size, size) and a per-frame conditioning (b, f, E), float64."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, C, f, size, size, generator=g, dtype=torch.float64),
            torch.randn(b, f, E, generator=g, dtype=torch.float64))


def model_inputs(c: int, f: int):
    x, t, context, mask = video_inputs(c=c, f=f)  # sample 0 has 5 valid tokens of 8
    return x.double(), t, context.double(), mask


# ----------------------------------------------------------------------------------------------
# The release's formulas, written out
# ----------------------------------------------------------------------------------------------


def group_norm_by_hand(x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """(b, c, ...) normalised over each group's channels and every other axis."""
    xg = x.reshape(x.shape[0], groups, -1)
    mean, var = xg.mean(-1, keepdim=True), xg.var(-1, unbiased=False, keepdim=True)
    return ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)


def cgn_by_hand(norm: ConditionalGroupNorm, x: torch.Tensor, emb: torch.Tensor, per_frame: bool) -> torch.Tensor:
    """A ConditionalGroupNorm on x (b, c, f, h, w) with emb (b, f, e): statistics over the clip, or
    with `per_frame` frame by frame in a loop (the release)."""
    linear = norm.context_mlp[1]
    scale, shift = (rearrange(p, "b f c -> b c f 1 1")
                    for p in F.linear(F.silu(emb), linear.weight, linear.bias).chunk(2, dim=-1))
    groups, eps = norm.norm.num_groups, norm.norm.eps
    if per_frame:
        normed = torch.stack([group_norm_by_hand(x[:, :, j], groups, eps) for j in range(x.shape[2])], dim=2)
    else:
        normed = group_norm_by_hand(x, groups, eps)
    return normed * (1 + scale) + shift


def attention_by_hand(attn: Attention, x: torch.Tensor, context: torch.Tensor, mask=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head, then to_out: x (n, l, c), context (n, m, c), mask (n, m)."""
    heads = attn.heads

    def split(t):
        return rearrange(t, "n l (h d) -> n h l d", h=heads)

    q = split(x @ attn.to_query.weight.T)
    k, v = split(context @ attn.to_key.weight.T), split(context @ attn.to_value.weight.T)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (n, h, l, m)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return rearrange(scores.softmax(-1) @ v, "n h l d -> n l (h d)") @ attn.to_out.weight.T


def temporal_attention_by_hand(block: TemporalAttentionBlock, x, emb, per_frame) -> torch.Tensor:
    """A(N1(x)): attention over the frames of each pixel of the normed x, no residual."""
    b, _, _, h, w = x.shape
    tokens = rearrange(cgn_by_hand(block.in_norm, x, emb, per_frame), "b c f h w -> (b h w) f c")
    return rearrange(attention_by_hand(block.attention, tokens, tokens), "(b h w) f c -> b c f h w", b=b, h=h, w=w)


def feed_forward_by_hand(block: TemporalAttentionBlock, x, emb, per_frame) -> torch.Tensor:
    """F(N2(x)): the feed-forward of the normed x at every position, no residual."""
    first, last = block.feed_forward[0].weight, block.feed_forward[2].weight
    out = F.silu(rearrange(cgn_by_hand(block.out_norm, x, emb, per_frame), "b c f h w -> b f h w c") @ first.T) @ last.T
    return rearrange(out, "b f h w c -> b c f h w")


def temporal_block_by_hand(block, x, emb, per_frame) -> torch.Tensor:
    """TemporalBlock: CGN -> SiLU -> Conv3d (k, 1, 1)."""
    k = block.conv.weight.shape[2]
    return F.conv3d(F.silu(cgn_by_hand(block.norm, x, emb, per_frame)), block.conv.weight, block.conv.bias,
                    padding=(k // 2, 0, 0))


# ----------------------------------------------------------------------------------------------
# 1. UNetConfig.pool_query
# ----------------------------------------------------------------------------------------------


def test_pool_query_all_averages_every_token_padding_included():
    model = rerandomise(UNet(tiny_config(pool_query="all")))
    _, t, context, mask = model_inputs(c=4, f=1)
    pooling = model.feature_pooling.attention
    query = context.sum(dim=1, keepdim=True) / context.shape[1]  # padding included
    expected = model.time_embed(t) + attention_by_hand(pooling, query, context, mask)[:, 0]
    with torch.no_grad():
        assert relative_error(model.embed(t, context, mask), expected) < RTOL
        default = UNet(tiny_config()).double().eval()
        default.load_state_dict(model.state_dict())
        valid = context[0, :5].mean(0)  # kvideo's query for sample 0: its 5 valid tokens
        pooled_valid = attention_by_hand(pooling, valid[None, None], context[:1], mask[:1])[:, 0]
        expected_valid = model.time_embed(t[:1]) + pooled_valid
        assert relative_error(default.embed(t, context, mask)[:1], expected_valid) < RTOL
        assert relative_error(default.embed(t, context, mask), expected) > 1e-3  # padded sample 0 differs
        full = torch.ones_like(mask)
        assert torch.equal(default.embed(t, context, full), model.embed(t, context, full))  # no padding: the same


def test_pool_query_reaches_the_video_models_and_bad_values_are_named():
    assert VideoUNet(tiny_video_config(pool_query="all")).feature_pooling.query == "all"
    assert InterpolationUNet(tiny_interpolation_config(pool_query="all")).feature_pooling.query == "all"
    assert UNet(tiny_config()).feature_pooling.query == "valid"
    with pytest.raises(ValueError, match="pool_query"):
        UNet(tiny_config(pool_query="mean"))


# ----------------------------------------------------------------------------------------------
# 2. VideoUNetConfig.temporal_norm (and 4. InterpolationUNetConfig.temporal_norm)
# ----------------------------------------------------------------------------------------------


TEMPORAL_BLOCKS = {
    "resnet": lambda per_frame: TemporalResNetBlock(C, E, GROUPS, frame_norm=per_frame),
    "conv": lambda per_frame: TemporalConvLayer(C, E, GROUPS, frame_norm=per_frame),
    "attention": lambda per_frame: TemporalAttentionBlock(C, E, GROUPS, HEAD_DIM, frame_norm=per_frame),
}


@pytest.mark.parametrize("per_frame", [False, True])
def test_temporal_blocks_norm_over_the_clip_or_each_frame(per_frame):
    x, emb = block_inputs()
    resnet, conv, attention = (rerandomise(make(per_frame), seed=i) for i, make in enumerate(TEMPORAL_BLOCKS.values()))
    with torch.no_grad():
        out = x
        for block in resnet.blocks:
            out = temporal_block_by_hand(block, out, emb, per_frame)
        assert relative_error(resnet(x, emb), x + out) < RTOL
        assert relative_error(conv(x, emb), x + temporal_block_by_hand(conv.block, x, emb, per_frame)) < RTOL
        y = x + temporal_attention_by_hand(attention, x, emb, per_frame)
        assert relative_error(attention(x, emb), y + feed_forward_by_hand(attention, y, emb, per_frame)) < RTOL
        # the same weights with the other statistics compute something else
        for module, make in zip((resnet, conv, attention), TEMPORAL_BLOCKS.values()):
            other = make(not per_frame).double().eval()
            other.load_state_dict(module.state_dict())
            assert relative_error(other(x, emb), module(x, emb)) > 1e-3, type(module).__name__


def _temporal_norm_inputs(model: nn.Module, run):
    """(ranks, run()): the ranks of the inputs every ConditionalGroupNorm of the temporal layers
    receives in `run()`, 5 (b, c, f, h, w) = statistics over the clip, 4 ((b f), c, h, w) = over
    each frame."""
    ranks, hooks = set(), []
    for side in (model.temporal_down, model.temporal_up):
        for m in side.modules():
            if isinstance(m, ConditionalGroupNorm):
                hooks.append(m.register_forward_hook(lambda mod, args, out: ranks.add(args[0].ndim)))
    with torch.no_grad():
        out = run()
    for h in hooks:
        h.remove()
    return ranks, out


@pytest.mark.parametrize("placement", ["separate", "inside"])
def test_every_temporal_norm_of_the_keyframe_model_follows_temporal_norm(placement):
    x, t, context, mask = model_inputs(c=4, f=5)
    outs = {}
    for norm, rank in (("clip", 5), ("frame", 4)):
        model = rerandomise(VideoUNet(tiny_video_config(temporal_placement=placement, temporal_norm=norm)))
        ranks, outs[norm] = _temporal_norm_inputs(model, lambda: model(x, t, context, mask))
        assert ranks == {rank}, (norm, ranks)
    assert relative_error(outs["frame"], outs["clip"]) > 1e-3
    with pytest.raises(ValueError, match="temporal_norm"):
        VideoUNet(tiny_video_config(temporal_norm="pixel"))


def test_interpolation_temporal_norm_takes_each_gaps_statistics():
    x, emb = block_inputs(f=4)
    mask = torch.tensor([1.0, 1.0], dtype=torch.float64)
    gated = rerandomise(GatedTemporalAttention(C, E, GROUPS, HEAD_DIM, 4, frame_norm=True), seed=4)
    block = gated.block
    with torch.no_grad():
        y = x + temporal_attention_by_hand(block, x, emb, True)
        residual = y + feed_forward_by_hand(block, y, emb, True)
        a = gated.gate
        assert relative_error(gated(x, emb, mask), x + a * (residual - x)) < RTOL
    x, t, context, mask = model_inputs(c=20, f=4)
    skip = torch.tensor([3, 1])
    outs = {}
    for norm, rank in (("clip", 5), ("frame", 4)):
        model = rerandomise(InterpolationUNet(tiny_interpolation_config(temporal_norm=norm)))
        ranks, outs[norm] = _temporal_norm_inputs(model, lambda: model(x, t, context, mask, skip_frames=skip))
        assert ranks == {rank}, (norm, ranks)
    assert relative_error(outs["frame"], outs["clip"]) > 1e-3
    with pytest.raises(ValueError, match="temporal_norm"):
        InterpolationUNet(tiny_interpolation_config(temporal_norm="gap"))


# ----------------------------------------------------------------------------------------------
# 3. VideoUNetConfig.up_temporal_attention_first
# ----------------------------------------------------------------------------------------------


def _capture(module: nn.Module, run):
    """(args, output) of module's (first) call during run()."""
    seen = {}
    pre = module.register_forward_pre_hook(lambda mod, args: seen.setdefault("args", args))
    post = module.register_forward_hook(lambda mod, args, out: seen.setdefault("out", out))
    with torch.no_grad():
        result = run()
    pre.remove()
    post.remove()
    return seen["args"], seen["out"], result


def test_up_levels_can_run_the_temporal_attention_before_the_self_attention():
    x, t, context, mask = model_inputs(c=4, f=5)
    model = rerandomise(VideoUNet(tiny_video_config(up_temporal_attention_first=True)))
    level = model.up_samples[0]  # the lowest level: self-attention and temporal attention
    assert level.self_attention is not None and model.temporal_up[0].attention is not None
    order = []
    hooks = [m.register_forward_hook(lambda mod, a, o, name=name: order.append(name)) for name, m in (
        ("down self", model.down_samples[1].self_attention), ("down temporal", model.temporal_down[1].attention),
        ("up self", level.self_attention), ("up temporal", model.temporal_up[0].attention))]
    (h, emb, ctx, ctx_mask, bound), out, first = _capture(level, lambda: model(x, t, context, mask))
    for hook in hooks:
        hook.remove()
    assert order == ["down self", "down temporal", "up temporal", "up self"]
    with torch.no_grad():  # the level by hand: its units, then temporal attention, then self-attention
        for i, unit in enumerate(level.units):
            h = unit.in_resnet(bound.resnet(2 * i, h), emb)
            h = unit.cross_attention(h, emb, ctx, ctx_mask)
            h = unit.out_resnet(bound.resnet(2 * i + 1, h), emb)
        expected = level.self_attention(bound.attention(h), emb)
    assert relative_error(out, expected) < RTOL
    default = VideoUNet(tiny_video_config()).double().eval()
    default.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert relative_error(default(x, t, context, mask), first) > 1e-3


# ----------------------------------------------------------------------------------------------
# 5. InterpolationUNetConfig.temporal_conv_before_down
# ----------------------------------------------------------------------------------------------


def _resnet_by_hand(resnet: ResNetBlock, x, emb, after_block):
    """A spatial ResNet with the release's placement: Block i's temporal hook after its 3x3 conv,
    before its down conv when it has one."""
    h = x
    for i, block in enumerate(resnet.blocks):
        h = block.activation(block.norm(h, emb))
        if block.up is not None:
            h = block.up(h)
        h = after_block(i, block.conv(h))
        if block.down is not None:
            h = block.down(h)
    for layer in (resnet.shortcut_up, resnet.shortcut_proj, resnet.shortcut_down):
        if layer is not None:
            x = layer(x)
    return x + h


def test_interpolation_temporal_conv_can_run_before_the_down_conv():
    x, t, context, mask = model_inputs(c=20, f=4)
    skip = torch.tensor([3, 1])
    model = rerandomise(InterpolationUNet(tiny_interpolation_config(temporal_conv_before_down=True)))
    level = model.down_samples[0]  # its last ResNet halves the resolution in Block 2
    assert level.self_attention is None and level.units[-1].out_resnet.blocks[2].down is not None
    (h, emb, ctx, ctx_mask, bound), out, before = _capture(level, lambda: model(x, t, context, mask, skip_frames=skip))
    assert bound.before_down and not bound.attention_first_up
    with torch.no_grad():
        for i, unit in enumerate(level.units):
            h = _resnet_by_hand(unit.in_resnet, h, emb, bound.inner(2 * i))
            h = unit.cross_attention(h, emb, ctx, ctx_mask)
            h = _resnet_by_hand(unit.out_resnet, h, emb, bound.inner(2 * i + 1))
    assert relative_error(out, h) < RTOL
    # the blend of that Block sees the full resolution (16x16), by default the halved one
    blend = model.temporal_down[0].convs[2 * len(level.units) - 1][2]
    assert isinstance(blend, TemporalConvBlend)
    (video, _), _, _ = _capture(blend, lambda: model(x, t, context, mask, skip_frames=skip))
    default = InterpolationUNet(tiny_interpolation_config()).double().eval()
    default.load_state_dict(model.state_dict())
    (video_default, _), _, after = _capture(default.temporal_down[0].convs[2 * len(level.units) - 1][2],
                                            lambda: default(x, t, context, mask, skip_frames=skip))
    assert video.shape[-2:] == (16, 16) and video_default.shape[-2:] == (8, 8)
    assert relative_error(before, after) > 1e-3


def test_before_down_leaves_other_blocks_alone_and_checkpointing_takes_the_same_path():
    x = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    emb = torch.randn(2, 64, dtype=torch.float64)
    plain = rerandomise(ResNetBlock(32, 32, 64, 8), seed=5)
    hook = lambda i, h: h * (i + 2.0)  # noqa: E731: a different factor per Block
    with torch.no_grad():
        assert torch.equal(plain(x, emb, hook, True), plain(x, emb, hook, False))  # no down conv: nothing moves
    x, t, context, mask = model_inputs(c=20, f=4)
    skip = torch.tensor([3, 1])
    model = rerandomise(InterpolationUNet(tiny_interpolation_config(temporal_conv_before_down=True)))
    model.train()
    out = model(x, t, context, mask, skip_frames=skip)
    model.set_grad_checkpointing(True)
    again = model(x, t, context, mask, skip_frames=skip)
    assert relative_error(again, out) < RTOL
    again.square().mean().backward()
    assert model.temporal_down[0].convs[-1][2].gate.grad.abs() > 0


# ----------------------------------------------------------------------------------------------
# 6. InterpolationUNetConfig.skip_embedding, skip_table_size
# ----------------------------------------------------------------------------------------------


def test_skip_frames_table_is_a_scaled_lookup():
    model = rerandomise(InterpolationUNet(tiny_interpolation_config(skip_embedding="table", skip_table_size=7)))
    names = [n for n in model.state_dict() if n.startswith("skip_embed.")]
    assert sorted(names) == ["skip_embed.scale", "skip_embed.table.weight"]
    assert model.skip_embed.table.weight.shape == (7, 64)
    x, t, context, mask = model_inputs(c=20, f=4)
    skip = torch.tensor([3, 6])
    first_norm = model.down_samples[0].units[0].in_resnet.blocks[0].norm
    (_, emb), _, out = _capture(first_norm, lambda: model(x, t, context, mask, skip_frames=skip))
    with torch.no_grad():
        expected = model.embed(t, context, mask) + model.skip_embed.scale * model.skip_embed.table.weight[skip]
        assert relative_error(emb, expected.repeat_interleave(4, dim=0)) < RTOL  # the norms' conditioning
        assert relative_error(model(x, t, context, mask, skip_frames=torch.tensor([3, 5])), out) > 1e-4
    for bad in (torch.tensor([7, 1]), torch.tensor([-1, 1]), torch.tensor([1.5, 1.0])):
        with pytest.raises(ValueError, match="skip_frames"):
            model(x, t, context, mask, skip_frames=bad)
    with pytest.raises(ValueError, match="skip_embedding"):
        InterpolationUNet(tiny_interpolation_config(skip_embedding="mlp"))
    with pytest.raises(ValueError, match="skip_table_size"):
        InterpolationUNet(tiny_interpolation_config(skip_embedding="table", skip_table_size=0))


# ----------------------------------------------------------------------------------------------
# 7. InterpolationUNetConfig.attention_gates
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_frame", [False, True])
def test_two_gates_blend_the_non_residual_branches(per_frame):
    x, emb = block_inputs(f=4)
    m = torch.tensor([1.0, 0.0], dtype=torch.float64)  # the second sample: the unconditional branch
    gated = rerandomise(GatedTemporalAttention(C, E, GROUPS, HEAD_DIM, 4, gates=2, frame_norm=per_frame), seed=6)
    block = gated.block
    with torch.no_grad():
        a1 = (gated.gate * m).reshape(-1, 1, 1, 1, 1)
        a2 = (gated.gate_ff * m).reshape(-1, 1, 1, 1, 1)
        y1 = (1 - a1) * x + a1 * temporal_attention_by_hand(block, x, emb, per_frame)
        expected = (1 - a2) * y1 + a2 * feed_forward_by_hand(block, y1, emb, per_frame)
        out = gated(x, emb, m)
        assert relative_error(out, expected) < RTOL
        assert torch.equal(out[1], x[1])  # mask 0: the identity
        one = GatedTemporalAttention(C, E, GROUPS, HEAD_DIM, 4, gates=1, frame_norm=per_frame).double().eval()
        one.load_state_dict({k: v for k, v in gated.state_dict().items() if k != "gate_ff"})
        assert relative_error(one(x, emb, m)[:1], out[:1]) > 1e-3
    assert "gate_ff" not in one.state_dict()


def test_attention_gates_reach_the_model_and_bad_values_are_named():
    model = InterpolationUNet(tiny_interpolation_config(attention_gates=2))
    gates = [n for n in model.state_dict() if n.endswith(("attention.gate", "attention.gate_ff"))]
    assert gates and len(gates) % 2 == 0
    assert not any(n.endswith("gate_ff") for n in InterpolationUNet(tiny_interpolation_config()).state_dict())
    with pytest.raises(ValueError, match="attention_gates"):
        InterpolationUNet(tiny_interpolation_config(attention_gates=3))


# ----------------------------------------------------------------------------------------------
# Every release option at once; defaults; 8. the video MoVQ
# ----------------------------------------------------------------------------------------------


RELEASE_INTERPOLATION = dict(pool_query="all", temporal_norm="frame", temporal_conv_before_down=True,
                             skip_embedding="table", skip_table_size=20, attention_gates=2)


def test_interpolation_unet_with_every_release_option():
    model = rerandomise(InterpolationUNet(tiny_interpolation_config(**RELEASE_INTERPOLATION)))
    keys = set(model.state_dict())
    assert {"skip_embed.table.weight", "skip_embed.scale"} <= keys
    assert not any(k.startswith("skip_embed.embed.") for k in keys)
    for side in ("temporal_down", "temporal_up"):
        for prefix in ("attention.block.in_norm.context_mlp.1.weight", "attention.block.attention.to_query.weight",
                       "attention.block.out_norm.context_mlp.1.weight", "attention.block.feed_forward.0.weight",
                       "attention.gate", "attention.gate_ff"):
            assert any(k.startswith(f"{side}.") and k.endswith(prefix) for k in keys), (side, prefix)
    x, t, context, mask = model_inputs(c=20, f=4)
    with torch.no_grad():
        out = model(x, t, context, mask, skip_frames=torch.tensor([3, 1]), temporal_mask=torch.tensor([1.0, 0.0]))
    assert out.shape == (2, 12, 4, 16, 16) and torch.isfinite(out).all()


def test_keyframe_unet_with_every_release_option():
    model = rerandomise(VideoUNet(tiny_video_config(pool_query="all", temporal_norm="frame",
                                                    up_temporal_attention_first=True)))
    x, t, context, mask = model_inputs(c=4, f=5)
    with torch.no_grad():
        out = model(x, t, context, mask, motion_free=torch.tensor([False, True]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_defaults_keep_kvideos_computation():
    video, interpolation = tiny_video_config(), tiny_interpolation_config()
    assert video.pool_query == interpolation.pool_query == "valid"
    assert (video.temporal_norm, video.up_temporal_attention_first) == ("clip", False)
    assert (interpolation.temporal_norm, interpolation.temporal_conv_before_down, interpolation.skip_embedding,
            interpolation.attention_gates) == ("clip", False, "sinusoid", 1)
    model = InterpolationUNet(interpolation)
    assert {k for k in model.state_dict() if k.startswith("skip_embed.")} >= {"skip_embed.scale"}
    assert not any(k.startswith("skip_embed.table") or k.endswith("gate_ff") for k in model.state_dict())


def test_the_kandinsky_video_decoder_has_temporal_middle_blocks():
    assert video_movq_config("kandinsky").temporal_mid_blocks
    assert not video_movq_config("shapes").temporal_mid_blocks
