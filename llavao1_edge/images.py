"""Image loading and the one preprocessing rule shared by training and inference.

`load_image` accepts what applications hold (a path, bytes, a PIL image) and returns a clean
RGB image: EXIF orientation applied, any mode converted, decompression bombs refused.

`preprocess` is what llama.cpp's mtmd does for LLaVA "mlp" projectors (fixed-size
preprocessor, tools/mtmd/mtmd-image.cpp): scale to fit the square keeping the aspect ratio
(ceil), bicubic (Pillow's algorithm), paste centred on a square of MTMD_PAD_COLOR, then
normalise with the model's mean and std. Training uses it, so the model sees at training time
exactly the pixels llama.cpp will give it.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MTMD_PAD_COLOR = (122, 116, 104)  # mtmd's pad colour for "mlp" projectors
MAX_IMAGE_PIXELS = 50_000_000  # above this we refuse: a decompression bomb, or a scan too big to use

ImageSource = str | os.PathLike | bytes | Image.Image
_NO_ORIENTATION = ("PNG", "GIF", "BMP", "PPM")  # formats whose orientation only an EXIF block (in .info) can give


class ImageError(ValueError):
    """An image that cannot be used; the message names it and says why."""


def _describe(source: ImageSource) -> str:
    if isinstance(source, bytes):
        return f"image bytes ({len(source)} bytes)"
    if isinstance(source, Image.Image):
        return "PIL image"
    return str(source)


def load_image(source: ImageSource) -> Image.Image:
    """An RGB PIL image from a path, encoded bytes or a PIL image."""
    name = _describe(source)
    if isinstance(source, Image.Image):
        img = source
    else:
        if isinstance(source, bytes):
            if not source:
                raise ImageError(f"{name}: empty")
            fp = io.BytesIO(source)
        else:
            path = Path(source)
            if not path.is_file():
                raise ImageError(f"{name}: file not found")
            fp = path
        try:
            with warnings.catch_warnings():  # we refuse large images ourselves, with a clearer message
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(fp)
            _check_size(img, name)
            img.load()
        except ImageError:
            raise
        except Image.DecompressionBombError:
            raise ImageError(f"{name}: image too large (decompression bomb?)") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{name}: not a readable image ({e})") from None
    _check_size(img, name)
    if "exif" in img.info or img.format not in _NO_ORIENTATION:
        from PIL import (
            ImageOps,  # only for images that can carry an orientation (ImageOps loads EXIF tables)
        )

        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # a broken EXIF block should not stop the image from being used
            pass
    return _to_rgb(img)


def _check_size(img: Image.Image, name: str) -> None:
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError(f"{name}: empty image ({w}x{h})")
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageError(f"{name}: {w}x{h} pixels is over the limit of {MAX_IMAGE_PIXELS:,}; resize it first")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):  # composite on white, as viewers show it
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return img.convert("RGB")


def fit_to_square(img: Image.Image, size: int) -> Image.Image:
    """mtmd's fixed-size rule: scale to fit (ceil), bicubic, centre on the pad colour."""
    w, h = img.size
    if (w, h) == (size, size):
        return img.copy()
    scale = min(size / w, size / h)
    new_w, new_h = min(math.ceil(w * scale), size), min(math.ceil(h * scale), size)
    # mtmd resamples horizontally, then vertically (8-bit rounding between the passes); Pillow picks
    # the order itself (vertical first for portrait images), so the two passes are made explicit.
    resized = img.resize((new_w, h), Image.Resampling.BICUBIC).resize((new_w, new_h), Image.Resampling.BICUBIC)
    out = Image.new("RGB", (size, size), MTMD_PAD_COLOR)
    out.paste(resized, ((size - new_w) // 2, (size - new_h) // 2))
    return out


def normalise(img: Image.Image, mean, std) -> np.ndarray:
    """[3, H, W] float32 from an RGB image: (x / 255 - mean) / std per channel."""
    arr = np.asarray(img, dtype=np.float32) / 255.0  # [H, W, 3]
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess(img: Image.Image, size: int, mean, std) -> np.ndarray:
    """Pixels as the vision tower sees them: [3, size, size] float32."""
    return normalise(fit_to_square(img, size), mean, std)
