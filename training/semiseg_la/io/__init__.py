"""io layer: volumes with geometry, input validation, the LA h5 release and dataset folders."""

from .datasets import (
    DEFAULT_LABELS,
    LAYOUTS_HELP,
    CaseRecord,
    dataset_labels,
    open_dataset,
    open_unlabeled_folder,
    read_dataset_json,
)
from .la_h5 import (
    H5_NAME,
    LA_SPACING,
    UPSTREAM_FOLDER,
    find_la_case,
    is_la_root,
    list_la_cases,
    locate_la_case,
    read_case_list,
    read_la_h5,
)
from .validate import (
    DEFAULT_GEOMETRY_TOLERANCE,
    MAX_VOXELS,
    image_problems,
    label_problems,
    validate_image,
    validate_label,
)
from .volume import (
    IDENTITY_DIRECTION,
    VOLUME_SUFFIXES,
    Volume,
    geometry_mismatches,
    is_volume_file,
    read_volume,
    write_volume,
)

__all__ = [
    "CaseRecord", "DEFAULT_GEOMETRY_TOLERANCE", "DEFAULT_LABELS", "H5_NAME", "IDENTITY_DIRECTION", "LAYOUTS_HELP",
    "LA_SPACING", "MAX_VOXELS", "UPSTREAM_FOLDER", "VOLUME_SUFFIXES", "Volume", "dataset_labels", "find_la_case",
    "geometry_mismatches", "image_problems", "is_la_root", "is_volume_file", "label_problems", "list_la_cases",
    "locate_la_case", "open_dataset", "open_unlabeled_folder", "read_case_list", "read_dataset_json", "read_la_h5",
    "read_volume", "validate_image", "validate_label", "write_volume",
]
