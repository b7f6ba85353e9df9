"""The text-conditioned denoiser that all three diffusion stages train: a UNet and a text encoder.

    denoiser = build_denoiser(cfg)               # cfg.model names the UNet, cfg.recipe.text_encoder the text
    prediction = denoiser(x_t, t, condition)     # kvideo.inference.conditioning

The first-frame stage pairs it with an image UNet, the keyframe stage with a video UNet, the
interpolation stage with the gap-stacked interpolation UNet; the condition decides the call.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig
from torch import nn

from kvideo.diffusion import LossSpec, Schedule
from kvideo.inference.conditioning import TextContext, call_network
from kvideo.models.identity import ReferenceEncoder, reference_encoder_config
from kvideo.models.text_encoder import TextEncoder, TextEncoderConfig
from kvideo.registry import MODELS, model_config
from kvideo.weights import build_text_encoder


class TextDenoiser(nn.Module):
    """The UNet and the text encoder, as trained and checkpointed (`unet.*`, `text.*`), and with
    identity attention the reference encoder that makes its identity tokens (`reference.*`).

    forward(x_t, t, condition) -> prediction: the network call of the condition's kind.
    """

    def __init__(self, unet: nn.Module, text: TextEncoder, reference: Optional[ReferenceEncoder] = None):
        super().__init__()
        self.unet = unet
        self.text = text
        self.reference = reference

    def identity_parameters(self) -> Iterator[nn.Parameter]:
        """What reference conditioning adds: the reference encoder and the UNet's identity attentions."""
        if self.reference is not None:
            yield from self.reference.parameters()
        yield from self.unet.identity_parameters()

    def name_embeddings(self, names: Sequence[Sequence[str]]) -> torch.Tensor:
        """(b, r, d): each name's text tokens averaged over their mask, the tags of a clip's
        reference entries (`References.names`); zeros for a blank name. Each distinct name is
        encoded once."""
        flat = sorted({n for row in names for n in row if n and n.strip()})
        if not flat:
            return torch.zeros(len(names), max((len(row) for row in names), default=0), self.text.cfg.out_dim,
                               device=next(self.parameters()).device)
        tokens, mask = self.text(flat)
        m = mask.to(tokens.dtype)[..., None]
        pooled = (tokens * m).sum(1) / m.sum(1).clamp(min=1)  # (names, d)
        table = torch.cat([torch.zeros_like(pooled[:1]), pooled])  # row 0: a blank name
        position = {n: i + 1 for i, n in enumerate(flat)}
        index = torch.tensor([[position.get(n, 0) for n in row] for row in names],
                             dtype=torch.long, device=pooled.device)
        return table[index]

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
    unet = MODELS[cfg.model.name].build(unet_cfg)
    return TextDenoiser(unet, build_text_encoder(text_cfg), build_reference_encoder(cfg, unet_cfg, text_cfg))


def build_reference_encoder(cfg: DictConfig, unet_cfg, text_cfg: TextEncoderConfig) -> Optional[ReferenceEncoder]:
    """The reference encoder of a UNet with identity attention (`recipe.identity.encoder`, its
    latent channels the UNet's output's, its tokens the UNet's identity width, name tags as wide
    as the text tokens when `recipe.identity.names`); None without identity attention."""
    if not any(getattr(unet_cfg, "identity_attention", None) or ()):
        return None
    identity = cfg.recipe.get("identity")
    if identity is None:
        raise ValueError(f"model.identity_attention is set, but stage {cfg.stage}'s recipe has no identity section")
    try:
        encoder_cfg = reference_encoder_config(identity.encoder, latent_channels=unet_cfg.out_channels,
                                               token_dim=unet_cfg.identity_dim or unet_cfg.context_dim,
                                               name_dim=text_cfg.out_dim if identity.names else 0)
    except KeyError as e:
        raise ValueError(f"recipe.identity.encoder: {e.args[0]}") from None
    return ReferenceEncoder(encoder_cfg)


def make_schedule(diffusion_cfg) -> Schedule:
    """The noise schedule of a recipe's `diffusion` section."""
    return Schedule.from_name(diffusion_cfg.schedule, diffusion_cfg.num_steps,
                              zero_terminal_snr=diffusion_cfg.zero_terminal_snr)


def loss_spec(diffusion_cfg) -> LossSpec:
    """The training loss a recipe's `diffusion` section sets (target, weighting, timestep shift)."""
    return LossSpec(target=diffusion_cfg.target, weighting=diffusion_cfg.weighting,
                    min_snr_gamma=diffusion_cfg.min_snr_gamma, timestep_shift=diffusion_cfg.timestep_shift)
