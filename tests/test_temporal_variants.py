"""The temporal-layer variants (placement x kind) and the motion-free mode of the video UNet."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from kvideo.models.temporal_layers import KINDS, PLACEMENTS, TemporalAttentionBlock
from kvideo.models.video_unet import VideoUNet, load_image_weights
from kvideo.registry import count_parameters

from test_video_unet import frame_by_frame, randomise_temporal, tiny_video_config, trained_image_unet, video_inputs

VARIANTS = list(itertools.product(PLACEMENTS, KINDS))


@pytest.mark.parametrize("placement,kind", VARIANTS)
def test_every_variant_is_the_image_unet_at_init_and_mixes_frames_once_trained(placement, kind):
    image = trained_image_unet()
    torch.manual_seed(0)
    video = VideoUNet(tiny_video_config(temporal_placement=placement, temporal_kind=kind)).eval()
    load_image_weights(video, image.state_dict())
    x, t, context, mask = video_inputs()
    with torch.no_grad():
        out = video(x, t, context, mask, motion_score=torch.tensor([3.0, 50.0]))
        expected = frame_by_frame(image, x, t, context, mask)
        assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()
        randomise_temporal(video)
        y = x.clone()
        y[:, :, 4] += 1.0  # change the last frame only: once trained, frame 0 sees it
        a, b = video(x, t, context, mask), video(y, t, context, mask)
        assert not torch.allclose(a[:, :, 0], b[:, :, 0], atol=1e-5)
        # image mode bypasses every temporal layer of every variant
        assert torch.allclose(video(x, t, context, mask, temporal=False), expected, atol=1e-5)


def test_variants_differ_in_their_temporal_layers():
    counts = {}
    image_params = count_parameters(trained_image_unet())["total_params"]
    for placement, kind in VARIANTS:
        info = count_parameters(VideoUNet(tiny_video_config(temporal_placement=placement, temporal_kind=kind)))
        counts[placement, kind] = info["temporal_params"]
        assert info["total_params"] - info["temporal_params"] == image_params  # the spatial layers are untouched
    assert len(set(counts.values())) == len(VARIANTS), counts
    # inside each ResNet, "both" is the layers of "conv" plus those of "attention"; the temporal
    # embeddings (no layer) are what a model with no temporal layer at all would count
    video = VideoUNet(tiny_video_config())
    embeds = counts["separate", "both"] - sum(p.numel() for m in (video.temporal_down, video.temporal_up)
                                              for p in m.parameters())
    assert counts["inside", "both"] - embeds == (counts["inside", "conv"] - embeds) + (counts["inside", "attention"] - embeds)
    with pytest.raises(ValueError, match="temporal_kind"):
        VideoUNet(tiny_video_config(temporal_kind="lstm"))
    with pytest.raises(ValueError, match="temporal_placement"):
        VideoUNet(tiny_video_config(temporal_placement="between"))


@pytest.mark.parametrize("placement,kind", VARIANTS)
def test_motion_free_samples_see_no_other_frame_and_leave_the_rest_alone(placement, kind):
    torch.manual_seed(0)
    video = VideoUNet(tiny_video_config(temporal_placement=placement, temporal_kind=kind,
                                        first_frame_attention=[True, False])).eval()
    randomise_temporal(video)
    x, t, context, mask = video_inputs()
    y = x.clone()
    y[:, :, 4] += 1.0
    free = torch.tensor([True, False])
    with torch.no_grad():
        a, b = video(x, t, context, mask, motion_free=free), video(y, t, context, mask, motion_free=free)
        assert torch.equal(a[0, :, :4], b[0, :, :4])  # the motion-free sample: frames 0-3 never see frame 4
        assert not torch.allclose(a[1, :, 0], b[1, :, 0], atol=1e-5)  # the other one does
        full = video(x, t, context, mask)
        assert torch.allclose(a[1], full[1], atol=1e-5)  # and is what it is without the mask
        # motion-free is image mode for convolutions only; a temporal attention's per-frame
        # parts (its own value, its feed-forward) still run
        image_mode = video(x, t, context, mask, temporal=False)[0]
        assert torch.allclose(a[0], image_mode, atol=1e-5) == (kind == "conv")
    with pytest.raises(ValueError, match="motion_free"):
        video(x, t, context, mask, motion_free=torch.tensor([1.0, 0.0]))


def test_motion_free_attention_is_attention_masked_to_the_identity():
    torch.manual_seed(0)
    block = TemporalAttentionBlock(16, 32, groups=4, head_dim=8).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, emb = torch.randn(2, 16, 5, 3, 3), torch.randn(2, 5, 32)
    free = torch.tensor([True, False])
    with torch.no_grad():
        got = block(x, emb, free)
        # the same block computed directly, with an explicit (f, f) identity attention mask
        att = block.attention
        def per_frame(norm, x):  # a motion-free sample's norms: each frame's own statistics
            return rearrange(norm(rearrange(x, "b c f h w -> (b f) c h w"), rearrange(emb, "b f e -> (b f) e")),
                             "(b f) c h w -> b c f h w", b=2)

        tokens = rearrange(per_frame(block.in_norm, x), "b c f h w -> (b h w) f c")
        q, k, v = (rearrange(p(tokens), "n f (h d) -> n h f d", h=att.heads) for p in (att.to_query, att.to_key, att.to_value))
        eye = torch.eye(5, dtype=torch.bool)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=eye)
        out = att.to_out(rearrange(attended, "n h f d -> n f (h d)"))
        h = x + rearrange(out, "(b h w) f c -> b c f h w", b=2, h=3)
        expected = h + rearrange(block.feed_forward(rearrange(per_frame(block.out_norm, h), "b c f h w -> b f h w c")),
                                 "b f h w c -> b c f h w")
        assert torch.allclose(got[0], expected[0], atol=1e-5), (got[0] - expected[0]).abs().max()
        assert torch.allclose(got[1], block(x, emb)[1], atol=1e-6)
        assert not torch.allclose(got[1], expected[1], atol=1e-4)  # the other sample attends across frames


def test_model_info_counts_every_variant(capsys):
    import json
    import sys

    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "tools"))
    import model_info

    config = str(ROOT / "configs" / "keyframe" / "shapes.yaml")
    assert model_info.main([config, "--temporal-variants", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["placement"], r["kind"]) for r in rows} == set(VARIANTS)
    assert len({r["temporal_params"] for r in rows}) == len(VARIANTS)
    assert model_info.main([config, "model.temporal_placement=inside", "model.temporal_kind=conv", "--json"]) == 0
    inside_conv = json.loads(capsys.readouterr().out)
    assert inside_conv["temporal_params"] == next(r["temporal_params"] for r in rows if r["placement"] == "inside"
                                                  and r["kind"] == "conv")
    assert model_info.main([str(ROOT / "configs" / "t2i" / "shapes.yaml"), "--temporal-variants"]) == 2
