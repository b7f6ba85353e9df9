"""Data parallelism: how the training engine spreads a model over the ranks (`train.parallel`).

    ddp   every rank holds the whole model and DDP all-reduces the gradients of each phase's
          module (a single process runs the module itself, no wrapper)
    fsdp  FSDP2 (`torch.distributed.fsdp.fully_shard`) over every rank: parameters, gradients and
          optimizer states are split over the ranks, and so is the EMA, whose shadows are made
          from the sharded parameters. Each block is an FSDP unit (`SHARD_UNITS`: the UNet's
          ResNet and attention blocks, the temporal blocks, the MoVQ's blocks, the
          discriminator), gathered for its forward and freed after it; each phase's module is
          the root unit of the rest. Frozen parameters are replicated (`train.fsdp.frozen`) or
          sharded. Checkpoints are sharded (`kvideo.train.checkpoint.save_sharded`).
    hsdp  the same within groups of `train.fsdp.shard_size` ranks, replicated across the groups

FSDP changes the modules in place (each becomes an FSDPModule, its parameters DTensors), so a
stage calls `parts[phase]` as under DDP and `model` is the same object. What differs for the
engine is here: gradient sync during accumulation (`no_sync`), the gradient norm of sharded
gradients (`clip_grad_norm`) and the EMA weights gathered whole for previews and evaluation
(`ema_model`, a collective).
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from kvideo.models.blocks import BLOCKS, blocks
from kvideo.models.discriminator import PatchDiscriminator
from kvideo.train.dist import DistInfo
from kvideo.train.ema import EMA
from kvideo.train.stages.base import Phase

# The FSDP units: the networks' blocks and the GAN discriminator, a whole network called through
# its forward.
SHARD_UNITS = (*BLOCKS, PatchDiscriminator)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Parallel:
    """The data parallelism of one run: `wrap` the phases' modules once, before the optimizers
    and the EMA are built from their parameters."""

    def __init__(self, kind: str, info: DistInfo, fsdp_cfg) -> None:
        if kind not in ("ddp", "fsdp", "hsdp"):
            raise ValueError(f"train.parallel must be ddp, fsdp or hsdp, got '{kind}'")
        self.kind, self.info, self.fsdp_cfg = kind, info, fsdp_cfg
        self.skeleton: Optional[nn.Module] = None

    @property
    def sharded(self) -> bool:
        return self.kind in ("fsdp", "hsdp")

    def wrap(self, model: nn.Module, phases: List[Phase]) -> Dict[str, nn.Module]:
        """What `Stage.loss` runs for each phase: the DDP-wrapped module, the module sharded in
        place, or (one process under ddp) the module itself."""
        if not self.sharded:
            if not self.info.enabled:
                return {ph.name: ph.module for ph in phases}
            ids = [self.info.device.index] if self.info.device.type == "cuda" else None
            return {ph.name: DDP(ph.module, device_ids=ids) for ph in phases}
        self.skeleton = meta_copy(model)  # the layout of the whole model, for `ema_model`
        mesh = self._mesh()
        c = self.fsdp_cfg
        policy = MixedPrecisionPolicy(param_dtype=_DTYPES[c.param_dtype], reduce_dtype=_DTYPES[c.reduce_dtype])
        for ph in phases:
            frozen = {p for p in ph.module.parameters() if not p.requires_grad} if c.frozen == "replicate" else set()
            options = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=c.reshard_after_forward)
            for unit in blocks(ph.module, SHARD_UNITS):
                if any(p not in frozen for p in unit.parameters()):
                    fully_shard(unit, ignored_params=frozen & set(unit.parameters()) or None, **options)
            # the root keeps its weights gathered from its forward to its backward (it would gather
            # them again at once), so a stage can differentiate through them mid-step (the GAN
            # stages' adaptive weight takes the gradient of the decoder's last layer)
            fully_shard(ph.module, ignored_params=frozen or None, **{**options, "reshard_after_forward": False})
        return {ph.name: ph.module for ph in phases}

    def _mesh(self):
        world, device = self.info.world_size, self.info.device.type
        if self.kind == "fsdp":
            return init_device_mesh(device, (world,), mesh_dim_names=("shard",))
        size = self.fsdp_cfg.shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if world % size:
            raise ValueError(f"train.parallel=hsdp: train.fsdp.shard_size={size} does not divide the world size {world}")
        return init_device_mesh(device, (world // size, size), mesh_dim_names=("replicate", "shard"))

    def no_sync(self, part: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Around a micro-batch's backward: gradients synchronised only on the last one."""
        if last or not (self.info.enabled or self.sharded):
            return contextlib.nullcontext()
        if isinstance(part, FSDPModule):
            return _fsdp_sync_off(part)
        return part.no_sync()

    def ema_model(self, model: nn.Module, ema: EMA) -> Optional[nn.Module]:
        """A whole, unsharded copy of `model` holding the EMA weights, on rank 0 (None on the
        others). Under FSDP every rank must call it: the weights are gathered."""
        if not self.sharded:
            if not self.info.is_main:
                return None
            shadow = copy.deepcopy(model)
            ema.copy_to(shadow)
            return shadow
        full = {k: _full(v) for k, v in model.state_dict().items()}
        full.update({k: _full(v) for k, v in ema.state_dict().items()})
        if not self.info.is_main:
            return None
        shadow = copy.deepcopy(self.skeleton)  # its non-persistent buffers are real, the rest meta
        shadow.load_state_dict({k: v.detach().clone() for k, v in full.items()}, assign=True)
        return shadow.to(self.info.device)


def clip_grad_norm(params: List[nn.Parameter], max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` over plain or sharded gradients; the global norm as a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def meta_copy(model: nn.Module) -> nn.Module:
    """`model`'s structure with its parameters and persistent buffers on the meta device (no
    memory); non-persistent buffers (e.g. a causal mask, not in any state dict) are copied."""
    persistent = {id(t) for t in model.state_dict(keep_vars=True).values()}
    memo = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        if id(b) in persistent:
            memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def _fsdp_sync_off(part: FSDPModule):
    part.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        part.set_requires_gradient_sync(True)
