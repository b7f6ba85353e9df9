"""Exponential moving average of a model's weights."""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn


class EMA:
    """Float32 shadow copies of every trainable parameter, updated after each optimizer step.

    A frozen parameter (a pretrained text tower, the video decoder's encoder) is its own average
    and is not shadowed: at full size that would be gigabytes of memory and of every checkpoint's
    ema.safetensors, which therefore holds only the trainable parameters and the buffers
    (`kvideo.train.checkpoint.load_weights` lays it over model.safetensors). Which parameters are
    trainable is read once, here: build the EMA after the stage has frozen what it freezes.
    Persistent buffers (e.g. codebook usage counts) are copied, not averaged; non-persistent ones
    (e.g. a causal attention mask) are not part of the weights and are left out. With `warmup`, the decay of
    the n-th update is min(decay, (1 + n) / (10 + n)) so early averages are not dominated by
    the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.params = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        persistent = set(model.state_dict())
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers() if n in persistent}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        params = dict(model.named_parameters())
        for name, shadow in self.params.items():
            shadow.lerp_(params[name].detach().float(), 1.0 - d)
        for name, b in model.named_buffers():
            if name in self.buffers:
                self.buffers[name].copy_(b)
        self.num_updates += 1

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """EMA weights of the trainable parameters and the buffers, under the model's own keys."""
        return {**self.params, **self.buffers}

    def load_state_dict(self, state: Dict[str, torch.Tensor], num_updates: int) -> None:
        """From a full state dict (`load_weights(..., "ema")`, the EMA over the model's weights)."""
        for name in self.params:
            self.params[name].copy_(state[name])
        for name in self.buffers:
            self.buffers[name].copy_(state[name])
        self.num_updates = num_updates

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the EMA weights into `model` (e.g. a copy used for previews); frozen ones stay."""
        target = model.state_dict()
        target.update({k: v.to(dtype=target[k].dtype) for k, v in self.state_dict().items()})
        model.load_state_dict(target)
