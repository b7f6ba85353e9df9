"""The memory and FLOP planner: what one training step of a config costs each GPU, before renting one.

    footprint = measure(cfg)                          # traces the step: no memory, no weights files
    plan = plan_cluster(footprint, cfg, Cluster(gpus=64, gpu_mem_gb=80))
    plan["strategies"]   [{"strategy", "checkpointing", "per_gpu_gb": {...}, "fits", "max_batch"}, ...]
    plan["step_flops"]   forward + backward FLOPs of one step at train.batch_size

`tools/plan.py` is the command line; docs/SCALING.md has the table of the full-size configs.

**What is traced.** The model the engine trains (`trainee`): the stage's network, built as the
stage builds it but randomly initialised, with what the stage freezes frozen (the text tower, the
video decoder's encoder, the 1.0 recipe's spatial layers, a LoRA base), and the frozen networks
the stage holds beside it (a latent stage's MoVQ, an autoencoder stage's LPIPS). One step's
forward runs the real network through the real conditioning (a latent stage: the frames encoded
by the frozen MoVQ unless `data.latent_cache`, then `diffusion.training_loss` under the stage's
condition, its text through the text encoder with a dropout mask; an autoencoder stage: the
stage's own `loss` for the ae phase, with the GAN term on, then the disc phase), under
`train.precision`'s autocast, and a backward of the scalar loss.

**How.** Everything runs under `FakeTensorMode` (torch._subclasses.fake_tensor): tensors carry
shapes, dtypes and devices but no memory, so the 4.1B-parameter keyframe step traces on a laptop
CPU in about a minute. Not the meta device: autocast acts only on tensors whose device has an
autocast key, which a fake CPU tensor has and a meta tensor has not, so on meta the bf16 casts and
bf16 activations of `train.precision: bf16` would not be traced. Both kinds fail at `bool(t)` and
`t.item()` (the inputs' checks, e.g. the UNet's "every sample has a valid text token", the
tokenizer's end tokens, a stage's logged `float(loss)`): `_Constants`, a dispatch mode above the
fake one, answers them with 1 / True, so every check passes and the trace goes on.

- activations: the bytes autograd saves for the backward (`saved_tensors_hooks`), each storage
  once, parameters and buffers left out, at batch 1 and 2: a fixed part and a per-sample slope.
  With `train.grad_checkpointing` the saved tensors outside the recomputed blocks plus the
  largest block's own (its recompute in the backward); a block is an outermost module of the
  FSDP units (`kvideo.train.parallel.SHARD_UNITS`, the modules `run_block` recomputes), its
  bytes taken from the trace without checkpointing.
- FLOPs: `torch.utils.flop_counter.FlopCounterMode` over the whole step, frozen networks
  included (the MoVQ encoding, the text tower); the recompute of checkpointed blocks is counted
  apart (`recompute_flops`), not in `step_flops`.
- weights, gradients, AdamW's two fp32 moments and the fp32 EMA of the trainable parameters
  (kvideo/train/ema.py) are counted from the parameters and laid out per strategy (`per_gpu`).

The total adds every part at once, an upper bound of the step's peak: gradients are counted
whole while the activations are at their peak (the backward frees activations as gradients come).
tests/test_plan.py checks the prediction against the peak measured on the CPU for tiny models.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import weakref
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch
from einops import rearrange
from omegaconf import DictConfig, read_write
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from kvideo.diffusion import training_loss
from kvideo.inference.autoencoder import clip_latents
from kvideo.inference.conditioning import (
    ImageCondition, InterpolationCondition, KeyframeCondition, Prompts, TextVideoCondition, given_frames, noise_augment,
)
from kvideo.inference.denoiser import loss_spec, make_schedule
from kvideo.inference.gaps import gap_blend, split_gaps
from kvideo.inference.loading import DIFFUSION_STAGES, build_stage_denoiser
from kvideo.models.discriminator import PatchDiscriminator
from kvideo.models.movq import MoVQ, MovqConfig
from kvideo.train.dist import autocast_context
from kvideo.train.parallel import SHARD_UNITS, shard_units

GIB = 2 ** 30
CAPTION = "a red fox runs across a snowy field"
# The modules whose forward `run_block` recomputes under checkpointing: the FSDP units but the
# discriminator (a unit, never checkpointed).
RECOMPUTED = tuple(u for u in SHARD_UNITS if u is not PatchDiscriminator)
_BYTES = {"fp32": 4, "bf16": 2}

# ----------------------------------------------------------------------------------------------
# The trained model and one step of it
# ----------------------------------------------------------------------------------------------


@dataclass
class Trainee:
    """What one training step of a stage runs: the model the engine trains (frozen parts frozen),
    the frozen networks the stage holds beside it, and `phases(batch_size)`: one closure per
    optimizer phase, each running that phase's forward and returning its scalar loss."""

    model: nn.Module
    held: List[nn.Module]
    phases: Callable[[int], List[Callable[[], torch.Tensor]]]


