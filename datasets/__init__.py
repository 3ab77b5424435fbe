"""Datasets: one file per family, one entry point.

    build_dataset(name, root, object_name, split, img_size, aux_ch, **kw) -> AnomalyDataset
    list_objects(name, root) -> list of object/class names

Names: mulsenad, realiadd3, mvtec3d, eyecandies (after ``prepare_data.py eyecandies``), mvtec (MVTec AD, VisA in
MVTec layout, BTAD, MPDD), rgbd (generic folder), synthetic (procedural, root=None). Every sample is a dict:
rgb (3, H, W), aux (aux_ch, H, W) unless aux_ch == 0, mask (1, H, W) in {0, 1}, label, defect, object, path,
and valid (1, H, W) for modalities with missing data.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

from .base import AnomalyDataset, Record, ShiftedAux
from .transforms import DatasetError

__all__ = ["build_dataset", "list_objects", "default_aux_ch", "dataset_class", "DATASETS", "AnomalyDataset",
           "DatasetError",
           "Record", "ShiftedAux"]

# name -> (module, class). Each class says which aux channel counts it provides (AUX_CHOICES, default first).
DATASETS: Dict[str, Tuple[str, str]] = {
    "mulsenad": ("mulsen_ad", "MulSenAD"),
    "realiadd3": ("real_iad_d3", "RealIADD3"),
    "mvtec3d": ("mvtec3d", "MVTec3D"),
    "eyecandies": ("mvtec3d", "MVTec3D"),
    "mvtec": ("mvtec_ad", "MVTecAD"),
    "rgbd": ("rgbd", "RGBDFolder"),
    "synthetic": ("synthetic", "SyntheticDataset"),
}


def _class(name: str):
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    import importlib
    module, cls = DATASETS[name]
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def dataset_class(name: str):
    """The dataset class of family ``name`` (its class methods read single files: ``read_aux``, ``aux_kind_for``)."""
    return _class(name)


def default_aux_ch(name: str) -> int:
    """The aux channel count dataset family ``name`` gives when none is asked for."""
    return _class(name).AUX_CHOICES[0]


def build_dataset(name: str, root: Optional[str], object_name: str, split: str, img_size=256,
                  aux_ch: Optional[int] = None, check: bool = True, progress: bool = True, **kw) -> AnomalyDataset:
    """Build the `split` of `object_name` from the dataset family `name` (see the module docstring). With
    ``check`` every file of the split is read cheaply first (``AnomalyDataset.check_files``), so a bad file stops
    the run before its first step, with every bad path named."""
    cls = _class(name)
    aux_ch = cls.AUX_CHOICES[0] if aux_ch is None else aux_ch
    cls.check_aux_ch(aux_ch, f"dataset {name!r}")
    if name != "synthetic":
        if not root:
            raise DatasetError(f"dataset {name!r} needs a data root (--data_root)")
        if not os.path.isdir(root):
            raise DatasetError(f"data root not found: {root}")
        objects = list_objects(name, root)
        if object_name not in objects:
            raise DatasetError(f"object {object_name!r} not found in {root}; available: {', '.join(objects) or 'none'}")
    if name == "eyecandies":
        kw.setdefault("family", "Eyecandies")
    ds = cls(root, object_name, split, img_size, aux_ch, **kw)
    if check:
        ds.check_files(progress=progress)
    return ds


def list_objects(name: str, root: Optional[str] = None) -> List[str]:
    """Object / class names available for dataset `name` under `root` (folders that hold the family's layout)."""
    if name == "synthetic":
        from .synthetic import OBJECT_TYPES
        return list(OBJECT_TYPES)
    _class(name)
    if not root or not os.path.isdir(root):
        raise DatasetError(f"data root not found: {root}")
    marker = {"mulsenad": "RGB", "mvtec": "train", "mvtec3d": "train", "eyecandies": "train", "realiadd3": "train",
              "rgbd": "train"}[name]
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d, marker)))
