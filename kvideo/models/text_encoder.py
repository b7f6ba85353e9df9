"""Text encoder: an open_clip text tower, a trainable projection and a learned null embedding.

    prompts: list[str]
      -> open_clip SimpleTokenizer: [sot, bpe..., eot, 0, 0, ...]          ids (b, n), n = context_length
      -> text tower (token + position embedding, causal transformer, ln_final)
                                                                        hidden (b, n, width)  per token
      -> projection Linear(width, out_dim) + LayerNorm(out_dim), padding zeroed
                                                                        tokens (b, n, out_dim), mask (b, n)

Kandinsky 3 uses the Flan-UL2 encoder (4096-d, 128 tokens) followed by a trained
Linear + LayerNorm: `kind: t5` (kvideo.models.t5_text) is that tower; the default, `kind:
open_clip`, an open_clip text tower in its place. Both share `ProjectedText`: the projection, the
padding zeroed, the null context, the frozen tower's modes. The UNet attends to
every token, so the encoder returns the per-token hidden states after the tower's final
LayerNorm (not the pooled, projected CLIP embedding; the tower's own `text_projection` is kept
only so that open_clip checkpoints load as they are, and is never used). The mask is True from
the start token to the end token inclusive and False on padding.

The unconditional context (classifier-free guidance, caption dropout) follows the release: a
learned `null_embedding` (1, out_dim) at token 0, zeros elsewhere, and a mask that is True at
token 0 only. An empty prompt is a ValueError, never a silent unconditional: the guidance branch
asks for `null_context(b)` by name, so a missing caption in the data cannot turn into it.

The tower is usually frozen: its parameters get no gradients, it stays in eval mode whatever
`train()` says, and it runs under `torch.no_grad()`. The projection and the null embedding are
trained with the diffusion model.

Weights are never downloaded: `arch` only names an open_clip architecture, `weights` is a local
file. The network reads no file: `TextEncoder(cfg)` is randomly initialised whatever
`cfg.weights` says, and `kvideo.weights.build_text_encoder(cfg)` builds it and loads the tower
from `cfg.weights`. The BPE vocabulary ships inside the open_clip package.

Sections: config, encoder, named sizes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from open_clip.factory import get_model_config
from open_clip.model import CLIPTextCfg, _build_text_tower
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from kvideo.models.sizes import sized_config

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

# The "tiny" architecture: a randomly initialised tower for ShapesWorld and the tests.
TINY_TEXT_TOWER = dict(width=64, layers=2, heads=2)


@dataclass
class TextEncoderConfig:
    """Text tower, tokenisation and projection. The defaults are the tiny ShapesWorld encoder."""

    arch: str = "tiny"  # an open_clip model name ("ViT-H-14", "ViT-B-32") or "tiny"
    weights: Optional[str] = None  # local open_clip checkpoint, read by kvideo.weights; None = random init
    context_length: Optional[int] = 32  # tokens per prompt incl. sot/eot; None = the arch's (77)
    frozen: bool = True  # tower: no grads, always eval, run under no_grad
    out_dim: int = 64  # the UNet's context size
    truncate: bool = True  # too-long prompts: warn and truncate (True) or ValueError (False)
    # "open_clip": the tower `arch` names; "t5": a transformers T5 encoder whose config, tokenizer
    # and weights `weights` (a local directory) holds (kvideo.models.t5_text; the `llm` extra)
    kind: str = "open_clip"
    projection_bias: bool = True  # the projection Linear's bias (the release's T5 projection has none)
    # Cut a batch's tokens to its longest prompt plus one padding token, as Kandinsky 3 and
    # Kandinsky Video do (False: always context_length tokens). The attention ignores padding either
    # way; a UNet with `pool_query: all` averages it, so its pooled text depends on the length.
    trim_context: bool = False
    # The seed of a randomly initialised tower (no `weights`). A frozen random tower stands in for a
    # pretrained encoder, which is the same whatever the training seed; drawn from the training
    # seed, how far apart it keeps the words varies from tower to tower (tools/probe_text_conditioning.py).
    # None: from the global random state, as every other weight.
    init_seed: Optional[int] = None


def _tower_cfg(cfg: TextEncoderConfig) -> Tuple[CLIPTextCfg, bool]:
    """The open_clip text config of `cfg.arch` and whether it uses QuickGELU."""
    if cfg.arch == "tiny":
        return CLIPTextCfg(context_length=cfg.context_length or 77, **TINY_TEXT_TOWER), False
    if ":" in cfg.arch:
        raise ValueError(f"text encoder arch {cfg.arch!r}: hub / schema names are not allowed, "
                         "name a built-in open_clip architecture and pass a local `weights` file")
    model_cfg = get_model_config(cfg.arch)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip architecture {cfg.arch!r}")
    text_cfg = CLIPTextCfg(**model_cfg["text_cfg"])
    if text_cfg.hf_model_name:
        raise ValueError(f"{cfg.arch!r} has a Hugging Face text tower ({text_cfg.hf_model_name}), "
                         "which open_clip would download; only open_clip TextTransformer towers are supported")
    return text_cfg, bool(model_cfg.get("quick_gelu", False))


# ----------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------


class ProjectedText(nn.Module):
    """What every text encoder shares: a tower's per-token hidden states (`encode_hidden`, from
    the ids of `tokenize`) through the trained projection (Linear + LayerNorm, padding zeroed),
    and the learned null context. A subclass builds `self.tower`, `self.context_length` and
    then `init_projection(width)`."""

    cfg: TextEncoderConfig
    tower: nn.Module
    context_length: int

    def init_projection(self, width: int) -> None:
        self.width = width
        self.proj = nn.Linear(width, self.cfg.out_dim, bias=self.cfg.projection_bias)
        self.norm = nn.LayerNorm(self.cfg.out_dim)
        # Unit scale, like the LayerNorm'd tokens it stands in for.
        self.null_embedding = nn.Parameter(torch.randn(1, self.cfg.out_dim))
        if self.cfg.frozen:
            self.tower.requires_grad_(False)
            self.tower.eval()

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def encode_hidden(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # -- modes ---------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> "ProjectedText":
        super().train(mode)
        if self.cfg.frozen:
            self.tower.eval()  # a frozen tower never enters train mode (no dropout, fixed outputs)
        return self

    # -- prompts ---------------------------------------------------------------------------------

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """A list of strings, none empty."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, got a single string")
        empty = [i for i, p in enumerate(prompts) if not p.strip()]
        if empty:
            raise ValueError(f"empty prompt(s) at batch index {empty[:8]}: an empty prompt is not the unconditional "
                             "context; use TextEncoder.null_context(batch_size) for the guidance / dropout branch")

    def too_long(self, lengths: Sequence[int], prompts: Sequence[str]) -> None:
        """Token counts (with the special tokens) over the context length: warn, or raise when
        `truncate` is off."""
        n = self.context_length
        over = [i for i, length in enumerate(lengths) if length > n]
        if not over:
            return
        if not self.cfg.truncate:
            i = over[0]
            raise ValueError(f"prompt {i} has {lengths[i]} tokens (with the special tokens), more than the context "
                             f"length {n}; shorten it or set truncate=True: {prompts[i][:80]!r}")
        warnings.warn(f"{len(over)} of {len(prompts)} prompts exceed the context length {n} "
                      f"(up to {max(lengths)} tokens) and were truncated", stacklevel=4)

    # -- encoding --------------------------------------------------------------------------------

    def project(self, hidden: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(hidden (b, n, width), mask) -> (tokens (b, n, out_dim), mask); padding tokens are zero."""
        hidden = hidden.to(self.proj.weight)
        mask = mask.to(hidden.device)
        tokens = self.norm(self.proj(hidden)) * mask[..., None]  # (b, n, out_dim)
        return tokens, mask

    def encode_tokens(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Precomputed ids (b, n) -> (tokens (b, n, out_dim), mask (b, n))."""
        return self.project(*self.encode_hidden(ids))

    def forward(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (tokens (b, n, out_dim), mask (b, n) bool): n = context_length, or with
        `trim_context` the longest prompt's tokens plus one."""
        tokens, mask = self.encode_tokens(self.tokenize(prompts))
        if self.cfg.trim_context:
            n = min(int(mask.sum(dim=1).max()) + 1, mask.shape[1])
            tokens, mask = tokens[:, :n], mask[:, :n]
        return tokens, mask

    def null_context(self, batch_size: int, num_tokens: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The unconditional context: null_embedding at token 0, zeros after; mask True at token 0 only.
        num_tokens defaults to context_length, so it concatenates with `forward`'s output."""
        n = num_tokens or self.context_length
        tokens = torch.zeros(batch_size, n, self.cfg.out_dim, device=self.null_embedding.device, dtype=self.null_embedding.dtype)
        tokens[:, 0] = self.null_embedding[0]  # (b, n, out_dim); differentiable w.r.t. null_embedding
        mask = torch.zeros(batch_size, n, dtype=torch.bool, device=tokens.device)
        mask[:, 0] = True
        return tokens, mask


class TextEncoder(ProjectedText):
    """An open_clip text tower: prompts -> (tokens (b, n, out_dim), mask (b, n) bool),
    n = context_length."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        if cfg.kind != "open_clip":
            raise ValueError(f"TextEncoder is the open_clip tower; text encoder kind {cfg.kind!r} is built by "
                             "kvideo.weights.build_text_encoder")
        self.cfg = cfg
        text_cfg, quick_gelu = _tower_cfg(cfg)
        self.context_length = cfg.context_length or text_cfg.context_length
        if self.context_length > text_cfg.context_length:
            raise ValueError(f"context_length {self.context_length} exceeds the {text_cfg.context_length} "
                             f"positions of the {cfg.arch!r} text tower")
        if self.context_length < 3:
            raise ValueError(f"context_length {self.context_length} leaves no room for a token between sot and eot")
        # embed_dim only sizes the tower's pooled projection, which is kept for checkpoint
        # compatibility and never used.
        with torch.random.fork_rng(devices=[], enabled=cfg.init_seed is not None):
            if cfg.init_seed is not None:
                torch.manual_seed(cfg.init_seed)
            self.tower = _build_text_tower(text_cfg.width, text_cfg, quick_gelu=quick_gelu)
        self.tokenizer = SimpleTokenizer(context_length=self.context_length)
        if self.tokenizer.vocab_size > text_cfg.vocab_size:
            raise ValueError(f"tokenizer vocabulary ({self.tokenizer.vocab_size}) exceeds the tower's ({text_cfg.vocab_size})")
        self.init_projection(text_cfg.width)

    # -- tokenisation ----------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """prompts -> ids (b, context_length) long: [sot, bpe..., eot] then zeros."""
        self.check_prompts(prompts)
        sot, eot, n = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id, self.context_length
        bodies = [self.tokenizer.encode(prompt) for prompt in prompts]
        self.too_long([len(body) + 2 for body in bodies], prompts)
        ids = torch.zeros(len(prompts), n, dtype=torch.long)
        for i, body in enumerate(bodies):
            row = [sot, *body[: n - 2], eot]  # keep room for the eot token
            ids[i, : len(row)] = torch.tensor(row)
        return ids

    def token_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (b, n) -> mask (b, n) bool, True from sot to the first eot inclusive."""
        is_eot = ids == self.tokenizer.eot_token_id
        if not bool(is_eot.any(dim=1).all()):
            raise ValueError("every row of token ids must contain an eot token")
        last = is_eot.int().argmax(dim=1)  # first eot per row
        return torch.arange(ids.shape[1], device=ids.device)[None] <= last[:, None]

    # -- encoding --------------------------------------------------------------------------------

    def encode_hidden(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """ids (b, n) -> (hidden (b, n, width) after the tower's ln_final, mask (b, n)).

        The tower's causal attention means a token never sees the padding after it, so
        truncating n to the longest prompt would not change the real tokens."""
        ids = ids.to(self.tower.token_embedding.weight.device)
        n = ids.shape[1]
        if n > self.tower.positional_embedding.shape[0]:
            raise ValueError(f"{n} tokens exceed the tower's {self.tower.positional_embedding.shape[0]} positions")
        mask = self.token_mask(ids)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.frozen):
            t = self.tower
            x = t.token_embedding(ids) + t.positional_embedding[:n]  # (b, n, width)
            attn_mask = t.attn_mask[:n, :n] if t.attn_mask is not None else None
            x = t.transformer(x, attn_mask=attn_mask)  # (b, n, width), batch first
            x = t.ln_final(x)
        return x, mask


# ----------------------------------------------------------------------------------------------
# Named sizes
# ----------------------------------------------------------------------------------------------

TEXT_ENCODER_SIZES: Dict[str, TextEncoderConfig] = {
    # Random 2-layer, 64-wide tower for ShapesWorld captions (3.3M parameters, mostly the
    # 49408-token embedding table).
    "tiny": TextEncoderConfig(),
    # OpenCLIP ViT-H-14 text tower: 24 layers, 1024 wide, 77 tokens, ~354M parameters; projected
    # to the Kandinsky 3 context size 4096.
    "clip-vit-h-14": TextEncoderConfig(arch="ViT-H-14", context_length=None, out_dim=4096),
    # CLIP ViT-B-32 text tower: 12 layers, 512 wide, 77 tokens, ~63M parameters.
    "clip-vit-b-32": TextEncoderConfig(arch="ViT-B-32", context_length=None, out_dim=4096),
}


def text_encoder_config(size: str, **overrides) -> TextEncoderConfig:
    """A fresh copy of the named size `size`, with fields replaced by `overrides`."""
    return sized_config(TEXT_ENCODER_SIZES, size, **overrides)