def planning_config(cfg: DictConfig) -> DictConfig:
    """`cfg` with the weight files the model would read at construction unset (the text tower's,
    LPIPS'): the planner builds every network randomly initialised."""
    cfg = copy.deepcopy(cfg)
    with read_write(cfg):
        if cfg.stage in DIFFUSION_STAGES:
            cfg.recipe.text_encoder.weights = None
        else:
            cfg.recipe.lpips_weights = None
    return cfg


def build_trainee(cfg: DictConfig, movq: Optional[MovqConfig] = None) -> Trainee:
    """The `Trainee` of `cfg`'s stage, randomly initialised and reading no file. A latent stage's
    frozen MoVQ is built from `movq` (the stage reads it from `recipe.movq`; the default is the
    released MoVQ's architecture)."""
    if cfg.stage in DIFFUSION_STAGES:
        return _latent_trainee(planning_config(cfg), movq or MovqConfig())
    return _autoencoder_trainee(cfg)


def _latent_trainee(cfg: DictConfig, movq_cfg: MovqConfig) -> Trainee:
    from kvideo.train.stages.keyframe import freeze_untrained

    model = build_stage_denoiser(cfg)
    if cfg.stage == "keyframe":
        freeze_untrained(model, cfg.recipe)
    movq = MoVQ(movq_cfg).requires_grad_(False).eval()
    schedule, spec = make_schedule(cfg.recipe.diffusion), loss_spec(cfg.recipe.diffusion)

    def step(b: int) -> torch.Tensor:
        x0, cond, mask = _conditioned(cfg, model, schedule, _latents(cfg, movq, b))
        loss, _ = training_loss(lambda x_t, t: model(x_t, t, cond), schedule, x0, spec, mask=mask)
        return loss.mean()

    return Trainee(model, [movq], lambda b: [lambda: step(b)])


def _latents(cfg: DictConfig, movq: MoVQ, b: int) -> torch.Tensor:
    """A batch's scaled latents (b, c, f, h, w) as the stage makes them: its frames encoded by the
    frozen MoVQ now, or read from `data.latent_cache`. The interpolation stage encodes the frames
    of one pass (`pass_latents`)."""
    rc = cfg.recipe
    frames = (rc.frames_per_gap + 1) * rc.gaps + 1 if cfg.stage == "interpolation" else cfg.data.num_frames
    height, width = cfg.data.size
    if cfg.data.latent_cache:
        _, h, w = movq.latent_shape(height, width)
        batch = {"latents": torch.randn(b, movq.cfg.embed_dim, frames, h, w)}
    else:
        batch = {"video": torch.rand(b, 3, frames, height, width) * 2 - 1}
    return clip_latents(movq, batch, rc.latent_scale, torch.device("cpu"))


