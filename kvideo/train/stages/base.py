"""What a stage gives the training engine: its model, its optimizer phases, batch -> loss, previews.

The engine (`kvideo.train.engine`) owns everything else: devices, DDP, precision, accumulation,
clipping, EMA, checkpoints, resume, logging. A stage with one optimizer has one phase; a GAN
stage has two (the generator, then the discriminator), each with its own optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Dict, Iterable, List, Optional, Tuple

import torch
from omegaconf import DictConfig
from torch import nn

from kvideo.data.buckets import bucket_shapes

@dataclass
class Phase:
    """One optimizer step per training step over the parameters of `module`.

    `module` must be a submodule of the stage's model (or the model itself); under DDP the engine
    wraps it and passes the wrapped module to `Stage.loss` in `parts[name]`.
    `lr`, `betas` and `weight_decay` of None take the `train` section's values. `lr_scales`
    gives named subsets of the module's parameters their own learning rate, a multiple of the
    phase's (e.g. loaded spatial layers slower than new temporal ones); each subset is one
    optimizer group, the remaining parameters another, and the schedule scales them all alike.
    """

    name: str
    module: nn.Module
    lr: Optional[float] = None
    betas: Optional[Tuple[float, float]] = None
    weight_decay: Optional[float] = None
    lr_scales: List[Tuple[str, List[nn.Parameter], float]] = field(default_factory=list)

    def param_groups(self, base_lr: float) -> List[dict]:
        """AdamW groups of the trainable parameters: each `lr_scales` subset, then the rest."""
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        owner = {id(p): "" for p in trainable}
        groups = []
        for name, params, scale in self.lr_scales:
            if scale <= 0:
                raise ValueError(f"phase '{self.name}': learning-rate scale of '{name}' must be > 0; got {scale}")
            mine = []
            for p in params:
                if id(p) not in owner:
                    if not p.requires_grad:
                        continue  # frozen parameters take no learning rate
                    raise ValueError(f"phase '{self.name}': a parameter of '{name}' is not in the phase's module")
                if owner[id(p)]:
                    raise ValueError(f"phase '{self.name}': a parameter is in both '{owner[id(p)]}' and '{name}'")
                owner[id(p)] = name
                mine.append(p)
            if mine:
                groups.append({"name": name, "params": mine, "lr": base_lr * scale})
        rest = [p for p in trainable if not owner[id(p)]]
        if rest:
            groups.append({"name": "rest", "params": rest, "lr": base_lr})
        return groups

    @classmethod
    def new_layers_faster(cls, name: str, module: nn.Module, new: Iterable[nn.Parameter],
                          loaded_lr_scale: float) -> "Phase":
        """A phase over `module` whose loaded layers (all but the `new` parameters) train at
        `loaded_lr_scale` times the phase's learning rate, e.g. the spatial layers of a model
        that gained temporal ones; 1.0 is one group at one rate."""
        if loaded_lr_scale == 1.0:
            return cls(name, module)
        new_ids = {id(p) for p in new}
        loaded = [p for p in module.parameters() if id(p) not in new_ids]
        return cls(name, module, lr_scales=[("spatial", loaded, float(loaded_lr_scale))])


class Stage:
    """Base class of a training stage; subclasses are registered by name in `kvideo.train.stages`
    (the recipe schema and default model of each stage name are `kvideo.registry.STAGES`')."""

    name: ClassVar[str] = ""
    reads_latents: ClassVar[bool] = False  # trains on MoVQ latents, so `data.latent_cache` can serve it
    # Sample metadata the stage reads; a sample without a valid value is skipped (data/shards.py).
    reads_fields: ClassVar[Tuple[str, ...]] = ()

    def __init__(self, cfg: DictConfig, device: torch.device):
        self.cfg = cfg
        self.rc = cfg.recipe  # this stage's recipe section (typed by kvideo.registry.STAGES[name].recipe)
        self.device = device
        if cfg.data.get("latent_cache") and not self.reads_latents:
            raise ValueError(f"data.latent_cache is set, but stage '{self.name}' trains on pixels, not on cached "
                             f"latents: remove data.latent_cache")
        self.shapes = bucket_shapes(cfg.data, cfg.train.batch_size)  # data.buckets, or the one shape
        for shape in self.shapes:
            self.check_data(shape.data)

    def check_data(self, data: DictConfig) -> None:
        """A ValueError when the stage cannot train on clips of this data section's shape
        (data.size, data.num_frames; called for each of data.buckets)."""

    def build_model(self) -> nn.Module:
        """The whole trainable model, on the CPU, randomly initialised or loaded by the stage."""
        raise NotImplementedError

    def phases(self, model: nn.Module) -> List[Phase]:
        return [Phase("main", model)]

    def size_multiple(self, model: nn.Module) -> int:
        """`data.size` must be divisible by this (the model's total downsampling)."""
        return 1

    def phase_active(self, phase: str, step: int) -> bool:
        return True

    def begin_step(self, step: int) -> None:
        """Called on every rank before step `step`'s losses (also the first step after a resume):
        where a setting follows the training step (e.g. an annealed timestep shift)."""

    def loss(self, model: nn.Module, parts: Dict[str, nn.Module], batch: dict, step: int,
             phase: str) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The scalar loss of `phase` on one micro-batch and a dict of floats to log.

        `model` is the unwrapped model; `parts[phase]` is the (possibly DDP-wrapped) module
        to run forward for the phase's gradients.
        """
        raise NotImplementedError

    def after_step(self, model: nn.Module, step: int, batches: List[dict]) -> Dict[str, float]:
        """Called on every rank after the optimizer steps; returns extra values to log."""
        return {}

    @torch.no_grad()
    def preview(self, model: nn.Module, batch: dict, out_dir: Path, step: int) -> List[Path]:
        """Write preview images/videos for `batch` under `out_dir`; returns the written paths."""
        return []

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict]) -> Dict[str, float]:
        """Metrics on held-out batches (`train.eval_every`)."""
        return {}


def check_size(size, multiple: int, why: str) -> None:
    """A ValueError naming `data.size` when its height or width is not a multiple of `multiple`."""
    if any(int(s) % multiple for s in size):
        raise ValueError(f"data.size {list(size)} must be divisible by {multiple} ({why}): e.g. "
                         f"{[max(multiple, round(int(s) / multiple) * multiple) for s in size]}")
