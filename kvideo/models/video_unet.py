"""The keyframe UNet of Kandinsky Video 1.1: the Kandinsky 3 UNet plus temporal layers.

    x (b, in_channels, f, h, w), t (b,) or (b, f), context (b, n, context_dim), context_mask (b, n),
    identity (IdentityTokens, per clip), and the temporal layers' own inputs (TemporalInputs):
    noise_aug_level (b,), motion_score (b,), temporal (bool), motion_free (b,) bool
      -> (b, out_channels, f, h, w)

Every spatial layer is the image UNet's (`kvideo.models.unet`), run on the frames folded into the
batch, with the image model's conditioning vector (time + pooled text). The temporal layers mix
information across frames:

- a `TemporalResNetBlock` beside every spatial ResNet (after it going down, before it going up):
  a bottleneck of four [CGN -> SiLU -> Conv3d (k, 1, 1)], k = 1, 3, 3, 1, hidden C // 2, with a
  residual and the last conv zero-initialised;
- a `TemporalAttentionBlock` after the self-attention of every level that has one: attention
  over the frames at each pixel, then a feed-forward; both residual branches end in a
  zero-initialised projection (the release zero-initialises only the attention output, so its
  feed-forward makes the block no identity at init; here it is);
- optionally (`first_frame_attention`, not in the release) a `FirstFrameAttentionBlock` per
  level: every frame's positions attend to all of frame 0's, output zero-initialised.

Those are the release's layers (`temporal_placement: separate`, `temporal_kind: both`); the
other placement and kinds of Kandinsky Video 1.0's comparison, the layers themselves and the
motion-free mode are in `kvideo.models.temporal_layers`. The release computes two things
differently, each an option that kvideo's default leaves off: its temporal norms take each
frame's statistics (`temporal_norm: frame`; kvideo's default normalises the clip), and its up
levels run the temporal attention before the self-attention (`up_temporal_attention_first`).

The norms of the temporal layers are conditioned per frame on the time embedding plus the
temporal embedding = MLP(sin(frame index)) + MLP(sin(noise-augmentation level)) +
MLP(sin(motion score)) (+ with `temporal_text`, a pooling of the text of their own); the
spatial layers never see it. At initialisation every temporal
layer is the identity, so the video UNet equals the image UNet applied frame by frame
(`load_image_weights` copies a trained image UNet in, zero-initialising new input channels).
`forward(..., temporal=False)` switches the temporal layers off (image mode). With
`identity_attention` set, the image UNet's identity attentions are spatial layers like the others:
`forward(..., identity=...)` takes one clip's identity tokens each and every frame reads them.

With the `kandinsky` size (9 input channels: x_t | first-frame latent | mask) this is the
released keyframe model's layout, 4.149B parameters of which 1.110B temporal.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from einops import rearrange
from torch import nn

from kvideo.models.identity import IdentityTokens
from kvideo.models.sizes import extend_config, sized_config
from kvideo.models.temporal_layers import (  # noqa: F401 (re-exported: the temporal layers' old home)
    INSIDE_AFTER_BLOCK, KINDS, NORMS, PLACEMENTS, BoundTemporal, FirstFrameAttentionBlock, LevelTemporal,
    TemporalAttentionBlock, TemporalResNetBlock,
)
from kvideo.models.unet import (
    AttentionPooling, TimestepEmbedding, UNet, UNetConfig, _check_choice, _identity_dim, _init_channels,
    unet_config,
)
from kvideo.nn.layers import zero_module

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass
class VideoUNetConfig(UNetConfig):
    """A UNetConfig plus the temporal layers. The defaults are the released keyframe model."""

    in_channels: int = 9  # x_t (4) | first-frame latent in frame 0, zeros elsewhere (4) | mask (1)
    temporal_attention: Optional[List[bool]] = None  # per level; None = where there is self-attention
    # A second attention pooling of the text, added to the temporal embedding only (output
    # zero-initialised). Not in the release: its temporal layers see the text only through the
    # image model's pooled vector and the spatial cross-attention.
    temporal_text: bool = False
    # The first-frame latent in every frame's input channels (the mask still marks frame 0), as
    # image-to-video models that condition by concatenation do (SVD, DynamiCrafter): each frame's
    # input conv sees the appearance it must keep. False: frame 0's slot only, the release.
    first_frame_everywhere: bool = False
    # The (noise-augmented) first-frame latent also replaces frame 0 of x_t, and frame 0's
    # timestep becomes its noise-augmentation level (per-frame timesteps): the first frame enters
    # as a frame of the clip the spatial layers already know how to read, and the temporal layers
    # carry it to the others from the first step (anchor-frame training, Factorized Video
    # Generation). Frame 0 is then an input: the loss leaves it out and sampling returns the first
    # frame there. False: the release.
    anchor_first_frame: bool = False
    # Per level (None: none): a first-frame attention in that level at its full resolution, where
    # every frame's positions attend to all of frame 0's (the frame the first frame is given in).
    # Temporal layers mix frames at one pixel only, so a moving object's shape and colour can reach
    # later frames from frame 0 only through the spatial convolutions' reach; this attention lets a
    # frame read frame 0 wherever the object was (the cross-frame attention of Tune-A-Video and
    # Text2Video-Zero, the first-frame attention of ConsistI2V). Output zero-initialised, a
    # temporal layer (off in image mode). Not in the release.
    first_frame_attention: Optional[List[bool]] = None
    # Where the temporal layers sit and what they are (kvideo.models.temporal_layers): "separate"
    # blocks between the spatial ones (the release) or "inside" every spatial ResNet; "conv",
    # "attention" or "both" (the release: temporal ResNets plus temporal attention after the
    # self-attention). Kandinsky Video 1.0 compared these and kept separate blocks.
    temporal_placement: str = "separate"
    temporal_kind: str = "both"
    # The statistics of every temporal layer's conditional group norm (the temporal ResNets' and
    # convs' blocks, the temporal attentions' in and out norms): "clip", over the whole
    # (b, c, f, h, w) clip (kvideo's default, kept), or "frame", over each frame alone (the
    # release's computation: it normalises ((b f), c, h, w) before unfolding the frames).
    temporal_norm: str = "clip"
    # In up levels, the temporal attention before the level's self-attention (the release's
    # order; its down levels, as every level of kvideo's default, run self-attention first).
    up_temporal_attention_first: bool = False


def _per_level(cfg, name: str, default: Sequence[bool]) -> List[bool]:
    """cfg.<name>, one flag per level of dim_mult, or `default` when it is None."""
    levels = getattr(cfg, name)
    levels = default if levels is None else levels
    if len(levels) != len(cfg.dim_mult):
        raise ValueError(f"{type(cfg).__name__}.{name} needs one entry per level of dim_mult "
                         f"({len(cfg.dim_mult)}); got {list(levels)}")
    return [bool(v) for v in levels]


def _check_variant(cfg) -> None:
    for name, allowed in (("temporal_placement", PLACEMENTS), ("temporal_kind", KINDS), ("temporal_norm", NORMS)):
        _check_choice(cfg, name, allowed)


def _temporal_attention_levels(cfg) -> List[bool]:
    levels = _per_level(cfg, "temporal_attention", cfg.add_self_attention)
    if any(t and not s for t, s in zip(levels, cfg.add_self_attention)):
        raise ValueError(f"{type(cfg).__name__}.temporal_attention: temporal attention follows the self-attention, "
                         f"so it needs add_self_attention on the same levels; got {list(levels)} "
                         f"with add_self_attention {list(cfg.add_self_attention)}")
    return levels


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def _inner_channels(level) -> List[int]:
    """The hidden width after the INSIDE_AFTER_BLOCK of each spatial ResNet of a level, by slot."""
    return [r.blocks[INSIDE_AFTER_BLOCK].conv.out_channels for u in level.units for r in (u.in_resnet, u.out_resnet)]


@dataclass
class TemporalInputs:
    """The inputs of `VideoUNet.forward` that only its temporal layers read, given to it as keywords."""

    noise_aug_level: Optional[torch.Tensor] = None  # (b,) the first frame's noise-augmentation level
    motion_score: Optional[torch.Tensor] = None  # (b,)
    temporal: bool = True  # False: image mode, every temporal layer bypassed
    motion_free: Optional[torch.Tensor] = None  # (b,) bool: those samples' temporal layers cross no frames


TEMPORAL_INPUTS = tuple(f.name for f in fields(TemporalInputs))


class VideoUNet(UNet):
    """The image UNet's layers (same names, so image checkpoints load) plus `temporal_down`,
    `temporal_up` and the three temporal embeddings."""

    def __init__(self, cfg: VideoUNetConfig) -> None:
        super().__init__(cfg)
        init, e = _init_channels(cfg), cfg.time_embed_dim
        _check_variant(cfg)
        attn = _temporal_attention_levels(cfg)
        first = _per_level(cfg, "first_frame_attention", [False] * len(cfg.dim_mult))
        self.frame_embed = TimestepEmbedding(init, e)
        self.noise_aug_embed = TimestepEmbedding(init, e)
        self.motion_embed = TimestepEmbedding(init, e)
        self.text_pooling = None
        if cfg.temporal_text:
            self.text_pooling = AttentionPooling(e, cfg.context_dim, cfg.head_dim)
            zero_module(self.text_pooling.attention.to_out)
        self.temporal_down = nn.ModuleList()
        for i, level in enumerate(self.down_samples):
            channels = [u.in_resnet.blocks[-1].conv.out_channels for u in level.units]
            self.temporal_down.append(LevelTemporal(
                [c for c in channels for _ in range(2)],  # each unit's ResNets both output this width
                level.self_attention.in_norm.norm.num_channels if attn[i] else None, cfg,
                first_frame_slot=0 if first[i] else None,  # after the level's first ResNet, before any downsampling
                inner_channels=_inner_channels(level)))
        self.temporal_up = nn.ModuleList()
        levels = len(cfg.dim_mult)
        for j, level in enumerate(self.up_samples):
            widths = []
            for u in level.units:  # temporal ResNets come before the spatial ones: their input widths
                widths += [u.in_resnet.blocks[0].norm.norm.num_channels, u.out_resnet.blocks[0].norm.norm.num_channels]
            self.temporal_up.append(LevelTemporal(
                widths, level.self_attention.in_norm.norm.num_channels if attn[levels - 1 - j] else None, cfg,
                # before the second spatial ResNet: after the first one's upsampling
                first_frame_slot=1 if first[levels - 1 - j] else None, inner_channels=_inner_channels(level)))

    # -- parameter groups (the stage freezes or trains them; model_info reports them)

    def temporal_modules(self) -> Dict[str, nn.Module]:
        modules = {"temporal_down": self.temporal_down, "temporal_up": self.temporal_up,
                   "frame_embed": self.frame_embed, "noise_aug_embed": self.noise_aug_embed,
                   "motion_embed": self.motion_embed}
        if self.text_pooling is not None:
            modules["text_pooling"] = self.text_pooling
        return modules

    def temporal_parameters(self) -> Iterator[nn.Parameter]:
        for module in self.temporal_modules().values():
            yield from module.parameters()

    # -- forward

    def temporal_embedding(self, emb: torch.Tensor, num_frames: int, noise_aug_level: Optional[torch.Tensor],
                           motion_score: Optional[torch.Tensor], frame_index: Optional[torch.Tensor],
                           context: Optional[torch.Tensor] = None,
                           context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-frame conditioning of the temporal layers: emb (b, e), or (b, f, e) with per-frame
        timesteps, -> (b, f, e). With `temporal_text`, the context's own pooling is part of it."""
        b, device = emb.shape[0], emb.device
        if emb.ndim == 2:
            emb = emb[:, None, :]
        if frame_index is None:
            frame_index = torch.arange(num_frames, device=device)
        frame_index = frame_index.to(device)
        if frame_index.shape == (num_frames,):
            frame_index = frame_index.expand(b, num_frames)
        if frame_index.shape != (b, num_frames):
            raise ValueError(f"VideoUNet: frame_index must be ({num_frames},) or ({b}, {num_frames}); "
                             f"got {tuple(frame_index.shape)}")
        zeros = torch.zeros(b, device=device)
        level = zeros if noise_aug_level is None else noise_aug_level.to(device)
        motion = zeros if motion_score is None else motion_score.to(device)
        for name, value in (("noise_aug_level", level), ("motion_score", motion)):
            if value.shape != (b,):
                raise ValueError(f"VideoUNet: {name} must have shape ({b},); got {tuple(value.shape)}")
        frames = rearrange(self.frame_embed(rearrange(frame_index, "b f -> (b f)")), "(b f) e -> b f e", b=b)
        per_clip = self.noise_aug_embed(level) + self.motion_embed(motion)  # (b, e)
        if self.text_pooling is not None:
            if context is None:
                raise ValueError("VideoUNet: temporal_text needs the context")
            per_clip = self.text_pooling(per_clip, context, context_mask)  # per_clip + pooled text
        return emb + frames + per_clip[:, None, :]

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                context_mask: Optional[torch.Tensor] = None, *, identity: Optional[IdentityTokens] = None,
                **temporal_inputs) -> torch.Tensor:
        """(b, c, f, h, w) -> (b, out_channels, f, h, w). t is (b,), one timestep per clip, or
        (b, f), one per frame (a clean anchor frame among noisy ones). `identity`: one clip's
        identity tokens each, read by every frame. `temporal_inputs`, the keywords of
        TemporalInputs (another raises TypeError): `noise_aug_level`, `motion_score`;
        `temporal=False` is image mode: every temporal layer bypassed, every frame denoised on its
        own by the spatial layers (the temporal inputs are then unused); `motion_free` (b,) bool:
        those samples run the temporal layers with nothing crossing frames
        (kvideo.models.temporal_layers), the motion-free branch of motion-free guidance."""
        unknown = sorted(set(temporal_inputs) - set(TEMPORAL_INPUTS))
        if unknown:
            raise TypeError(f"VideoUNet.forward got unexpected keyword arguments {unknown}; "
                            f"it takes identity and {', '.join(TEMPORAL_INPUTS)}")
        inputs = TemporalInputs(**temporal_inputs)
        if x.ndim != 5:
            raise ValueError(f"VideoUNet: x must be (b, c, f, h, w); got {tuple(x.shape)}")
        b, _, f = x.shape[:3]
        motion_free = inputs.motion_free
        if motion_free is not None and (motion_free.shape != (b,) or motion_free.dtype != torch.bool):
            raise ValueError(f"VideoUNet: motion_free must be a ({b},) bool tensor; got {motion_free.dtype} "
                             f"{tuple(motion_free.shape)}")
        if t.ndim == 2 and t.shape != (b, f):
            raise ValueError(f"VideoUNet: per-frame timesteps must be ({b}, {f}); got {tuple(t.shape)}")
        frames = rearrange(x, "b c f h w -> (b f) c h w")
        per_frame = t.ndim == 2

        def for_frames(value: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if value is None else value.repeat_interleave(f, dim=0)

        frame_t = t.reshape(-1) if per_frame else t.repeat_interleave(f)
        if identity is not None:
            identity.check(b, _identity_dim(self.cfg), "VideoUNet")  # one clip's tokens each
            identity = identity.repeat_interleave(f)  # ((b f), n, d): each clip's tokens for its frames
        self._check_inputs(frames, frame_t, for_frames(context), for_frames(context_mask), identity)
        # one conditioning vector per frame, or per clip (then repeated for the frames, after the
        # temporal embedding has read it: this order keeps the autograd sums of older runs bitwise)
        emb = rearrange(self.embed(frame_t, for_frames(context), for_frames(context_mask)), "(b f) e -> b f e", b=b) \
            if per_frame else self.embed(t, context, context_mask)
        down = up = None
        if inputs.temporal:
            temb = self.temporal_embedding(emb, f, inputs.noise_aug_level, inputs.motion_score, None, context,
                                           context_mask)
            mf = None if motion_free is None else motion_free.to(x.device)
            down = [BoundTemporal(layers, f, temb, mf) for layers in self.temporal_down]
            up = [BoundTemporal(layers, f, temb, mf) for layers in self.temporal_up]
        frame_emb = rearrange(emb, "b f e -> (b f) e") if per_frame else emb.repeat_interleave(f, dim=0)
        out = self.run_levels(frames, frame_emb, for_frames(context), for_frames(context_mask), down, up,
                              identity=identity)
        return rearrange(out, "(b f) c h w -> b c f h w", b=b)


# ----------------------------------------------------------------------------------------------
# Loading an image UNet
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def load_image_weights(model: UNet, state_dict: Dict[str, torch.Tensor],
                       keep_new: Sequence[str] = ()) -> Dict[str, List[str]]:
    """Copy a trained image UNet into a video UNet `model`: every spatial weight, by name.

    Keys starting with a prefix in `keep_new` keep their fresh initialisation (the
    interpolation model's input and output convs, whose channels mean something else).

    The input conv may have fewer input channels than the video model (4 for the T2I model, 9 for
    the keyframe model): the extra input channels start at zero, so at load the video model
    ignores its conditioning inputs and, its temporal layers being identities, equals the image
    model frame by frame. Returns {"loaded": [...], "widened": [...], "new": [...]} key lists.
    Raises ValueError naming the first key whose shape cannot be matched, or an image key the
    video model lacks.
    """
    own = model.state_dict()
    loaded, widened = [], []
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(tuple(keep_new))}
    for key, value in state_dict.items():
        if key not in own:
            raise ValueError(f"image UNet weight '{key}' has no counterpart in the video UNet: "
                             "are the two built from the same spatial configuration?")
        target = own[key]
        if value.shape == target.shape:
            target.copy_(value)
            loaded.append(key)
        elif key == "in_layer.weight" and value.shape[0] == target.shape[0] and value.shape[1] < target.shape[1] \
                and value.shape[2:] == target.shape[2:]:
            target.zero_()
            target[:, : value.shape[1]].copy_(value)
            widened.append(key)
        else:
            raise ValueError(f"image UNet weight '{key}' has shape {tuple(value.shape)}, "
                             f"the video UNet expects {tuple(target.shape)}")
    new = [k for k in own if k not in state_dict]
    return {"loaded": loaded, "widened": widened, "new": new}


# ----------------------------------------------------------------------------------------------
# Named sizes
# ----------------------------------------------------------------------------------------------


def _video_size(image_size: str) -> VideoUNetConfig:
    return extend_config(unet_config(image_size), VideoUNetConfig, in_channels=9)


VIDEO_UNET_SIZES: Dict[str, VideoUNetConfig] = {
    # The released Kandinsky Video 1.1 keyframe model: 4.149B parameters, 1.110B temporal.
    "kandinsky": _video_size("kandinsky"),
    # The ShapesWorld t2i UNet plus temporal layers (its t2i checkpoint loads into it).
    "shapes": _video_size("shapes"),
}


def video_unet_config(size: str, **overrides) -> VideoUNetConfig:
    return sized_config(VIDEO_UNET_SIZES, size, **overrides)
