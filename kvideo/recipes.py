"""The `recipe` section of each stage: what a stage learns and how its samples are drawn.

Plain dataclass schemas, read by the config loader (`kvideo.registry.RECIPES` hands them to
`kvideo.config.load_config`), by the training stages (`kvideo.train.stages`) and by the inference
layer (`kvideo.inference`), which reads `recipe.sampling`, `recipe.motion`, `recipe.noise_aug`,
... from a checkpoint's config. Defaults live here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from omegaconf import MISSING

from kvideo.config import checked
from kvideo.diffusion import SPACINGS, TARGETS
from kvideo.diffusion.samplers import SAMPLERS
from kvideo.models.text_encoder import TextEncoderConfig

SAMPLER_RULE = "one of " + "|".join(SAMPLERS)
SPACING_RULE = "one of " + "|".join(SPACINGS)

# ----------------------------------------------------------------------------------------------
# Autoencoder stages
# ----------------------------------------------------------------------------------------------


@dataclass
class ScaleEquivariance:
    """The decoder's scale-equivariance term (Skorokhodov et al. 2025, "Improving the Diffusability
    of Autoencoders"): the latent and the image are both downsampled by a factor drawn from
    `factors` each step (bilinear, antialiased) and the decoder must draw the small image from the
    small latent, weight x MSE. Shape then lives in the latent's low frequencies, which a diffusion
    model draws first and best, instead of in latent detail it may miss. 0: off."""

    weight: float = checked(0.0, ">= 0")
    factors: List[int] = checked(rule="each >= 2", factory=lambda: [2, 4])


@dataclass
class MovqRecipe:
    mse_weight: float = checked(1.0, ">= 0")
    lpips_weight: float = checked(0.1, ">= 0")
    lpips_weights: Optional[str] = None  # local LPIPS weights file; LPIPS is off when unset
    codebook_weight: float = checked(1.0, ">= 0")
    gan_weight: float = checked(0.1, ">= 0")
    gan_start: int = checked(10_000, ">= 0")  # step at which the generator and discriminator GAN losses start
    adaptive_gan_weight: bool = True
    disc_layers: int = checked(2, ">= 1")
    disc_channels: int = checked(64, ">= 1")
    disc_norm_groups: int = checked(32, ">= 1")
    disc_lr: Optional[float] = None  # None: train.lr
    disc_betas: List[float] = field(default_factory=lambda: [0.5, 0.9])
    dead_code_every: int = checked(200, ">= 0")  # 0 disables dead-code restarts
    # Share of training batches whose decoder input is the quantised latent (MoVQGAN: 1.0); the
    # others decode the continuous latent, the one the diffusion stages decode at inference. The
    # codebook and commitment losses apply to every batch.
    quantize_prob: float = checked(1.0, "[0, 1]")
    scale_equivariance: ScaleEquivariance = field(default_factory=ScaleEquivariance)


@dataclass
class VideoDecoderRecipe:
    movq: str = MISSING  # the image movq-stage checkpoint this decoder starts from (and whose encoder it keeps)
    train_spatial: bool = True  # false: only the temporal layers train
    spatial_lr_scale: float = checked(1.0, "> 0")  # learning rate of the loaded spatial decoder, times train.lr (the temporal layers': train.lr)
    mse_weight: float = checked(1.0, ">= 0")
    # L1 between the decoded and the true frame-to-frame differences: penalises change the clip
    # does not have (flicker on a static background) and missing change alike. 0: off (release).
    temporal_weight: float = checked(0.0, ">= 0")
    lpips_weight: float = checked(0.1, ">= 0")
    lpips_weights: Optional[str] = None
    gan_weight: float = checked(0.1, ">= 0")
    gan_start: int = checked(2_000, ">= 0")
    adaptive_gan_weight: bool = True
    disc_layers: int = checked(2, ">= 1")
    disc_channels: int = checked(64, ">= 1")
    disc_norm_groups: int = checked(32, ">= 1")
    disc_lr: Optional[float] = None
    disc_betas: List[float] = field(default_factory=lambda: [0.5, 0.9])
    decode_window: Optional[int] = checked(None, ">= 1")  # frames per window when decoding long videos (None: whole)
    decode_overlap: int = checked(4, ">= 0")


# ----------------------------------------------------------------------------------------------
# Latent diffusion stages
# ----------------------------------------------------------------------------------------------


@dataclass
class DiffusionConfig:
    schedule: str = "squaredcos_cap_v2"
    num_steps: int = checked(1000, ">= 1")
    zero_terminal_snr: bool = True
    target: str = checked("eps", "one of " + "|".join(TARGETS))
    weighting: Optional[str] = checked(None, "one of min_snr")  # None: plain MSE
    min_snr_gamma: float = checked(5.0, "> 0")
    # Training timesteps skewed toward high noise (kvideo.diffusion.losses.draw_timesteps); 1 = uniform.
    # (The inference timesteps have a shift of their own: recipe.sampling.timestep_shift.)
    timestep_shift: float = checked(1.0, "> 0")
    # The training shift moves from timestep_shift to this over train.max_steps, geometrically
    # (shift0 * (end / shift0) ** (step / max_steps)): e.g. 3 -> 1.5 trains the high-noise steps
    # that decide a keyframe's direction early and more low-noise (detail) steps late. None: constant.
    timestep_shift_end: Optional[float] = checked(None, "> 0")


@dataclass
class SamplingConfig:
    """Defaults of previews and of sample.py (each overridable on its command line)."""

    sampler: str = checked("ddpm", SAMPLER_RULE)
    steps: int = checked(50, ">= 1")
    spacing: str = checked("leading", SPACING_RULE)
    timestep_shift: float = checked(1.0, "> 0")  # inference timesteps moved toward noise (Schedule.timesteps); 1 = none
    guidance: float = checked(5.0, ">= 0")  # Kandinsky convention: (w + 1) * cond - w * uncond
    dynamic_threshold: Optional[float] = checked(0.995, "(0, 1]")  # percentile; None disables
    # the threshold's upper bound (diffusers' sample_max_value); 1 makes thresholding clipping of x0 to
    # [-1, 1] (the release's sampling); None: unbounded (Imagen)
    threshold_max: Optional[float] = checked(None, "> 0")


@dataclass
class IdentityConfig:
    """Reference conditioning (issue 28; kvideo.models.identity): with model.identity_attention set,
    each clip's reference images (data.references, the samples' KEY.ref.png) become identity
    tokens through a reference encoder that trains with the UNet. Without identity attention the
    section is unused."""

    encoder: str = "shapes"  # the reference encoder's size (kvideo.models.identity.REFERENCE_ENCODER_SIZES)
    # tag each reference's tokens with its name's text embedding (the pooled, frozen text tokens of
    # the name), so attention can tell which entry the caption names
    names: bool = True
    dropout: float = checked(0.1, "[0, 1]")  # share of samples trained with no reference (the branch guidance drops)
    # share of the samples that keep a reference whose caption has the references' names replaced
    # by `name_word`: they must take identity from the reference, not the name (zero-shot identity)
    name_dropout: float = checked(0.0, "[0, 1]")
    name_word: str = "someone"
    scale: float = checked(1.0, ">= 0")  # the identity attention's strength at sampling (training: 1)
    # the references' MoVQ latents kept in memory (MB, per process) after their first encoding
    # (kvideo.inference.autoencoder.LatentMemo); 0: every step encodes them again
    latent_memo_mb: float = checked(1024.0, ">= 0")
    # w_R of reference guidance at sampling: + w_R (eps - eps_without references), one more branch
    # of the batched forward; 0: none
    guidance: float = checked(0.0, ">= 0")
    # The identity loss: a frozen identity encoder (`encoder_weights`, a file written by
    # tools/train_identity_encoder.py) embeds the decoded x0 prediction of the first frame and the
    # (decoded) reference; the loss is 1 - their cosine, for samples at t < `loss_max_t` with
    # exactly one reference present, times `loss_weight` (0: off).
    loss_weight: float = checked(0.0, ">= 0")
    loss_max_t: int = checked(200, ">= 1")
    encoder_weights: Optional[str] = None


@dataclass
class T2IRecipe:
    movq: str = MISSING  # movq-stage checkpoint (run dir, checkpoint dir or weights file)
    latent_scale: float = checked(1.0, "> 0")  # latents = scale * MoVQ.encode(x); Kandinsky uses them unscaled
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    text_dropout: float = checked(0.1, "[0, 1]")  # share of samples trained with the null (unconditional) context
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    preview_prompts: List[str] = field(default_factory=lambda: [
        "a red circle standing still on a black background",
        "a blue square moving left quickly on a white background",
        "a yellow triangle moving up slowly on a gray background",
        "a green circle moving right quickly on a black background",
    ])
    preview_steps: int = checked(15, ">= 1")  # previews use DPM-Solver++(2M) with this many steps
    identity: IdentityConfig = field(default_factory=IdentityConfig)


@dataclass
class ConditionDropout:
    """Per-sample shares trained without a condition (disjoint events: at most their sum <= 1)."""

    text: float = checked(0.1, "[0, 1]")  # null text, first frame kept
    image: float = checked(0.1, "[0, 1]")  # no first frame, text kept
    both: float = checked(0.1, "[0, 1]")  # neither: the unconditional branch


@dataclass
class NoiseAugConfig:
    enabled: bool = True  # false: the first frame is given clean and the level is always 0
    distribution: str = checked("uniform", "one of uniform|log_uniform")  # over integer levels [min_level, max_level]
    min_level: int = checked(0, ">= 0")
    max_level: int = checked(250, ">= 0")
    sample_level: int = checked(20, ">= 0")  # the level used at sampling (the release's noise_augmentation=20)
    # the noise the first frame is augmented with at sampling: gaussian (as in training), or
    # uniform U[0, 1), what the release's sampling draws (torch.rand_like where Gaussian was meant)
    sample_noise: str = checked("gaussian", "one of gaussian|uniform")


@dataclass
class MotionConfig:
    """Motion scores are in the shards' unit (`kvideo.data.motion`); the UNet sees scale * score."""

    scale: float = checked(1.0, ">= 0")
    presets: Dict[str, float] = field(default_factory=lambda: {"low": 1.0, "medium": 10.0, "high": 50.0,
                                                               "extreme": 100.0})
    default: str = "medium"  # preset used when sampling without a motion score


