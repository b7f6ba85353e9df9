"""Where a clip's caption comes from: a captions file, a sidecar, or a captioner plug-in.

In order of precedence, for each source video:

1. `captions.file` (the `--captions` flag): a CSV with a header naming a path column (`path`,
   `source` or `video`) and a caption column (`caption` or `text`), or a JSONL file of objects
   with the same keys. Relative paths are relative to the captions file's directory.
2. `captions.sidecar`: `VIDEO.txt` beside `VIDEO.mp4`.
3. `captions.captioner`: a registered `Captioner`, called once per clip with its frames.

A source with none of these (and `captions.allow_empty` false) is rejected as `no_caption`
before it is decoded; a clip the captioner returns nothing for is rejected as `no_caption`.

Captioners are named in `CAPTIONERS` (no import strings in YAML). Each is built once per worker
process from the whole prepare config; `check(cfg)` runs first in the main process, so a missing
weights file stops the run at start-up with the config key in the message.
"""

from __future__ import annotations

import csv
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Dict, Optional

import numpy as np

from kvideo.config import ConfigError

__all__ = ["ClipContext", "Captioner", "CocaCaptioner", "ShapesWorldCaptioner", "CAPTIONERS",
           "load_caption_table", "sidecar_caption", "CaptionFileError"]

PATH_COLUMNS = ("path", "source", "video")
CAPTION_COLUMNS = ("caption", "text")


class CaptionFileError(ValueError):
    """A captions file that cannot be read; the message names the file and line."""


# ----------------------------------------------------------------------------------------------
# Captions that exist before the video is decoded
# ----------------------------------------------------------------------------------------------


def _pick(row: dict, names, where: str, what: str) -> str:
    for name in names:
        if name in row and row[name] is not None:
            return str(row[name])
    raise CaptionFileError(f"{where}: no {what} field (expected one of {', '.join(names)})")


def load_caption_table(path: str | os.PathLike) -> Dict[str, str]:
    """{absolute source path: caption} from a CSV or JSONL captions file."""
    path = Path(path)
    if not path.is_file():
        raise CaptionFileError(f"captions file not found: {path} (captions.file / --captions)")
    base = path.resolve().parent
    table: Dict[str, str] = {}

    def add(src: str, text: str, where: str) -> None:
        if not src.strip():
            raise CaptionFileError(f"{where}: empty path")
        key = os.path.normpath(os.path.join(base, os.path.expanduser(src.strip())))
        table[key] = text.strip()

    with open(path, newline="", encoding="utf-8") as f:
        if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CaptionFileError(f"{where}: not a JSON object ({e})") from None
                if not isinstance(row, dict):
                    raise CaptionFileError(f"{where}: not a JSON object")
                add(_pick(row, PATH_COLUMNS, where, "path"), _pick(row, CAPTION_COLUMNS, where, "caption"), where)
        else:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if not any(c in header for c in PATH_COLUMNS) or not any(c in header for c in CAPTION_COLUMNS):
                raise CaptionFileError(f"{path}: the CSV header {header} needs a path column ({', '.join(PATH_COLUMNS)}) "
                                       f"and a caption column ({', '.join(CAPTION_COLUMNS)})")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                add(_pick(row, PATH_COLUMNS, where, "path"), _pick(row, CAPTION_COLUMNS, where, "caption"), where)
    return table


def sidecar_caption(source: str) -> Optional[str]:
    """The text of `VIDEO.txt` beside `VIDEO.ext`, or None when absent or empty."""
    side = Path(source).with_suffix(".txt")
    if side == Path(source) or not side.is_file():
        return None
    text = side.read_text(encoding="utf-8", errors="replace").strip()
    return text or None


# ----------------------------------------------------------------------------------------------
# Captioner plug-ins
# ----------------------------------------------------------------------------------------------


