"""Sharded checkpoints of an FSDP run (`train.parallel: fsdp | hsdp`), with
`torch.distributed.checkpoint`:

    step_0001000/
      sharded/            every rank's shard of the model, the EMA and the optimizer states
        .metadata         (keys `model.*`, `ema.*`, `optimizers.<phase>.*`), `__R_0.distcp` per rank
      config.yaml, train_state.pt (step, schedulers, every rank's RNG and data position),
      manifest.json       as in a whole checkpoint (the manifest lists the shards too)

The same atomic protocol as `kvideo.train.checkpoint.save_checkpoint`: rank 0 makes the temporary
directory, every rank writes its shard into it, rank 0 adds the rest and renames it into place,
then `latest`. A resume reads the shards back on any number of ranks (DCP reshards); readers
that want whole weights (`sample.py`, the tools) get them from
`kvideo.inference.checkpoints.load_weights`, which reads both kinds.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from kvideo.inference.checkpoints import SHARDED
from kvideo.train import checkpoint as ckpt
from kvideo.train import dist
from kvideo.train.ema import EMA


def sharded_state(model: nn.Module, ema: EMA, optimizers: Dict[str, torch.optim.Optimizer],
                  modules: Dict[str, nn.Module]) -> dict:
    """What a sharded checkpoint holds, as this rank's (DTensor) views: `modules[name]` is the
    module optimizer `name` steps (its parameters' names key the optimizer state). An optimizer
    that has not stepped yet (a GAN's discriminator before recipe.gan_start) is left out:
    `get_optimizer_state_dict` would initialise it with a step of zero gradients, and its Adam
    step count of 1 would change the bias correction of its real first steps."""
    return {"model": model.state_dict(), "ema": ema.state_dict(),
            "optimizers": {n: get_optimizer_state_dict(modules[n], opt) for n, opt in optimizers.items() if opt.state}}


def save_sharded(run_dir: Path, step: int, tensors: dict, train_state: dict, config_plain: dict, *, keep: int,
                 info: dist.DistInfo) -> Path:
    """Write the checkpoint of `step` from every rank (a collective: every rank calls it); raises
    CheckpointWriteError on every rank when any part fails, leaving the previous one intact."""
    tmp, error = None, None
    if info.is_main:
        try:
            tmp = ckpt.begin_checkpoint(run_dir, step)
        except ckpt.CheckpointWriteError as e:
            error = e
    tmp = dist.broadcast_object(None if tmp is None else str(tmp))
    if tmp is None:
        raise error or ckpt.CheckpointWriteError("rank 0 could not create the checkpoint directory (its log says why)")
    try:
        dcp.save(tensors, checkpoint_id=str(Path(tmp) / SHARDED))
    except Exception as e:  # DCP raises on every rank when one rank's write fails
        error = e
    if not dist.all_true(error is None, info.device):
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise ckpt.CheckpointWriteError(f"writing the shards of step {step} failed on some rank "
                                        f"({error or 'see that rank log'}); the previous checkpoint is intact")
    path = None
    if info.is_main:
        try:
            path = ckpt.finish_checkpoint(run_dir, step, Path(tmp),
                                          lambda d: ckpt.write_train_files(d, train_state, config_plain), keep)
        except ckpt.CheckpointWriteError as e:
            error = e
    if not dist.all_true(error is None, info.device):
        raise error or ckpt.CheckpointWriteError("rank 0 could not finish the checkpoint (its log says why)")
    return Path(dist.broadcast_object(None if path is None else str(path)))


def load_sharded(ckpt_dir: Path, model: nn.Module, ema: EMA, optimizers: Dict[str, torch.optim.Optimizer],
                 modules: Dict[str, nn.Module], ema_updates: int) -> None:
    """Every rank reads its part of a sharded checkpoint into the sharded model, EMA and optimizers
    (on any world size: the shards are laid out again)."""
    if not (ckpt_dir / SHARDED).is_dir():
        raise ValueError(f"resume: '{ckpt_dir}' is a whole checkpoint, this run shards its model "
                         f"(train.parallel=fsdp|hsdp). Resume it with train.parallel=ddp, or start the sharded "
                         f"run from its weights (recipe.init_from) without its optimizer state")
    stored = dcp.FileSystemReader(str(ckpt_dir / SHARDED)).read_metadata().state_dict_metadata
    saved = {name for name in optimizers if any(k.startswith(f"optimizers.{name}.") for k in stored)}
    state = {"model": model.state_dict(), "ema": ema.state_dict(),  # the optimizers the checkpoint has
             "optimizers": {n: get_optimizer_state_dict(modules[n], optimizers[n]) for n in saved}}
    dcp.load(state, checkpoint_id=str(ckpt_dir / SHARDED))
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"], ema_updates)
    for name in saved:
        set_optimizer_state_dict(modules[name], optimizers[name], state["optimizers"][name])
