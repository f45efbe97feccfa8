"""Image loading and the Qwen-VL min/max-pixel resize, shared by data, rollouts and the judge.

One function decides an image's size everywhere (`smart_resize`), so the prompt the
policy is trained on, the prompt the rollout engine sees and the grid the processor
computes agree.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from caspo_jax.errors import UserError

__all__ = ["ImageError", "load_image", "smart_resize", "resize_image"]


class ImageError(UserError, ValueError):
    """An image that cannot be used: missing, unreadable, corrupt or degenerate."""


def load_image(path_or_image: str | Path | Image.Image) -> Image.Image:
    """Opens an image as RGB with its EXIF orientation applied.

    RGBA, LA and palette images with transparency are composited on white (the way a
    viewer shows them) rather than having their alpha dropped, which would turn
    transparent pixels black. Raises ImageError naming the path on any failure.
    """
    if isinstance(path_or_image, Image.Image):
        image, name = path_or_image, "<PIL image>"
    else:
        name = str(path_or_image)
        path = Path(path_or_image)
        if not path.is_file():
            raise ImageError(f"{name}: image file not found")
        try:
            image = Image.open(path)
            image.load()
        except Exception as exc:  # PIL raises many types for corrupt files
            raise ImageError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a corrupt EXIF block should not lose the pixels
        pass
    try:
        image = _to_rgb(image)
    except Exception as exc:
        raise ImageError(f"{name}: cannot convert mode {image.mode!r} to RGB ({exc})") from exc
    if image.width < 1 or image.height < 1:
        raise ImageError(f"{name}: empty image {image.size}")
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # high-bit-depth grayscale: scale the actual range to 8 bits instead of clipping
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        image = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """The (height, width) Qwen2-VL / Qwen2.5-VL's image processor resizes an image to.

    Both sides become multiples of `factor` (= patch_size * merge_size, 28 for Qwen2.5-VL,
    32 for Qwen3-VL), the aspect ratio is kept as closely as rounding allows, and the
    pixel count is brought into [min_pixels, max_pixels]. Same arithmetic as
    transformers' `qwen2_vl.image_processing_qwen2_vl.smart_resize` (tested for equality).
    """
    if height < 1 or width < 1:
        raise ImageError(f"image size must be positive, got height={height} width={width}")
    if max(height, width) / min(height, width) > 200:
        raise ImageError(
            f"aspect ratio must be below 200, got {max(height, width) / min(height, width):.1f}"
            f" (height={height}, width={width}); crop the image"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_image(
    image: Image.Image,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> Image.Image:
    """Resizes (bicubic, like the Qwen processor) to the `smart_resize` size."""
    height, width = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
    if (height, width) == (image.height, image.width):
        return image
    return image.resize((width, height), Image.Resampling.BICUBIC)
