"""CLIPSIM and CLIP-Temp with open_clip and a local weights file.

    clip = load_clip("ViT-B-32", "open_clip_pytorch_model.bin")  # any open_clip arch and its file
    embeddings = clip.frame_embeddings(frames)    # uint8 (t, h, w, 3) -> (t, d), unit norm
    text = clip.text_embeddings(["a red circle moving left"])   # (1, d), unit norm
    clipsim(embeddings, text[0]), clip_temp(embeddings)

CLIPSIM (Wu et al., GODIVA; the MSR-VTT tables of the text-to-video papers) is the mean over a
video's frames of the cosine between the frame's CLIP image embedding and the prompt's text
embedding, with ViT-B/32 by default. It is reported here as a cosine (0.2-0.35 for real
captioned video with ViT-B/32); papers that print "CLIPSIM 29.5" multiply by 100. It is not
torchmetrics' CLIPScore, which is 100 * max(cosine, 0). CLIP-Temp is the mean cosine between
consecutive frames' image embeddings (EvalCrafter's temporal consistency).

Frames are preprocessed exactly as open_clip's evaluation transform does (PIL images: resize of
the short side with the model's interpolation, centre crop, normalisation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image


class CLIPScorer:
    """An open_clip model, its evaluation transform and tokenizer, on one device."""

    def __init__(self, model, preprocess, tokenizer, device: torch.device) -> None:
        self.model, self.preprocess, self.tokenizer, self.device = model, preprocess, tokenizer, device

    @torch.no_grad()
    def frame_embeddings(self, frames: np.ndarray, batch_size: int = 32) -> torch.Tensor:
        """uint8 frames (t, h, w, 3) -> unit-norm image embeddings (t, d), float32 on the CPU."""
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frame_embeddings: frames must be uint8 (t, h, w, 3); got {frames.dtype} {frames.shape}")
        out = []
        for i in range(0, len(frames), batch_size):
            batch = torch.stack([self.preprocess(Image.fromarray(f)) for f in frames[i:i + batch_size]])
            out.append(self.model.encode_image(batch.to(self.device)).float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1).cpu()

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> unit-norm text embeddings (n, d), float32 on the CPU."""
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()


def load_clip(arch: str, path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> CLIPScorer:
    """open_clip's `arch` (e.g. ViT-B-32) with the weights of the local file `path`."""
    import open_clip

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP weights {str(path)!r} not found (an open_clip checkpoint for {arch}; "
                                f"pass --clip ARCH:FILE)")
    if arch not in open_clip.list_models():
        raise ValueError(f"--clip: {arch!r} is not an open_clip architecture (e.g. ViT-B-32)")
    device = torch.device(device)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(path), device=device)
    return CLIPScorer(model.eval(), preprocess, open_clip.get_tokenizer(arch), device)


def clipsim(frame_embeddings: torch.Tensor, text_embedding: torch.Tensor) -> float:
    """Mean cosine between each frame's embedding (t, d) and the prompt's (d,), both unit norm."""
    return float((frame_embeddings @ text_embedding).mean())


def clip_temp(frame_embeddings: torch.Tensor) -> float:
    """Mean cosine between consecutive frames' unit-norm embeddings (t, d); t >= 2."""
    if frame_embeddings.shape[0] < 2:
        raise ValueError("clip_temp needs at least 2 frames")
    return float((frame_embeddings[1:] * frame_embeddings[:-1]).sum(-1).mean())