def _conditioned(cfg: DictConfig, model: nn.Module, schedule, z: torch.Tensor):
    """(x0, condition, loss mask) of the stage's loss for latents z (b, c, f, h, w). Every sample
    has its text (through the text encoder, with a dropout mask, so the null context is in the
    graph as in training) and, where the stage gives one, its first frame or keyframes; a keyframe
    stage's joint image samples (`recipe.images.share`) are traced as clips."""
    rc, b = cfg.recipe, z.shape[0]
    ones = torch.ones(b, dtype=torch.bool)

    def text(n: int) -> Prompts:
        return Prompts([CAPTION] * n, torch.zeros(n, dtype=torch.bool))

    if cfg.stage == "t2i":
        x0 = rearrange(z, "b c f h w -> (b f) c h w")  # one image per frame
        return x0, ImageCondition(text(x0.shape[0])), None
    if cfg.stage == "interpolation":
        keys, x0 = split_gaps(z, rc.frames_per_gap)
        if rc.residual:
            x0 = x0 - gap_blend(keys, rc.frames_per_gap)
        return x0, InterpolationCondition(text(b), keys, ones.float(), rc.passes[0].skip_frames), None
    if rc.conditioning == "text":
        cond, mask = TextVideoCondition(text(b), torch.ones(b), rc.motion.scale), None
        if rc.anchor.enabled:
            k = max(rc.anchor.frame, 0)
            cond = replace(cond, anchor=z[:, :, k], has_anchor=ones, anchor_frame=k, anchor_timestep=rc.anchor.timestep)
            mask = ~given_frames(ones, z.shape[2], k) if rc.anchor.loss == "others" else None
        return z, cond, mask
    level = torch.zeros(b, dtype=torch.long)
    motion_free = torch.zeros(b, dtype=torch.bool) if rc.motion_free > 0 else None
    cond = KeyframeCondition(text(b), noise_augment(schedule, z[:, :, 0], level), ones, level, torch.ones(b),
                             rc.motion.scale, motion_free)
    return z, cond, ~given_frames(ones, z.shape[2]) if model.unet.cfg.anchor_first_frame else None


def _autoencoder_trainee(cfg: DictConfig) -> Trainee:
    """The movq or video_decoder stage's model, and its two phases through the stage's own loss at
    `recipe.gan_start` (the GAN term on); LPIPS randomly initialised when the config names its file."""
    from kvideo.models.lpips import LPIPS
    from kvideo.train.stages import STAGES
    from kvideo.train.stages.video_decoder import video_decoder_model

    stage = STAGES[cfg.stage](planning_config(cfg), torch.device("cpu"))
    model = video_decoder_model(stage.cfg) if cfg.stage == "video_decoder" else stage.build_model()
    if cfg.recipe.lpips_weights:
        stage.lpips = _outside_fake_mode(LPIPS)
    parts = {"ae": model.ae, "disc": model.disc}

    def phases(b: int) -> List[Callable[[], torch.Tensor]]:
        batch = {"video": torch.rand(b, 3, cfg.data.num_frames, *cfg.data.size) * 2 - 1}
        return [lambda: stage.loss(model, parts, batch, cfg.recipe.gan_start, "ae")[0],
                lambda: stage.loss(model, parts, batch, cfg.recipe.gan_start, "disc")[0]]

    return Trainee(model, [stage.lpips] if stage.lpips is not None else [], phases)