@dataclass
class ClipContext:
    """What a captioner sees of one clip."""

    source: str  # the source video's path
    start_s: float  # the clip's span in the source, seconds
    end_s: float
    frames: np.ndarray  # uint8 (f, h, w, 3) RGB, the output frames
    fps: float

    @property
    def middle_frame(self) -> np.ndarray:
        return self.frames[len(self.frames) // 2]


class Captioner(ABC):
    """Captions clips. Built once per worker process from the whole prepare config."""

    name: ClassVar[str]

    @classmethod
    def check(cls, cfg) -> None:
        """Raise ConfigError (naming the key) if the config cannot work; runs before any worker."""

    @abstractmethod
    def __init__(self, cfg):
        ...

    @abstractmethod
    def caption(self, clip: ClipContext) -> Optional[str]:
        """The caption of a clip, or None when this captioner has none for it."""


class CocaCaptioner(Captioner):
    """open_clip CoCa on the clip's middle frame, greedy decoding; weights from `captions.coca.weights`.

    The decoding loop is open_clip's own (`CoCa.generate` with top-k 1): the image is encoded
    once and the text decoder extends the caption a token at a time until end-of-text. It is
    written here because `CoCa.generate` needs `transformers` < 5, which cannot be installed
    beside the `huggingface_hub` >= 1 this environment has.
    """

    name = "coca"
    SOT, EOT = 49406, 49407  # open_clip SimpleTokenizer start / end of text

    @classmethod
    def check(cls, cfg) -> None:
        weights, model = cfg.captions.coca.weights, cfg.captions.coca.model
        if ":" in str(model):  # hf-hub:..., local-dir:...: open_clip would fetch or read a config from there
            raise ConfigError(f"config key 'captions.coca.model': {model!r} is a hub or schema name; name a built-in "
                              f"open_clip CoCa architecture (e.g. coca_ViT-B-32) and give the weights as a local file "
                              f"(kvideo never downloads)")
        if weights is None:
            raise ConfigError("config key 'captions.coca.weights' is not set: the coca captioner needs a local open_clip "
                              "CoCa checkpoint (kvideo never downloads weights)")
        if not Path(weights).is_file():
            raise ConfigError(f"config key 'captions.coca.weights': file not found: {weights}")

    def __init__(self, cfg):
        import open_clip
        import torch

        self.check(cfg)
        c = cfg.captions.coca
        self.cfg, self.torch, self.decode = c, torch, open_clip.decode
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                c.model, pretrained=str(c.weights), device=c.device)
        except RuntimeError as e:
            raise ConfigError(f"config key 'captions.coca.weights': {c.weights} does not load into "
                              f"'{c.model}' (captions.coca.model): {e}") from None
        self.model.eval()

    def caption(self, clip: ClipContext) -> Optional[str]:
        from PIL import Image

        torch = self.torch
        image = self.preprocess(Image.fromarray(clip.middle_frame))[None].to(self.cfg.device)  # (1, 3, H, W)
        with torch.inference_mode():
            encoded = self.model(image)  # image_features (1, d), image_embs (1, n, d)
            tokens = torch.full((1, 1), self.SOT, dtype=torch.long, device=image.device)  # (1, t)
            for _ in range(self.cfg.seq_len):
                logits = self.model(image, tokens, image_latent=encoded["image_features"],
                                    image_embs=encoded["image_embs"], output_labels=False)["logits"][:, -1]
                tokens = torch.cat([tokens, logits.argmax(dim=-1, keepdim=True)], dim=1)
                if int(tokens[0, -1]) == self.EOT:
                    break
        text = self.decode(tokens[0]).replace("<start_of_text>", "").split("<end_of_text>")[0]
        text = " ".join(text.split()).strip(" .")
        return text or None


class ShapesWorldCaptioner(Captioner):
    """The canonical ShapesWorld caption from the clip's metadata: `VIDEO.json` beside the video,
    holding the attributes `kvideo.data.shapesworld.metadata` writes."""

    name = "shapesworld"

    def __init__(self, cfg):
        pass

    def caption(self, clip: ClipContext) -> Optional[str]:
        from kvideo.data.shapesworld import ATTRIBUTES, caption

        side = Path(clip.source).with_suffix(".json")
        if side == Path(clip.source) or not side.is_file():
            return None
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        if not isinstance(meta, dict) or not all(k in meta for k in ATTRIBUTES):
            return None
        return caption({k: meta[k] for k in ATTRIBUTES})


CAPTIONERS: Dict[str, type] = {"coca": CocaCaptioner, "shapesworld": ShapesWorldCaptioner}
