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


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file as load_image returns it (EXIF orientation applied), read from its
    header without decoding the pixels."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1) if img.format not in _NO_ORIENTATION or "exif" in img.info else 1
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: not a readable image ({e})") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # the orientations that turn the image a quarter


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


def resize(img: Image.Image, width: int, height: int, resample=Image.Resampling.BICUBIC) -> Image.Image:
    """mtmd's resize: Pillow's filters, horizontally then vertically with 8-bit rounding between the passes
    (Pillow picks the order itself, vertical first for portrait images, so the two passes are explicit)."""
    if img.size == (width, height):
        return img.copy()
    return img.resize((width, img.height), resample).resize((width, height), resample)


def fit_into(img: Image.Image, width: int, height: int, pad_color=(0, 0, 0),
             resample=Image.Resampling.BICUBIC) -> Image.Image:
    """mtmd's padded resize (PAD_CEIL): scaled to fit, keeping its aspect (sides rounded up), centred on pad_color."""
    w, h = img.size
    if (w, h) == (width, height):
        return img.copy()
    scale = min(width / w, height / h)
    new_w, new_h = min(math.ceil(w * scale), width), min(math.ceil(h * scale), height)
    out = Image.new("RGB", (width, height), pad_color)
    out.paste(resize(img, new_w, new_h, resample), ((width - new_w) // 2, (height - new_h) // 2))
    return out


def fit_to_square(img: Image.Image, size: int) -> Image.Image:
    """mtmd's fixed-size rule of LLaVA's "mlp" projector: fitted into a square on the pad colour, bicubic."""
    return fit_into(img, size, size, MTMD_PAD_COLOR)


def _sliced_size(width: int, height: int, longest_edge: int) -> tuple[int, int]:
    """The size before tiling: the longest edge to `longest_edge`, the other side even."""
    if width >= height:
        w, h = longest_edge, int(longest_edge / (width / height))
        return w, h + h % 2
    w, h = int(longest_edge * (width / height)), longest_edge
    return w + w % 2, h


def slice_grid(width: int, height: int, longest_edge: int, tile: int) -> tuple[int, int]:
    """(rows, cols) of tiles slice_tiles cuts an image of this size into."""
    w, h = _sliced_size(width, height, longest_edge)
    return -(-h // tile), -(-w // tile)


def slice_tiles(img: Image.Image, longest_edge: int, tile: int) -> tuple[list[Image.Image], int, int]:
    """mtmd's (and transformers') Idefics3/SmolVLM slicing: the longest edge resized to `longest_edge` (the
    other side even), both sides then stretched up to multiples of `tile`, cut into tiles row by row, and the
    whole image shrunk to one tile as the overview. Returns (tiles then the overview, rows, cols)."""
    rw, rh = _sliced_size(*img.size, longest_edge)
    rows, cols = slice_grid(*img.size, longest_edge, tile)
    refined = resize(resize(img, rw, rh, Image.Resampling.LANCZOS), cols * tile, rows * tile, Image.Resampling.LANCZOS)
    tiles = [refined.crop((x * tile, y * tile, (x + 1) * tile, (y + 1) * tile)) for y in range(rows) for x in range(cols)]
    return [*tiles, resize(refined, tile, tile, Image.Resampling.LANCZOS)], rows, cols


def dynamic_size(width: int, height: int, align: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """mtmd's (and transformers' smart_resize) size for dynamic-resolution towers (Qwen2-VL): sides rounded to
    multiples of `align`, then scaled down (or up) into [min_pixels, max_pixels] keeping the aspect."""
    w_bar = max(align, int(_round_half_away(width / align)) * align)
    h_bar = max(align, int(_round_half_away(height / align)) * align)
    if w_bar * h_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar, w_bar = max(align, math.floor(height / beta / align) * align), max(align, math.floor(width / beta / align) * align)
    elif w_bar * h_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / align) * align, math.ceil(width * beta / align) * align
    return w_bar, h_bar


def _round_half_away(x: float) -> float:
    return math.floor(x + 0.5)  # C's std::round for the positive sizes here (Python's round is half-to-even)


def normalise(img: Image.Image, mean, std) -> np.ndarray:
    """[3, H, W] float32 from an RGB image: (x / 255 - mean) / std per channel."""
    arr = np.asarray(img, dtype=np.float32) / 255.0  # [H, W, 3]
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess(img: Image.Image, size: int, mean, std) -> np.ndarray:
    """Pixels as the vision tower sees them: [3, size, size] float32."""
    return normalise(fit_to_square(img, size), mean, std)