def _outside_fake_mode(build: Callable[[], nn.Module]) -> nn.Module:
    """A module whose constructor fails on fake tensors (LPIPS: its uninitialised weights come from
    the meta device through `to_empty`), built real and given weights like its own in the current
    mode (fake ones under `fake_tensors()`)."""
    with _disable_current_modes():
        module = build()
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = nn.Parameter(torch.empty_like(p), requires_grad=p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = torch.empty_like(b)
    return module


# ----------------------------------------------------------------------------------------------
# Tracing
# ----------------------------------------------------------------------------------------------


class _Constants(TorchDispatchMode):
    """Answers a fake tensor's value questions (`bool(t)`, `t.item()`, `float(t)`) with 1 / True:
    the checks of the inputs pass and the logged values are ignored. Nothing the planner traces
    takes a shape from a value."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            return True if t.dtype == torch.bool else 1.0 if t.is_floating_point() else 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def fake_tensors():
    """Every tensor made inside is a fake one (no memory); value questions answered by `_Constants`."""
    with FakeTensorMode(allow_non_fake_inputs=True), _Constants():
        yield


class _Allocations(TorchDispatchMode):
    """The tensors ops make inside it: the bytes still alive (`now`, each storage once, freed when
    its last tensor dies) and their peaks, apart for allocations made with autograd recording
    (`peaks[True]`: the trained forward) and not (`peaks[False]`: the frozen networks' forwards,
    e.g. the MoVQ encoding the batch), each as [with, without] the low-precision copies autocast
    makes of the trainable parameters (`copies`: their storages; a Linear's transposed weight is a
    view of its copy). An op's output that shares an input's storage (a view, an in-place op) is
    no allocation."""

    def __init__(self, params):
        super().__init__()
        self.params, self.copies, self.sizes = {id(p) for p in params}, set(), {}
        self.now, self.now_without_copies = 0, 0
        self.peaks = {False: [0, 0], True: [0, 0]}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage()._cdata
                if key not in inputs and key not in self.sizes:
                    weight_copy = func is torch.ops.aten._to_copy.default and id(args[0]) in self.params
                    self._allocate(t.untyped_storage(), weight_copy)
        return out

    def _allocate(self, storage, weight_copy: bool) -> None:
        key, size = storage._cdata, storage.nbytes()
        self.sizes[key] = size
        if weight_copy:
            self.copies.add(key)
        self.now += size
        self.now_without_copies += 0 if weight_copy else size
        peak = self.peaks[torch.is_grad_enabled()]
        peak[0], peak[1] = max(peak[0], self.now), max(peak[1], self.now_without_copies)
        weakref.finalize(storage, self._free, key)

    def _free(self, key) -> None:
        size = self.sizes.pop(key)
        self.now -= size
        if key in self.copies:
            self.copies.discard(key)
        else:
            self.now_without_copies -= size

    def restart(self) -> tuple:
        """Count the peaks from here; returns what is alive now (with, without copies)."""
        self.peaks = {False: [self.now, self.now_without_copies], True: [self.now, self.now_without_copies]}
        return self.now, self.now_without_copies


class _SavedBytes:
    """Pack hook of `saved_tensors_hooks`: sums the storages autograd saves for the backward, each
    once, `exclude` (the parameters' and buffers') left out; `copies` is the weight copies' share."""

    def __init__(self, exclude: set, allocations: _Allocations):
        self.exclude, self.allocations = exclude, allocations
        self.seen, self.total, self.copies = set(), 0, 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.seen and key not in self.exclude:
            self.seen.add(key)
            self.total += storage.nbytes()
            if key in self.allocations.copies:
                self.copies += storage.nbytes()
        return t


class _Blocks:
    """Forward hooks on the recomputed blocks: the saved bytes (and their weight copies) and the
    forward FLOPs of each outermost block run with autograd recording."""

    def __init__(self, model: nn.Module, saved: _SavedBytes, flops: FlopCounterMode):
        self.saved, self.flops, self.depth, self.start = saved, flops, 0, None
        self.runs: List[tuple] = []  # (saved bytes, weight copies, forward flops) per block run
        self.handles = [h for m in model.modules() if isinstance(m, RECOMPUTED)
                        for h in (m.register_forward_pre_hook(self.enter), m.register_forward_hook(self.leave))]

    def enter(self, module, args):
        if self.depth == 0 and torch.is_grad_enabled():
            self.start = (self.saved.total, self.saved.copies, self.flops.get_total_flops())
        self.depth += 1

    def leave(self, module, args, output):
        self.depth -= 1
        if self.depth == 0 and self.start is not None:
            now = (self.saved.total, self.saved.copies, self.flops.get_total_flops())
            self.runs.append(tuple(a - b for a, b in zip(now, self.start)))
            self.start = None

    def close(self):
        for h in self.handles:
            h.remove()


@dataclass
class Trace:
    """One step at one batch size, of the phase whose forward peaks highest. The peaks of the bytes
    its forward allocated and kept alive at once (the autocast cache, the saved tensors, the
    working tensors), reached while autograd recorded (`forward`) and while it did not (`frozen`:
    the MoVQ encoding the batch, the frozen text tower), each with and without autocast's weight
    copies (`*_nc`); the bytes the forward saved for the backward and their weight copies; the
    largest recomputed block's saved bytes and copies. FLOPs of every phase, and the forward FLOPs
    of the recomputed blocks."""

    forward: int
    forward_nc: int
    frozen: int
    frozen_nc: int
    saved: int
    copies: int
    block: int
    block_copies: int
    flops: int
    recompute_flops: int


def trace_step(trainee: Trainee, batch_size: int, precision: str, checkpointing: bool, backward: bool = True) -> Trace:
    """Run one step of `trainee` at `batch_size` (under `fake_tensors()` for the planner) with the
    hooks that measure it; without `backward` only the forward passes run (enough for the bytes)."""
    model = trainee.model
    model.train()
    model.set_grad_checkpointing(checkpointing)
    exclude = {t.untyped_storage()._cdata for m in [model, *trainee.held] for t in [*m.parameters(), *m.buffers()]}
    allocations = _Allocations(p for p in model.parameters() if p.requires_grad)
    saved = _SavedBytes(exclude, allocations)
    amp = autocast_context(precision, torch.device("cpu"), logging.getLogger(__name__))
    worst = (0,) * 6
    with FlopCounterMode(display=False) as flops, allocations:
        blocks = _Blocks(model, saved, flops)
        try:
            for phase in trainee.phases(batch_size):
                saved.seen, saved.total, saved.copies = set(), 0, 0
                alive, alive_nc = allocations.restart()
                with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t), amp:
                    loss = phase()
                (forward, forward_nc), (frozen, frozen_nc) = allocations.peaks[True], allocations.peaks[False]
                worst = max(worst, (forward - alive, forward_nc - alive_nc, frozen - alive, frozen_nc - alive_nc,
                                    saved.total, saved.copies))
                if backward:
                    loss.backward()
                del loss
        finally:
            blocks.close()
    model.zero_grad(set_to_none=True)
    block = max(blocks.runs, default=(0, 0, 0))
    return Trace(*worst, block[0], block[1], flops.get_total_flops(), sum(run[2] for run in blocks.runs))


