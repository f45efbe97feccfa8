"""Building chat messages for OpenAI-compatible endpoints: text and images as data URLs."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from caspo_jax.data.images import load_image

__all__ = ["image_data_url", "user_message", "system_message", "assistant_message"]


def image_data_url(
    path_or_pil: str | Path | Image.Image,
    image_format: str = "png",
    jpeg_quality: int = 90,
    max_pixels: int | None = None,
) -> str:
    """A `data:image/...;base64,...` URL of the image, decoded to RGB with EXIF applied.

    Re-encoding (rather than passing the file's bytes through) means the judge sees the
    same upright RGB pixels the policy sees, and the URL is a deterministic function of
    the pixels, which keeps cache keys stable. `image_format`: "png" (lossless, default)
    or "jpeg" (smaller requests). max_pixels: downscale (bicubic, aspect kept) images with
    more pixels than this; endpoints cap request sizes and judges rarely need full resolution.
    """
    image = load_image(path_or_pil)
    if max_pixels is not None and image.width * image.height > max_pixels:
        scale = math.sqrt(max_pixels / (image.width * image.height))
        size = (max(1, math.floor(image.width * scale)), max(1, math.floor(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    fmt = image_format.lower()
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG")
        mime = "image/png"
    elif fmt in ("jpeg", "jpg"):
        image.save(buffer, format="JPEG", quality=jpeg_quality)
        mime = "image/jpeg"
    else:
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def user_message(
    text: str, images: Iterable[str | Path | Image.Image] = (), *, max_pixels: int | None = None
) -> dict[str, Any]:
    """A user turn: images first (as the Qwen chat template places them), then the text.

    Text-only turns use a plain string `content`, which every server accepts.
    max_pixels: see `image_data_url`.
    """
    images = list(images)
    if not images:
        return {"role": "user", "content": text}
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": image_data_url(image, max_pixels=max_pixels)}}
        for image in images
    ]
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def system_message(text: str) -> dict[str, Any]:
    return {"role": "system", "content": text}


def assistant_message(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}
