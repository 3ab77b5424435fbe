"""A generic RGB-D (or RGB + normals) folder:

    <root>/<object>/{train,test}/<defect>/rgb/<name>.<ext>
    <root>/<object>/{train,test}/<defect>/aux/<name>.{png,tif,tiff}
    <root>/<object>/ground_truth/<defect>/<name>.png   (or <name>_mask.png)

aux_ch 1: depth, a 16-bit PNG or a float TIFF, 0 = missing (``valid``). aux_ch 3: normals as an 8/16-bit RGB PNG
([0, max] -> [-1, 1]) or a float TIFF of unit vectors; zero vectors are invalid.
"""
from __future__ import annotations

import os
from typing import List

import numpy as np

from .base import AnomalyDataset, Record, find_mask, list_images, require_dir, subfolders
from .transforms import GEOMETRY_AUX_KIND, DatasetError, decode_normals_png, read_image, read_tiff


class RGBDFolder(AnomalyDataset):
    aux_kinds = GEOMETRY_AUX_KIND
    AUX_CHOICES, AUX_WHAT = (1, 3, 0), "depth (aux_ch=1), normals (3) or RGB only (0)"
    has_valid = True

    def __init__(self, root: str, object_name: str, split: str = "train", img_size=256, aux_ch: int = 1, **kw):
        self.check_aux_ch(aux_ch, "the rgbd folder")
        if split not in ("train", "test"):
            raise DatasetError(f"the rgbd folder has the splits train and test, got {split!r}")
        self.aux_kind = self.aux_kind_for(aux_ch)
        base = require_dir(os.path.join(root, object_name), f"object {object_name!r}")
        split_dir = require_dir(os.path.join(base, split), f"{object_name}/{split} folder")
        records: List[Record] = []
        for defect in subfolders(split_dir):
            ddir = os.path.join(split_dir, defect)
            for p in list_images(os.path.join(ddir, "rgb"), f"{split}/{defect}/rgb"):
                stem = os.path.splitext(os.path.basename(p))[0]
                aux = None
                if aux_ch:
                    cands = [os.path.join(ddir, "aux", stem + e) for e in (".png", ".tiff", ".tif")]
                    aux = next((c for c in cands if os.path.isfile(c)), None)
                    if aux is None:
                        raise DatasetError(f"aux file missing for {p}: expected {cands[0]} (or .tiff/.tif)")
                mask = None
                if defect != "good":
                    gt_dir = os.path.join(base, "ground_truth", defect)
                    mask = find_mask(gt_dir, stem)
                    if mask is None and split == "test":
                        raise DatasetError(f"no mask for {p}: expected {gt_dir}/{stem}.png")
                records.append(Record(p, aux, mask, int(defect != "good"), defect, object_name))
        self.aux_file_channels = 3 if aux_ch == 3 else 1
        super().__init__(records, img_size, aux_ch, split, f"rgbd {object_name}", **kw)

    @classmethod
    def read_aux(cls, path, aux_ch):
        arr = read_tiff(path) if path.lower().endswith((".tif", ".tiff")) else read_image(path)
        if aux_ch == 3:
            if arr.dtype in (np.uint8, np.uint16):
                return decode_normals_png(arr, path=path)
            n = arr.astype(np.float32)[..., :3]
            norm = np.linalg.norm(n, axis=2)
            return np.where(norm[..., None] > 1e-6, n / np.maximum(norm, 1e-6)[..., None], 0), norm > 1e-6
        if arr.ndim == 3:
            raise DatasetError(f"depth file {path} must have one channel, got shape {arr.shape}")
        d = arr.astype(np.float32)
        return d[..., None], d > 0
