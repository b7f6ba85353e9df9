"""A T5 text tower (`recipe.text_encoder.kind: t5`): Kandinsky 3's and Kandinsky Video's text
encoder, the encoder of Flan-UL2 (d_model 4096), with the release's 128-token limit.

    prompts: list[str]
      -> the checkpoint's tokenizer: [pieces..., </s>, <pad>, ...]        ids (b, n), n = context_length (128)
      -> T5 encoder stack (bidirectional, padding masked out; the release's `.encoder`)           hidden (b, n, d_model) per token
      -> projection Linear(d_model, out_dim) + LayerNorm(out_dim), padding zeroed
                                                                        tokens (b, n, out_dim), mask (b, n)

The release's projection has no bias (`projection_bias: false`). The mask is the tokenizer's
attention mask: True on the pieces and the end token, False on padding (T5's pad id never
occurs in a text). The null context is the shared one (kvideo.models.text_encoder.ProjectedText).

The network reads no file: `T5TextEncoder(cfg, t5_config, tokenizer)` builds a randomly
initialised tower of `t5_config` (a `transformers.T5Config`) with the tokenizer it is handed;
`kvideo.weights.build_text_encoder` reads both from the local directory `cfg.weights` and hands it
the tower loaded from there. `transformers` is an optional extra (`pip install kvideo[llm]`).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
from torch import nn

from kvideo.models.text_encoder import ProjectedText, TextEncoderConfig

RELEASE_CONTEXT_LENGTH = 128  # Kandinsky 3 / Kandinsky Video's T5 token limit


class T5TextEncoder(ProjectedText):
    """prompts -> (tokens (b, n, out_dim), mask (b, n) bool), n = context_length (default 128)."""

    def __init__(self, cfg: TextEncoderConfig, t5_config: Any, tokenizer: Any, tower: Optional[nn.Module] = None):
        """`tower`: a loaded T5 encoder stack (`T5EncoderModel.encoder`) of `t5_config` to use
        instead of a random one."""
        super().__init__()
        try:
            from transformers import T5EncoderModel
        except ImportError as e:  # pragma: no cover - the extra is installed with [dev]
            raise ImportError("text encoder kind t5 needs transformers: pip install 'kvideo[llm]'") from e
        if cfg.kind != "t5":
            raise ValueError(f"T5TextEncoder needs text encoder kind t5, got {cfg.kind!r}")
        self.cfg = cfg
        self.context_length = cfg.context_length or RELEASE_CONTEXT_LENGTH
        if self.context_length < 2:
            raise ValueError(f"context_length {self.context_length} leaves no room for a token before </s>")
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the T5 tokenizer must have a pad and an eos (</s>) token")
        # the encoder stack alone, as the release keeps it (`T5EncoderModel(...).encoder`): the
        # model's `shared` embedding is the stack's `embed_tokens`, one tensor under two names,
        # which a safetensors checkpoint cannot hold
        self.tower = tower if tower is not None else T5EncoderModel(t5_config).encoder
        self.tokenizer = tokenizer
        self.init_projection(t5_config.d_model)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """prompts -> ids (b, context_length) long: the pieces, </s>, then padding (right)."""
        self.check_prompts(prompts)
        prompts = list(prompts)
        self.too_long([len(ids) for ids in self.tokenizer(prompts)["input_ids"]], prompts)
        return self.tokenizer(prompts, max_length=self.context_length, padding="max_length", truncation=True,
                              return_tensors="pt")["input_ids"]

    def token_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (b, n) -> mask (b, n) bool: True except on padding."""
        return ids != self.tokenizer.pad_token_id

    def encode_hidden(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """ids (b, n) -> (hidden (b, n, d_model): the encoder's last hidden state, mask (b, n))."""
        ids = ids.to(self.tower.embed_tokens.weight.device)
        mask = self.token_mask(ids)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.frozen):
            hidden = self.tower(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return hidden, mask
