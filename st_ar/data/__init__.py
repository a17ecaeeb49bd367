"""Data: offline image datasets, the crops code extraction encodes, and the pre-extracted codes training reads."""

from .codes import ExtractReport, check_codes_match, codes_dtype, extract_codes, read_codes_meta
from .datasets import (
    ArrayDataset,
    CorruptImageError,
    FolderDataset,
    IdxFormatError,
    ImageDataset,
    open_dataset,
    read_idx,
)
from .transforms import (
    center_crop_adm,
    crops_for_extraction,
    fit_to_multiple,
    five_crop,
    image_to_tensor,
    ten_crop,
    to_rgb,
)
from .views import CodesDataset, choose_views

__all__ = [
    "ArrayDataset",
    "CodesDataset",
    "ExtractReport",
    "check_codes_match",
    "choose_views",
    "codes_dtype",
    "extract_codes",
    "read_codes_meta",
    "CorruptImageError",
    "FolderDataset",
    "IdxFormatError",
    "ImageDataset",
    "center_crop_adm",
    "crops_for_extraction",
    "fit_to_multiple",
    "five_crop",
    "image_to_tensor",
    "open_dataset",
    "read_idx",
    "ten_crop",
    "to_rgb",
]
