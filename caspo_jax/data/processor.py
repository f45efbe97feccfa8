"""The one way to load a checkpoint's tokenizer + image processor (no torchvision).

`load_processor(directory)` reads an HF directory (a released Qwen2.5-VL / Qwen3-VL
checkpoint, or the `export/` of a caspo run) and returns a transformers Qwen-VL
processor of the checkpoint's family (`config.json` "model_type"): `.tokenizer` with a
chat template and `.image_processor`, the PIL `Qwen2VLImageProcessorPil`. Patch size,
merge size and pixel limits come from `preprocessor_config.json`; without that file,
from `config.json`'s vision config (Qwen2.5-VL patches are 14 pixels, Qwen3-VL's 16, so
no family default is hard-coded). `min_pixels` / `max_pixels` override the saved limits
(the trainer passes its data config's).
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from caspo_jax.files import read_structured
from caspo_jax.tiny.tokenizer import TinyQwen2_5_VLProcessor, TinyQwen3VLProcessor

__all__ = ["load_processor"]

# Qwen-VL defaults where neither the argument nor preprocessor_config.json gives a limit.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
# Released Qwen3-VL checkpoints normalise with mean = std = 0.5 (Qwen2.5-VL: the CLIP values,
# the image processor's defaults).
_QWEN3_NORM = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def _image_processor(directory: Path, model_type: str, vision: dict, overrides: dict):
    if (directory / "preprocessor_config.json").is_file():
        return Qwen2VLImageProcessorPil.from_pretrained(directory, **overrides)
    if "patch_size" not in vision:
        raise FileNotFoundError(
            f"{directory}: no preprocessor_config.json and config.json has no vision_config.patch_size; "
            "copy the model's preprocessor_config.json next to its weights")
    kwargs = dict(patch_size=int(vision["patch_size"]), merge_size=int(vision.get("spatial_merge_size", 2)),
                  temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
                  min_pixels=DEFAULT_MIN_PIXELS, max_pixels=DEFAULT_MAX_PIXELS)
    if model_type == "qwen3_vl":
        kwargs.update(_QWEN3_NORM)
    return Qwen2VLImageProcessorPil(**{**kwargs, **overrides})


def load_processor(directory: str | Path, *, min_pixels: int | None = None, max_pixels: int | None = None,
                   default_chat_template: str | None = None):
    """The checkpoint's processor: a `TinyQwen2_5_VLProcessor` or `TinyQwen3VLProcessor`
    (transformers' processors, images and text only) with `.tokenizer` and `.image_processor`.

    The chat template comes from the tokenizer files, else `chat_template.jinja`, else
    `default_chat_template`; with none of them a ValueError names the fix.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: pass an HF checkpoint directory (config.json, "
                                "tokenizer files, preprocessor_config.json), e.g. a caspo run's export/")
    config = read_structured(config_path, dict, what="checkpoint config", expected="an HF config.json object")
    model_type = config.get("model_type", "qwen2_5_vl")
    overrides = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    image_processor = _image_processor(directory, model_type, config.get("vision_config") or {}, overrides)

    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)  # never a directory's own code
    template = directory / "chat_template.jinja"
    if not tokenizer.chat_template and template.is_file():
        tokenizer.chat_template = template.read_text(encoding="utf-8")
    if not tokenizer.chat_template:
        tokenizer.chat_template = default_chat_template
    if not tokenizer.chat_template:
        raise ValueError(f"{directory}: the tokenizer has no chat template (tokenizer_config.json "
                         "'chat_template' or chat_template.jinja); add the model's template")
    cls = TinyQwen3VLProcessor if model_type == "qwen3_vl" else TinyQwen2_5_VLProcessor
    return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
               chat_template=tokenizer.chat_template)