# ----------------------------------------------------------------------------------------------
# The footprint of a config
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Linear:
    """fixed + per_sample * batch."""

    fixed: float
    per_sample: float

    @classmethod
    def through(cls, at1: float, at2: float) -> "Linear":
        return cls(2 * at1 - at2, at2 - at1)

    def at(self, batch: int) -> float:
        return self.fixed + self.per_sample * batch


@dataclass
class Footprint:
    """What a config's training step holds and computes, independent of the cluster: counts of
    elements (`*_numel`), bytes, and what is linear in the per-GPU batch. `activations[(checkpointing,
    copies)]` are the lines of the moments a step may peak (`activation_peaks`), the activations
    at a batch their maximum; with `copies`, autocast's low-precision copies of the trainable
    weights are among them (the weights are fp32 when the forward uses them), without, the weights
    come in the compute dtype (FSDP's `param_dtype: bf16`)."""

    trainable_numel: int
    frozen_bytes: int  # the model's frozen parameters and its buffers
    held_bytes: int  # the frozen networks the stage holds beside the model
    buffer_numel: int  # persistent buffers (the EMA copies them)
    unit_numel: int  # the largest FSDP unit's trainable parameters
    root_numel: int  # the trainable parameters in no unit (the root units, gathered forward to backward)
    activations: Dict[Tuple[bool, bool], List[Linear]]
    flops: Linear  # forward + backward, without the recompute
    recompute_flops: Linear
    info: Dict[str, object] = field(default_factory=dict)


PEAK_MOMENTS = ("frozen forward", "forward", "backward")


def activation_peaks(trace: Trace, blocks: Optional[Trace], copies: bool) -> List[float]:
    """The activation bytes at the moments a step may peak (`PEAK_MOMENTS`): the frozen networks'
    forwards, the trained forward, and the start of the backward with (under checkpointing,
    `blocks` the trace without it) the largest block recomputed. Without `copies`, no autocast
    weight copies (the weights come in the compute dtype)."""
    if copies:
        block = 0 if blocks is None else blocks.block
        return [trace.frozen, trace.forward, trace.saved + block]
    block = 0 if blocks is None else blocks.block - blocks.block_copies
    return [trace.frozen_nc, trace.forward_nc, trace.saved - trace.copies + block]


