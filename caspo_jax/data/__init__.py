"""Datasets on grain: records, images, chat templates, constitutions, importers."""

from caspo_jax.data.constitutions import constitution_for, load_constitutions
from caspo_jax.data.formats import PreferencePair, SFTExample, load_pairs, load_sft_examples
from caspo_jax.data.images import ImageError, load_image, resize_image, smart_resize
from caspo_jax.data.records import CATEGORIES, RecordError, SafetyRecord, load_records

__all__ = [
    "CATEGORIES",
    "ImageError",
    "PreferencePair",
    "RecordError",
    "SFTExample",
    "SafetyRecord",
    "constitution_for",
    "load_constitutions",
    "load_image",
    "load_pairs",
    "load_records",
    "load_sft_examples",
    "resize_image",
    "smart_resize",
]
