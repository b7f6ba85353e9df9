"""The memory and FLOP planner: what one training step of a config holds on each GPU and computes.

    footprint = measure(cfg)          # one step traced on fake tensors: no memory, no weights files
    plan = plan_cluster(footprint, cfg, Cluster(gpus=64, gpu_mem_gb=80))
    plan["strategies"]   [{"strategy", "checkpointing", "per_gpu_gb": {...}, "fits", "max_batch"}, ...]
    plan["step_flops"]   forward + backward FLOPs of one step at train.batch_size

`tools/plan.py` is the command line; docs/SCALING.md has the full-size configs' table.

What runs is `kvideo.train.trainee.build_trainee`'s: the model the engine trains, randomly
initialised, the frozen networks beside it and one step of it (that module says how each stage's
step is made). The forward runs under `train.precision`'s autocast, then the backward of the
scalar loss.

How: under `FakeTensorMode` (torch._subclasses.fake_tensor), whose tensors have shapes, dtypes and
devices but no memory: the 4.1B-parameter keyframe step traces in about two minutes on a CPU. Not
the meta device: autocast acts on tensors whose device has an autocast key, which a fake CPU tensor
has and a meta tensor has not, so on meta the bf16 casts and activations would not be traced. Both
fail at `bool(t)` and `t.item()` (input checks such as the UNet's "a valid text token in every
sample", the tokenizer's end tokens, a stage's logged `float(loss)`): `_Constants` answers them as
valid data would.

- activations, at batch 1 and 2 (a fixed part and a per-sample slope), at each moment a step may
  peak: while autograd does not record (the frozen networks' forwards, e.g. the MoVQ encoding a
  batch of 512x512 frames; a stage's own gradients, e.g. the GAN's adaptive weight), the trained
  forward (what it allocated and keeps: the tensors saved for the backward and autocast's copy of
  every fp32 weight, cached until the forward ends), and the start of the backward: the bytes
  saved for it (`saved_tensors_hooks`, each storage once, parameters and buffers left out) and,
  with checkpointing, the largest block's recompute (its saved bytes in the trace without
  checkpointing; a block is an outermost FSDP unit, `kvideo.models.blocks.BLOCKS`, the
  modules `run_block` recomputes).
- FLOPs: `torch.utils.flop_counter.FlopCounterMode` over the step, the frozen networks' forwards
  included; checkpointing's recompute counted apart (`recompute_flops`).
- weights, gradients, AdamW's two fp32 moments and the fp32 EMA of the trainable parameters
  (kvideo/train/ema.py), from the parameters, laid out per strategy (`state_bytes`).

The total adds each part at its own peak, an upper bound: the gradients are whole while the
activations peak. tests/test_plan.py checks it against the peak measured on the CPU.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from kvideo.models.blocks import BLOCKS, blocks
from kvideo.models.movq import MovqConfig
from kvideo.train.dist import autocast_context
from kvideo.train.parallel import SHARD_UNITS
from kvideo.train.trainee import Trainee, build_trainee

GIB = 2 ** 30
_BYTES = {"fp32": 4, "bf16": 2}

# ----------------------------------------------------------------------------------------------
# Tracing
# ----------------------------------------------------------------------------------------------


class _Constants(TorchDispatchMode):
    """Answers a fake tensor's value questions (`bool(t)`, `t.item()`, `float(t)`) as valid data
    would: False for the result of an `any` (no element is bad: `if bool((count == 0).any()):
    raise`), True for other booleans (`if not bool(mask.any(dim=1).all()): raise`), 1 for numbers
    (logged values). No shape the planner traces comes from a value."""

    def __init__(self):
        super().__init__()
        self.last_any = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            if t.dtype == torch.bool:
                return t is not self.last_any
            return 1.0 if t.is_floating_point() else 1
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten.any:
            self.last_any = out
        return out


@contextlib.contextmanager
def fake_tensors():
    """Every tensor made inside is a fake one (no memory); value questions answered by `_Constants`."""
    with FakeTensorMode(allow_non_fake_inputs=True), _Constants():
        yield


class _StepMemory(TorchDispatchMode):
    """The memory of one phase's forward. As a dispatch mode: the tensors ops make (an output that
    shares an input's storage, a view or an in-place op, is none), each storage once until its
    last tensor dies; their peaks while autograd records (`peaks[True]`, the trained forward) and
    while it does not (`peaks[False]`: the frozen networks, `autograd.grad`), each [with, without]
    the copies autocast makes of the trainable parameters (`copies`; a Linear's transposed weight
    is a view of its copy). As `pack`, the hook of `saved_tensors_hooks`: the bytes saved for the
    backward (`saved`) and their weight copies (`saved_copies`), each storage once, `exclude` left
    out."""

    def __init__(self, params, exclude: set):
        super().__init__()
        self.params, self.exclude, self.copies, self.sizes = {id(p) for p in params}, exclude, set(), {}
        self.now = [0, 0]  # alive: [all, without the weight copies]
        self.restart()

    def restart(self) -> List[int]:
        """Count the phase from here; returns what is alive now."""
        self.peaks = {False: list(self.now), True: list(self.now)}
        self.seen, self.saved, self.saved_copies = set(), 0, 0
        return list(self.now)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in inputs and key not in self.sizes:
                    weight_copy = func is torch.ops.aten._to_copy.default and id(args[0]) in self.params
                    self._allocate(storage, key, weight_copy)
        return out

    def _allocate(self, storage, key, weight_copy: bool) -> None:
        self.sizes[key] = size = storage.nbytes()
        if weight_copy:
            self.copies.add(key)
        self.now = [self.now[0] + size, self.now[1] + (0 if weight_copy else size)]
        peak = self.peaks[torch.is_grad_enabled()]
        peak[:] = [max(a, b) for a, b in zip(peak, self.now)]
        weakref.finalize(storage, self._free, key)

    def _free(self, key) -> None:
        size = self.sizes.pop(key)
        self.now = [self.now[0] - size, self.now[1] - (0 if key in self.copies else size)]
        self.copies.discard(key)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in self.seen and key not in self.exclude:
            self.seen.add(key)
            self.saved += t.untyped_storage().nbytes()
            self.saved_copies += t.untyped_storage().nbytes() if key in self.copies else 0
        return t


class _Blocks:
    """Forward hooks on the recomputed blocks: the saved bytes, their weight copies and the forward
    FLOPs of each outermost block run with autograd recording."""

    def __init__(self, model: nn.Module, memory: _StepMemory, flops: FlopCounterMode):
        self.memory, self.flops, self.depth, self.start = memory, flops, 0, None
        self.runs: List[tuple] = []  # (saved bytes, weight copies, forward flops) per block run
        self.handles = [h for m in model.modules() if isinstance(m, BLOCKS)  # what `run_block` recomputes
                        for h in (m.register_forward_pre_hook(self.enter), m.register_forward_hook(self.leave))]

    def now(self) -> tuple:
        return self.memory.saved, self.memory.saved_copies, self.flops.get_total_flops()

    def enter(self, module, args):
        if self.depth == 0 and torch.is_grad_enabled():
            self.start = self.now()
        self.depth += 1

    def leave(self, module, args, output):
        self.depth -= 1
        if self.depth == 0 and self.start is not None:
            self.runs.append(tuple(a - b for a, b in zip(self.now(), self.start)))
            self.start = None


@dataclass
class Trace:
    """One step at one batch size (the phase whose forward peaks highest): `_StepMemory`'s peaks
    (`*_nc`: without the weight copies) and saved bytes, the largest recomputed block's saved bytes
    and copies; the FLOPs of every phase, and the forward FLOPs of the recomputed blocks."""

    forward: int
    forward_nc: int
    no_grad: int
    no_grad_nc: int
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
    memory = _StepMemory([p for p in model.parameters() if p.requires_grad], exclude)
    amp = autocast_context(precision, torch.device("cpu"), logging.getLogger(__name__))
    worst = (0,) * 6
    with FlopCounterMode(display=False) as flops, memory:
        blocks = _Blocks(model, memory, flops)
        for phase in trainee.phases(batch_size):
            alive = memory.restart()
            with torch.autograd.graph.saved_tensors_hooks(memory.pack, lambda t: t), amp:
                loss = phase()
            forward, no_grad = memory.peaks[True], memory.peaks[False]
            worst = max(worst, (forward[0] - alive[0], forward[1] - alive[1], no_grad[0] - alive[0],
                                no_grad[1] - alive[1], memory.saved, memory.saved_copies))
            if backward:
                loss.backward()
            del loss
    for handle in blocks.handles:
        handle.remove()
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
        """The line through its values at batch 1 and 2."""
        return cls(float(2 * at1 - at2), float(at2 - at1))

    def at(self, batch: int) -> float:
        return self.fixed + self.per_sample * batch


@dataclass
class Footprint:
    """What a config's step holds and computes, whatever the cluster: element counts, bytes, and
    lines in the per-GPU batch. `activations[(checkpointing, copies)]`: a line per moment a step may
    peak (`activation_peaks`; the activations at a batch are their maximum), with or without
    autocast's copies of the trainable weights (none when FSDP gathers them in bf16)."""

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