def _unit_sizes(model: nn.Module) -> tuple:
    """(largest unit's, the roots') trainable elements under FSDP: each unit owns the trainable
    parameters none of the units inside it owns."""
    owned, largest = set(), 0
    for unit in shard_units(model):  # innermost first
        mine = [p for p in unit.parameters() if p.requires_grad and id(p) not in owned]
        owned.update(id(p) for p in mine)
        largest = max(largest, sum(p.numel() for p in mine))
    root = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in owned)
    return largest, root


def footprint_of(trainee: Trainee, precision: str) -> Footprint:
    """Trace `trainee` at batch 1 and 2, without and with checkpointing (the latter forward only);
    each quantity is the line through its values at the two batches."""
    model = trainee.model
    off = [trace_step(trainee, b, precision, checkpointing=False) for b in (1, 2)]
    on = [trace_step(trainee, b, precision, checkpointing=True, backward=False) for b in (1, 2)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    persistent = set(model.state_dict(keep_vars=True))
    unit, root = _unit_sizes(model)

    def peaks(checkpointing: bool, copies: bool) -> List[Linear]:
        at = [activation_peaks(on[i], off[i], copies) if checkpointing else activation_peaks(off[i], None, copies)
              for i in (0, 1)]
        return [Linear.through(one, two) for one, two in zip(*at)]

    return Footprint(
        trainable_numel=sum(p.numel() for p in trainable),
        frozen_bytes=sum(t.nbytes for t in [*model.parameters(), *model.buffers()] if not t.requires_grad),
        held_bytes=sum(t.nbytes for m in trainee.held for t in [*m.parameters(), *m.buffers()]),
        buffer_numel=sum(b.numel() for n, b in model.named_buffers() if n in persistent),
        unit_numel=unit, root_numel=root,
        activations={(ckpt, copies): peaks(ckpt, copies) for ckpt in (False, True) for copies in (False, True)},
        flops=Linear.through(off[0].flops, off[1].flops),
        recompute_flops=Linear.through(off[0].recompute_flops, off[1].recompute_flops),
        info={"trainable_params": sum(p.numel() for p in trainable),
              "frozen_params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
              "held_params": sum(p.numel() for m in trainee.held for p in m.parameters())},
    )


def measure(cfg: DictConfig, movq: Optional[MovqConfig] = None) -> Footprint:
    """The `Footprint` of `cfg`'s training step, traced on fake tensors (no memory, no files)."""
    with fake_tensors():
        trainee = build_trainee(cfg, movq)
        return footprint_of(trainee, cfg.train.precision)


# ----------------------------------------------------------------------------------------------
# Per GPU, per strategy
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpu_mem_gb: float  # GiB
    gpus_per_node: int = 8


STRATEGIES = ("ddp", "fsdp", "hsdp")


def shard_degree(strategy: str, cluster: Cluster, fsdp_cfg) -> int:
    """Ranks the trained state is split over: 1 (ddp), every GPU (fsdp), a shard group (hsdp:
    `train.fsdp.shard_size`, 0 = a node's GPUs)."""
    if strategy == "ddp":
        return 1
    if strategy == "fsdp":
        return cluster.gpus
    return min(cluster.gpus, fsdp_cfg.shard_size or cluster.gpus_per_node)


def _copies(strategy: str, fsdp_cfg) -> bool:
    """Whether autocast copies the weights: they are fp32 unless FSDP gathers them in bf16."""
    return strategy == "ddp" or fsdp_cfg.param_dtype == "fp32"


def state_bytes(fp: Footprint, strategy: str, cluster: Cluster, fsdp_cfg) -> Dict[str, float]:
    """Bytes per GPU of what does not grow with the batch: params, grads, optimizer, ema.

    ddp: everything whole; gradients twice when there is more than one GPU (DDP's reducer holds
    its buckets beside `.grad`). fsdp / hsdp: weights, gradients, moments and EMA of the trainable
    parameters divided by the shard degree; frozen parameters whole (`train.fsdp.frozen:
    replicate`) or divided (`shard`); plus the gathered weights in flight in `param_dtype`, two
    of the largest unit (the one computing, the next prefetched) and the roots (held from forward
    to backward), and the unsharded gradients of one unit and the roots. The frozen networks the
    stage holds beside the model are whole everywhere."""
    n = shard_degree(strategy, cluster, fsdp_cfg)
    trainable = fp.trainable_numel * 4
    if strategy == "ddp":
        params = trainable + fp.frozen_bytes + fp.held_bytes
        grads = trainable * (2 if cluster.gpus > 1 else 1)
    else:
        gathered = _BYTES[fsdp_cfg.param_dtype]
        frozen = fp.frozen_bytes if fsdp_cfg.frozen == "replicate" else fp.frozen_bytes / n
        params = trainable / n + frozen + fp.held_bytes + gathered * (2 * fp.unit_numel + fp.root_numel)
        grads = trainable / n + gathered * (fp.unit_numel + fp.root_numel)
    return {"params": params, "grads": grads, "optimizer": 2 * trainable / n, "ema": (trainable + fp.buffer_numel * 4) / n}


def per_gpu(fp: Footprint, strategy: str, checkpointing: bool, cluster: Cluster, fsdp_cfg, batch: int) -> Dict[str, float]:
    """Bytes per GPU of each part of a step at per-GPU `batch` (`state_bytes` and the activations
    at the step's peak) and their total, every part counted at its own peak."""
    parts = state_bytes(fp, strategy, cluster, fsdp_cfg)
    parts["activations"] = max(line.at(batch) for line in fp.activations[(checkpointing, _copies(strategy, fsdp_cfg))])
    return {**parts, "total": sum(parts.values())}


def max_batch(fp: Footprint, strategy: str, checkpointing: bool, cluster: Cluster, fsdp_cfg) -> int:
    """The largest per-GPU batch whose total fits in the GPU's memory (0: not even one sample)."""
    room = cluster.gpu_mem_gb * GIB - sum(state_bytes(fp, strategy, cluster, fsdp_cfg).values())
    limits = [(room - line.fixed) // line.per_sample if line.per_sample > 0 else (1 << 30 if line.fixed <= room else 0)
              for line in fp.activations[(checkpointing, _copies(strategy, fsdp_cfg))]]
    return max(0, int(min(limits)))


def plan_cluster(fp: Footprint, cfg: DictConfig, cluster: Cluster) -> dict:
    """Every strategy with and without checkpointing at the config's `train.batch_size` on `cluster`,
    and the step's FLOPs (times `train.grad_accum` micro-batches)."""
    tc, batch = cfg.train, cfg.train.batch_size
    rows = []
    for strategy in STRATEGIES:
        for ckpt in (False, True):
            parts = per_gpu(fp, strategy, ckpt, cluster, tc.fsdp, batch)
            rows.append({"strategy": strategy, "checkpointing": ckpt,
                         "per_gpu_gb": {k: v / GIB for k, v in parts.items()},
                         "fits": parts["total"] <= cluster.gpu_mem_gb * GIB,
                         "max_batch": max_batch(fp, strategy, ckpt, cluster, tc.fsdp),
                         "shard_degree": shard_degree(strategy, cluster, tc.fsdp)})
    activations = {
        f"{'checkpointing' if ckpt else 'plain'}{'' if copies else ', bf16 weights'}":
            {moment: {"fixed_gb": line.fixed / GIB, "per_sample_gb": line.per_sample / GIB}
             for moment, line in zip(PEAK_MOMENTS, lines)}
        for (ckpt, copies), lines in fp.activations.items()}
    return {
        "strategies": rows,
        "step_flops": fp.flops.at(batch) * tc.grad_accum,
        "step_flops_per_sample": fp.flops.per_sample,
        "recompute_flops": fp.recompute_flops.at(batch) * tc.grad_accum,
        "stage": cfg.stage, "model": cfg.model.name, "batch_size": batch, "grad_accum": tc.grad_accum,
        "precision": tc.precision, "gpus": cluster.gpus, "gpu_mem_gb": cluster.gpu_mem_gb,
        "gpus_per_node": cluster.gpus_per_node, **fp.info, "activations": activations,
    }
