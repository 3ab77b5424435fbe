"""MVTec 3D-AD (and Eyecandies after ``prepare_data.py eyecandies``), raw or preprocessed:

    <root>/<class>/{train,validation,test}/<defect>/rgb/<n>.png
    <root>/<class>/{train,validation,test}/<defect>/xyz/<n>.tiff     organised H x W x 3 points, zeros = missing
    <root>/<class>/test/<defect>/gt/<n>.png

aux_ch 3: unit normals from neighbouring points; aux_ch 1: depth (the z coordinate). ``valid`` is False where
points are missing (and, for normals, where a neighbour is missing).
"""
from __future__ import annotations

import os
from typing import List

import numpy as np

from .base import AnomalyDataset, Record, list_images, require_dir, subfolders
from .transforms import GEOMETRY_AUX_KIND, DatasetError, normals_from_xyz, read_tiff



def read_xyz(path: str) -> np.ndarray:
    xyz = read_tiff(path)
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise DatasetError(f"xyz file {path} must be an organised H x W x 3 point cloud, got shape {xyz.shape}")
    xyz = xyz.astype(np.float32)
    # A point with any non-finite coordinate (NaN, inf) is a missing point, like the zeros the scanners write.
    return np.where(np.isfinite(xyz).all(axis=2, keepdims=True), xyz, 0.0).astype(np.float32)


class MVTec3D(AnomalyDataset):
    AUX_CHOICES, AUX_WHAT = (3, 1, 0), "normals (aux_ch=3), depth (1) or RGB only (0)"
    has_valid = True
    aux_file_channels = 3       # organised xyz point clouds

    def __init__(self, root: str, object_name: str, split: str = "train", img_size=256, aux_ch: int = 3,
                 family: str = "MVTec 3D-AD", **kw):
        self.check_aux_ch(aux_ch, family)
        if split not in ("train", "validation", "test"):
            raise DatasetError(f"{family} has the splits train, validation and test, got {split!r}")
        self.aux_kind = self.aux_kind_for(aux_ch)
        split_dir = require_dir(os.path.join(root, object_name, split), f"{family} {object_name}/{split} folder")
        records: List[Record] = []
        for defect in subfolders(split_dir):
            ddir = os.path.join(split_dir, defect)
            for p in list_images(os.path.join(ddir, "rgb"), f"{split}/{defect}/rgb"):
                stem = os.path.splitext(os.path.basename(p))[0]
                xyz = os.path.join(ddir, "xyz", stem + ".tiff")
                if aux_ch and not os.path.isfile(xyz):
                    raise DatasetError(f"point cloud missing for {p}: expected {xyz}")
                gt = os.path.join(ddir, "gt", stem + ".png")
                if defect != "good" and not os.path.isfile(gt):
                    raise DatasetError(f"mask missing for {p}: expected {gt}")
                records.append(Record(p, xyz if aux_ch else None, gt if os.path.isfile(gt) else None,
                                      int(defect != "good"), defect, object_name))
        super().__init__(records, img_size, aux_ch, split, f"{family} {object_name}", **kw)

    @classmethod
    def aux_kind_for(cls, aux_ch):
        return GEOMETRY_AUX_KIND[aux_ch]

    @classmethod
    def read_aux(cls, path, aux_ch):
        xyz = read_xyz(path)
        if aux_ch == 3:
            return normals_from_xyz(xyz, path)
        z = xyz[..., 2]
        return z[..., None], z > 0
