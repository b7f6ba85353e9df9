"""First-frame prompts: the reasoning step of Factorized Video Generation.

A rewriter turns a video prompt into a description of its first frame only (what a text-to-image
model can draw: the scene, without the motion); the first frame is drawn from the rewritten
prompt, the keyframes from the original one.

    rewriter = build_rewriter("shapesworld")        # or "identity", or "llm:/path/to/model"
    first_frame_prompts = rewriter(["a red circle moving left quickly on a white background"])
    # -> ["a red circle on a white background"]

- `identity` (the default): the prompt as it is.
- `shapesworld`: a ShapesWorld caption (kvideo.data.shapesworld.parse_caption, paraphrases
  included) becomes "a {color} {shape} on a {background} background"; any other prompt is kept.
- `llm:PATH`: a local causal language model (transformers, an optional extra: pip install
  kvideo[llm]) completes a prompt template; greedy decoding, at most `max_new_tokens`, the first
  line of the answer; an empty answer falls back to the original prompt.

`describe()` is what the pipeline records in each video's settings JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

DEFAULT_TEMPLATE = ("Describe only the first frame of this video, as a still image, in one sentence, "
                    "without any motion.\nVideo: {prompt}\nFirst frame:")


class IdentityRewriter:
    def __call__(self, prompts: Sequence[str]) -> List[str]:
        return list(prompts)

    def describe(self) -> dict:
        return {"kind": "identity"}


class ShapesWorldRewriter:
    """A ShapesWorld caption without its motion: the scene the first frame shows."""

    def rewrite(self, prompt: str) -> str:
        from kvideo.data.shapesworld import parse_caption

        try:
            a = parse_caption(prompt)
        except ValueError:
            return prompt  # not a ShapesWorld caption: nothing to remove
        return f"a {a['color']} {a['shape']} on a {a['background']} background"

    def __call__(self, prompts: Sequence[str]) -> List[str]:
        return [self.rewrite(p) for p in prompts]

    def describe(self) -> dict:
        return {"kind": "shapesworld"}


class LLMRewriter:
    """A local causal language model (a transformers checkpoint directory) completing `template`
    (which holds `{prompt}`), greedily, for at most `max_new_tokens` tokens."""

    def __init__(self, path, template: str = DEFAULT_TEMPLATE, max_new_tokens: int = 64, device: str = "cpu") -> None:
        if "{prompt}" not in template:
            raise ValueError(f"rewriter template must contain {{prompt}}; got {template!r}")
        if max_new_tokens < 1:
            raise ValueError(f"rewriter max_new_tokens must be >= 1; got {max_new_tokens}")
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"LLM rewriter: '{path}' is not a model directory (a transformers checkpoint, "
                                    "read locally; nothing is downloaded)")
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise ImportError("the LLM rewriter needs transformers: pip install 'kvideo[llm]'") from e
        self.path, self.template, self.max_new_tokens, self.device = path, template, max_new_tokens, device
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()

    def rewrite(self, prompt: str) -> str:
        import torch

        inputs = self.tokenizer(self.template.format(prompt=prompt), return_tensors="pt").to(self.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad)
        answer = self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
        return lines[0] if lines else prompt  # nothing said: the original prompt

    def __call__(self, prompts: Sequence[str]) -> List[str]:
        return [self.rewrite(p) for p in prompts]

    def describe(self) -> dict:
        return {"kind": "llm", "path": str(self.path), "template": self.template,
                "max_new_tokens": self.max_new_tokens}


def build_rewriter(spec: str = "identity", **llm_options):
    """`identity`, `shapesworld` or `llm:PATH` (with `llm_options`: template, max_new_tokens, device)."""
    if spec in (None, "", "identity"):
        return IdentityRewriter()
    if spec == "shapesworld":
        return ShapesWorldRewriter()
    if spec.startswith("llm:"):
        return LLMRewriter(spec[len("llm:"):], **llm_options)
    raise ValueError(f"unknown first-frame rewriter {spec!r}: identity, shapesworld or llm:PATH")
