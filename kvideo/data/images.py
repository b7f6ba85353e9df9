"""Still images as RGB arrays, from any file Pillow reads: first frames given to the samplers.

`read_image` turns the picture the way a viewer shows it (EXIF orientation applied), composites
transparency over white, scales 16-bit and float images to 8 bits, and converts every other mode
(palette, greyscale, CMYK, YCbCr) to RGB.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


def read_image(source: Union[str, Path, bytes]) -> np.ndarray:
    """(h, w, 3) uint8 RGB of an image file (a path, or its bytes); a ValueError names the file
    and the reason when Pillow cannot read it."""
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ValueError(f"cannot read image '{name}': {e}") from None


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # high bit depth: stretch to 8 bits
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1e-12)
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=-1)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB")).copy()
    return np.asarray(img.convert("RGB")).copy()
