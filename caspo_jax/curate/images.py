"""Stage 4, `images`: record which image belongs to which scenario, and check the files.

Images are the user's (generated from the `scene` descriptions or collected elsewhere).
An image is found by an explicit mapping file (JSONL lines `{"id": ..., "image": "rel/path"}`
or `{"id": ..., "images": [...]}`) or else by name: `<image_root>/<id>.<png|jpg|jpeg|webp>`.
Paths must stay under `image_root` and the file must open as an image; a scenario
without a usable image is rejected with the reason. Kept records gain `images`
(paths relative to `image_root`, as `caspo_jax.data.records` expects).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from caspo_jax.data.records import resolve_image_path

__all__ = ["IMAGE_EXTENSIONS", "attach_images", "load_image_map"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def load_image_map(path: str | Path) -> dict[str, list[str]]:
    """id -> relative image paths, from a JSONL mapping file (errors name file, line, field)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image mapping file not found")
    out: dict[str, list[str]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{n}: not valid JSON ({exc})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
            raise ValueError(f"{path}:{n}: field 'id' missing; each line is {{\"id\": ..., \"image\": \"rel/path\"}}")
        images = obj.get("images", obj.get("image"))
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not images or not all(isinstance(p, str) and p for p in images):
            raise ValueError(f"{path}:{n}: field 'image' (a path) or 'images' (a list of paths) is missing")
        out[obj["id"]] = images
    return out


def _check(relative: str, root: Path) -> str | None:
    try:
        path = resolve_image_path(relative, root)
    except ValueError as exc:
        return str(exc)
    if not path.is_file():
        return f"file {path} not found"
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # PIL raises many types for broken files
        return f"file {path} is not a readable image ({type(exc).__name__}: {exc})"
    return None


def attach_images(
    records: Sequence[dict[str, Any]], image_root: str | Path, image_map: Mapping[str, list[str]] | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept records with `images`, rejections {"id", "reason", "record"})."""
    root = Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image root is not a directory; pass --image-root DIR")
    kept, rejected = [], []
    for rec in records:
        rid = rec["id"]
        if image_map is not None and rid in image_map:
            candidates = list(image_map[rid])
        else:
            candidates = [f"{rid}{ext}" for ext in IMAGE_EXTENSIONS if (root / f"{rid}{ext}").is_file()][:1]
        if not candidates:
            where = "the mapping file" if image_map is not None else f"{root}/{rid}.{{png,jpg,jpeg,webp}}"
            rejected.append({"id": rid, "kind": "no_image", "reason": f"images: no image for scenario {rid} (looked in {where})",
                             "record": rec})
            continue
        problems = [p for p in (_check(c, root) for c in candidates) if p]
        if problems:
            rejected.append({"id": rid, "kind": "bad_image", "reason": f"images: {'; '.join(problems)}",
                             "record": rec})
            continue
        kept.append({**rec, "images": candidates})
    return kept, rejected