PEAK_MOMENTS = ("no_grad", "forward", "backward")


def activation_peaks(trace: Trace, blocks: Optional[Trace], copies: bool) -> List[float]:
    """The activation bytes at the moments a step may peak (`PEAK_MOMENTS`): while autograd does not
    record (the frozen networks' forwards), the trained forward, and the start of the backward with
    (under checkpointing, `blocks` the trace without it) the largest block recomputed. Without
    `copies`, no autocast weight copies (the weights come in the compute dtype)."""
    if copies:
        block = 0 if blocks is None else blocks.block
        return [trace.no_grad, trace.forward, trace.saved + block]
    block = 0 if blocks is None else blocks.block - blocks.block_copies
    return [trace.no_grad_nc, trace.forward_nc, trace.saved - trace.copies + block]


def _unit_sizes(model: nn.Module) -> tuple:
    """(largest unit's, the roots') trainable elements under FSDP: each unit owns the trainable
    parameters none of the units inside it owns."""
    owned, largest = set(), 0
    for unit in blocks(model, SHARD_UNITS):  # innermost first
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
    with fake_tensors(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what the stages warn about real data (long prompts, logged grads)
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
    ema = (trainable + fp.buffer_numel * 4) / n
    return {"params": params, "grads": grads, "optimizer": 2 * trainable / n, "ema": ema}


def per_gpu(fp: Footprint, strategy: str, checkpointing: bool, cluster: Cluster, fsdp_cfg,
            batch: int) -> Dict[str, float]:
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
