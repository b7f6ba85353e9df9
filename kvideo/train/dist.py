"""Distributed setup and devices: plain torchrun environment variables, gloo on CPU, nccl on
CUDA; the device and the autocast of a run.

`python train.py ...` runs as a single process (world size 1, no process group);
`torchrun --nproc_per_node N train.py ...` sets RANK / WORLD_SIZE / LOCAL_RANK and every rank
joins one process group. Nothing here hides a real error behind its own.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` picks CUDA (this process's local GPU) when available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"train.device must be auto, cpu or cuda, got '{name}'")


def init_distributed(device_name: str = "auto", *, timeout_s: float = 1800.0, always: bool = False) -> DistInfo:
    """Join the torchrun process group when launched by torchrun; otherwise a world of one (with
    a process group of its own when `always`, which FSDP needs even on one rank). A collective
    that waits longer than `timeout_s` for the other ranks fails instead of hanging."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if (world_size > 1 or always) and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if world_size == 1 and "MASTER_ADDR" not in os.environ:  # `python train.py`: no rendezvous needed
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_true(flag: bool, device: torch.device) -> bool:
    """True when `flag` holds on every rank (a logical AND across the process group)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() == 0.0


def any_true(flag: bool, device: torch.device) -> bool:
    """True when `flag` holds on at least one rank."""
    return not all_true(not flag, device)


def mean_across_ranks(values: dict, device: torch.device) -> dict:
    """Average a dict of floats over ranks (for logging); every rank passes the same keys."""
    return _reduce(values, device, mean=True)


def sum_across_ranks(values: dict, device: torch.device) -> dict:
    """Sum a dict of numbers over ranks (counts); every rank passes the same keys."""
    return _reduce(values, device, mean=False)


def _reduce(values: dict, device: torch.device, *, mean: bool) -> dict:
    if not dist.is_initialized() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    if mean:
        t /= dist.get_world_size()
    return {k: v for k, v in zip(keys, t.tolist())}


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's `obj`, in rank order (a list of one outside distributed runs)."""
    if not dist.is_initialized():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (`obj` itself outside distributed runs)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_module_(module: torch.nn.Module, names: List[str], src: int = 0) -> None:
    """Copy the named parameters/buffers of `module` from rank `src` to every rank, in place."""
    if not dist.is_initialized():
        return
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    for name in names:
        dist.broadcast(tensors[name].data, src=src)


def autocast_context(precision: str, device: torch.device, log) -> contextlib.AbstractContextManager:
    """The autocast of `train.precision` on `device`: none for fp32, bf16 where the device has it."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(f"train.precision must be fp32 or bf16, got '{precision}' (fp16 is not supported)")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("train.precision=bf16 but this GPU has no bf16 support: training in fp32")
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