@dataclass
class KeyframeSamplingConfig:
    sampler: str = checked("ddpm", SAMPLER_RULE)
    steps: int = checked(50, ">= 1")
    spacing: str = checked("leading", SPACING_RULE)
    timestep_shift: float = checked(1.0, "> 0")  # inference timesteps moved toward noise (Schedule.timesteps); 1 = none
    text_guidance: float = checked(5.0, ">= 0")  # w_T
    image_guidance: float = checked(2.0, ">= 0")  # w_I
    dynamic_threshold: Optional[float] = checked(0.995, "(0, 1]")
    # the threshold's upper bound (diffusers' sample_max_value); 1 makes thresholding clipping of x0 to
    # [-1, 1] (the release's sampling); None: unbounded (Imagen)
    threshold_max: Optional[float] = checked(None, "> 0")
    # true: frame 0's x0 prediction is the given first frame at every step (replacement
    # sampling, `kvideo.diffusion.with_known`), so the keyframes start on it exactly; false: the
    # model denoises frame 0 itself, as the release does
    keep_first_frame: bool = False
    # w_M of motion-free guidance: + w_M (eps_TI - eps_TI,motion-free), a fourth branch of the
    # batched forward (kvideo.diffusion.guidance); 0: none. Needs a model trained with
    # recipe.motion_free > 0 (or image samples) to mean anything.
    motion_guidance: float = checked(0.0, ">= 0")
    # A text-to-video model (recipe.conditioning: text) given an anchor frame (the pipeline's first
    # frame, as Factorized Video Generation makes it): first_step = its clean latent replaces that
    # frame of x_T only (the paper); every_step = that frame's x0 is held to it at every step
    # (re-noised to each step's level); clean = it is given clean in x_t at every call (as
    # recipe.anchor training gives it, with its timestep 0 when recipe.anchor.timestep)
    anchor: str = checked("first_step", "one of first_step|every_step|clean")
    anchor_frame: int = checked(0, ">= 0")


