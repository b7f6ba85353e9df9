"""The text-conditioned denoiser that all three diffusion stages train: a UNet and a text encoder.

    denoiser = build_denoiser(cfg)               # cfg.model names the UNet, cfg.recipe.text_encoder the text
    prediction = denoiser(x_t, t, condition)     # kvideo.inference.conditioning

The first-frame stage pairs it with an image UNet, the keyframe stage with a video UNet, the
interpolation stage with the gap-stacked interpolation UNet; the condition decides the call.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig
from torch import nn

from kvideo.diffusion import LossSpec, Schedule
from kvideo.inference.conditioning import TextContext, call_network
from kvideo.models.text_encoder import TextEncoder, TextEncoderConfig
from kvideo.registry import MODELS, model_config
from kvideo.weights import build_text_encoder


class TextDenoiser(nn.Module):
    """The UNet and the text encoder, as trained and checkpointed (`unet.*`, `text.*`).

    forward(x_t, t, condition) -> prediction: the network call of the condition's kind.
    """

    def __init__(self, unet: nn.Module, text: TextEncoder):
        super().__init__()
        self.unet = unet
        self.text = text

    def context(self, prompts: Sequence[Optional[str]], drop: Optional[torch.Tensor] = None) -> TextContext:
        """The prompts' tokens; rows where `drop` (b,) is True, and blank or None prompts (nothing to
        condition on), get the null context."""
        blank = [not (isinstance(p, str) and p.strip()) for p in prompts]
        tokens, mask = self._tokens_with_blanks(prompts, blank) if any(blank) else self.text(list(prompts))
        if drop is not None:  # even when nothing is dropped: the null context stays in the graph, so
            # under DDP its parameters get their (zero) gradient on every rank every step
            null_tokens, null_mask = self.text.null_context(len(prompts), tokens.shape[1])
            keep = ~drop.to(tokens.device)
            tokens = torch.where(keep[:, None, None], tokens, null_tokens)
            mask = torch.where(keep[:, None], mask, null_mask)
        return TextContext(tokens, mask)

    def _tokens_with_blanks(self, prompts, blank: List[bool]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The text tower's (tokens, mask) with the null context in the blank rows."""
        rows = [i for i, b in enumerate(blank) if not b]
        encoded = self.text([prompts[i] for i in rows]) if rows else None
        tokens, mask = self.text.null_context(len(prompts), None if encoded is None else encoded[0].shape[1])
        if encoded is not None:
            tokens, mask = tokens.clone(), mask.clone()
            tokens[rows], mask[rows] = encoded[0].to(tokens.dtype), encoded[1]
        return tokens, mask

    def unconditional_context(self, b: int, negative_prompt: Optional[str] = None,
                              num_tokens: Optional[int] = None) -> TextContext:
        """What guidance pushes away from: the null context (of `num_tokens` tokens, default the
        text encoder's length), or the context of `negative_prompt`."""
        if negative_prompt:
            return self.context([negative_prompt] * b)
        return TextContext(*self.text.null_context(b, num_tokens))

    def guidance_contexts(self, prompts: Sequence[Optional[str]],
                          negative_prompt: Optional[str] = None) -> Tuple[TextContext, TextContext]:
        """(the prompts' context, the unconditional one) of one length, as guidance batches them: the
        null context as long as the prompts' (with `trim_context` that length varies), a negative
        prompt's context and the prompts' padded to the longer of the two."""
        cond = self.context(prompts)
        uncond = self.unconditional_context(len(prompts), negative_prompt, cond.tokens.shape[1])
        n = max(cond.tokens.shape[1], uncond.tokens.shape[1])
        return cond.padded(n), uncond.padded(n)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        return call_network(self, x_t, t, cond)

    def set_grad_checkpointing(self, enabled: bool) -> None:
        self.unet.set_grad_checkpointing(enabled)


def build_denoiser(cfg: DictConfig) -> TextDenoiser:
    """The UNet named by `cfg.model` and the text encoder of `cfg.recipe.text_encoder`, randomly
    initialised (or the text tower from its local weights file)."""
    unet_cfg = model_config(cfg)
    text_cfg = TextEncoderConfig(**{k: cfg.recipe.text_encoder[k] for k in TextEncoderConfig.__dataclass_fields__})
    if text_cfg.out_dim != unet_cfg.context_dim:
        raise ValueError(f"recipe.text_encoder.out_dim ({text_cfg.out_dim}) must equal model.context_dim "
                         f"({unet_cfg.context_dim}): the UNet attends to the projected text tokens")
    return TextDenoiser(MODELS[cfg.model.name].build(unet_cfg), build_text_encoder(text_cfg))


def make_schedule(diffusion_cfg) -> Schedule:
    """The noise schedule of a recipe's `diffusion` section."""
    return Schedule.from_name(diffusion_cfg.schedule, diffusion_cfg.num_steps,
                              zero_terminal_snr=diffusion_cfg.zero_terminal_snr)


def loss_spec(diffusion_cfg) -> LossSpec:
    """The training loss a recipe's `diffusion` section sets (target, weighting, timestep shift)."""
    return LossSpec(target=diffusion_cfg.target, weighting=diffusion_cfg.weighting,
                    min_snr_gamma=diffusion_cfg.min_snr_gamma, timestep_shift=diffusion_cfg.timestep_shift)
