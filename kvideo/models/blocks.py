"""The blocks of kvideo's networks: the units that data parallelism shards (each an FSDP unit in
`kvideo.train.parallel`, beside the GAN discriminator), activation checkpointing recomputes, and
torch.compile compiles one at a time.

A block is a module the network calls through its forward (a block whose parameters were used
without its forward would never be gathered by FSDP): the UNet's ResNet and attention blocks, its
gated identity attention (its gate with the attention block inside), the temporal blocks and the
MoVQ's blocks.
"""

from __future__ import annotations

from typing import List, Tuple, Type

import torch
from torch import nn

from kvideo.models import identity, interpolation_unet, movq, temporal_layers, unet_blocks, video_movq

BLOCKS = (
    unet_blocks.ResNetBlock, unet_blocks.AttentionBlock, identity.IdentityAttention,
    temporal_layers.TemporalResNetBlock, temporal_layers.TemporalAttentionBlock,
    temporal_layers.FirstFrameAttentionBlock, temporal_layers.InsideTemporal,
    interpolation_unet.GatedTemporalAttention,
    movq.ResnetBlock, movq.AttnBlock, video_movq.TemporalAttnBlock,
)


def blocks(module: nn.Module, kinds: Tuple[Type[nn.Module], ...] = BLOCKS) -> List[nn.Module]:
    """The modules of `kinds` inside `module` (not `module` itself), innermost first (fully_shard's
    order)."""
    return [m for m in reversed(list(module.modules())) if isinstance(m, kinds) and m is not module]


def compile_blocks(model: nn.Module) -> int:
    """`torch.compile` every block of `model` in place (`nn.Module.compile`: the parameter names and
    so the checkpoint keys do not change); returns how many. For training, after FSDP's wrapping,
    as FSDP2 wants; for sampling, on the loaded network."""
    found = blocks(model)
    # Static shapes: inductor failed on this UNet's dynamic-shape graphs (a symbolic size it could
    # not order). Blocks of one class share their code, so each instance and shape is a
    # recompilation of it: the limit is raised to the block count, past which dynamo would run
    # the rest eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(found))
    for block in found:
        block.compile(dynamic=False)
    return len(found)