@dataclass
class ImageSamples:
    """Joint image-video training: a share of every batch's samples trained as single images in
    image mode (every temporal layer bypassed), text-to-image (no first frame)."""

    share: float = checked(0.0, "[0, 1]")  # of train.batch_size; drawn per step (expected share)
    # frames: one random frame of each chosen clip; shards: images of `shards` in their place
    # (kvideo.data.image_shards: KEY.png|jpg + KEY.json with a caption)
    source: str = checked("frames", "one of frames|shards")
    shards: Optional[str] = None  # a directory, glob or comma-separated list of tar shards


@dataclass
class AnchorTraining:
    """Anchor-grounding training of a text-to-video model (Factorized Video Generation): each
    step one frame (`frame`, or a random one when -1) of every clip is given clean in x_t in place
    of its noisy version, except for a `drop` share of the clips (which stay plain text-to-video)."""

    enabled: bool = False
    frame: int = checked(-1, ">= -1")
    drop: float = checked(0.1, "[0, 1]")
    loss: str = checked("others", "one of others|all")  # others: the given frame is not a target
    timestep: bool = False  # the given frame's timestep is 0 (per-frame timesteps), else the clip's


@dataclass
class LoraTraining:
    """LoRA fine-tuning of a trained keyframe model (kvideo.inference.lora, peft): `base` is its
    checkpoint (run dir, checkpoint dir or weights file), whose weights stay frozen; only the
    adapters of the `targets` modules (name suffixes) train. tools/merge_lora.py saves the
    adapter apart or merges it; a pipeline loads base + adapter (keyframe_lora)."""

    enabled: bool = False
    base: Optional[str] = None
    rank: int = checked(8, ">= 1")
    alpha: float = checked(8.0, "> 0")
    targets: List[str] = field(default_factory=lambda: ["to_query", "to_key", "to_value", "to_out"])
    dropout: float = checked(0.0, "[0, 1)")


@dataclass
class KeyframeRecipe:
    movq: str = MISSING  # movq-stage checkpoint
    init_from: Optional[str] = None  # t2i-stage checkpoint for the spatial layers and text encoder
    train_spatial: bool = True  # false: only temporal layers (and new input channels' conv) train
    spatial_lr_scale: float = checked(1.0, "> 0")  # learning rate of the loaded spatial layers and text encoder, times train.lr
    latent_scale: float = checked(1.0, "> 0")
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    dropout: ConditionDropout = field(default_factory=ConditionDropout)
    noise_aug: NoiseAugConfig = field(default_factory=NoiseAugConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampling: KeyframeSamplingConfig = field(default_factory=KeyframeSamplingConfig)
    preview_steps: int = checked(15, ">= 1")  # previews: DPM-Solver++(2M), the first frames of the preview batch
    images: ImageSamples = field(default_factory=ImageSamples)
    # first_frame: Kandinsky Video 1.1's channel conditioning (x_t | first frame | mask, three-way
    # guidance); text: a plain text-to-video model (model.in_channels = out_channels, text guidance
    # only), which takes a first frame as an anchor frame (sampling.anchor, recipe.anchor)
    conditioning: str = checked("first_frame", "one of first_frame|text")
    anchor: AnchorTraining = field(default_factory=AnchorTraining)
    lora: LoraTraining = field(default_factory=LoraTraining)
    # share of the video samples trained in motion-free mode (no information crossing frames,
    # kvideo.models.temporal_layers): the branch that sampling.motion_guidance pushes away from
    motion_free: float = checked(0.0, "[0, 1]")
    identity: IdentityConfig = field(default_factory=IdentityConfig)


@dataclass
class PassConfig:
    stride: int = checked(1, ">= 1")  # frames of the training clip between output frames of this pass
    skip_frames: int = checked(3, ">= 0")  # what the model is told about the pass (release: 3 first pass, 1 second)


@dataclass
class InterpolationSamplingConfig:
    sampler: str = checked("ddim", SAMPLER_RULE)
    steps: int = checked(10, ">= 1")
    spacing: str = checked("trailing", SPACING_RULE)
    timestep_shift: float = checked(1.0, "> 0")  # inference timesteps moved toward noise (Schedule.timesteps); 1 = none
    guidance: float = checked(0.5, ">= 0")  # (w + 1) * cond - w * uncond
    dynamic_threshold: Optional[float] = checked(None, "(0, 1]")
    # the threshold's upper bound (diffusers' sample_max_value); 1 makes thresholding clipping of x0 to
    # [-1, 1] (the release's sampling); None: unbounded (Imagen)
    threshold_max: Optional[float] = checked(None, "> 0")


@dataclass
class InterpolationRecipe:
    movq: str = MISSING
    init_from: Optional[str] = None  # t2i checkpoint: spatial layers and text encoder (in/out convs stay new)
    latent_scale: float = checked(1.0, "> 0")
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    frames_per_gap: int = checked(3, ">= 1")  # k new frames between neighbouring keyframes
    # How the input and output convs start with init_from: "spread" = from the t2i convs
    # (`spread_image_convs`), "fresh" = random (their channels mean something else).
    init_convs: str = checked("spread", "one of spread|fresh")
    spatial_lr_scale: float = checked(1.0, "> 0")  # learning rate of the loaded layers (spatial, text encoder), times train.lr
    # Diffuse the new frames' residual over the linear blend of their gap's two keyframe latents
    # (`gap_blend`) instead of the frames themselves; the output conv starts at zero, so with
    # target x0 the untrained model returns the blend exactly.
    residual: bool = False
    gaps: int = checked(4, ">= 1")  # gaps per training sample
    passes: List[PassConfig] = field(default_factory=lambda: [PassConfig(stride=4, skip_frames=3),
                                                              PassConfig(stride=1, skip_frames=1)])
    uncond_prob: float = checked(0.1, "[0, 1]")  # share of samples trained as the unconditional branch
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(target="v"))
    sampling: InterpolationSamplingConfig = field(default_factory=InterpolationSamplingConfig)
    preview_steps: int = checked(10, ">= 1")
