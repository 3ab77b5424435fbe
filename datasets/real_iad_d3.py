"""Real-IAD D3: RGB + photometric-stereo surface normals (the "pseudo-3D" modality), aux_ch 3.

Expected tree (one folder per category; the modality folders accept several names):

    <root>/<category>/train/good/rgb/<name>.<ext>
    <root>/<category>/train/good/{normals,pseudo3d,ps}/<name>.png
    <root>/<category>/test/<defect>/{rgb,normals|pseudo3d|ps,gt}/<name>.png

Normal decoding (documented, configurable): an 8/16-bit RGB PNG maps [0, max] -> [-1, 1] per channel;
``normal_axis_order`` says which of x, y, z the stored channels hold (default "xyz"), ``normal_flip`` which axes to
negate (e.g. "y" when the file's y axis points up), then vectors are normalised to unit length.
``require_normals=False`` lets images without a normals file load with zero normals and ``valid`` = 0 (counted
and logged), instead of raising.
"""
from __future__ import annotations

import logging
import os
from typing import List, Optional

import numpy as np

from .base import AnomalyDataset, Record, list_images, require_dir, subfolders
from .transforms import DatasetError, decode_normals_png, read_image

logger = logging.getLogger(__name__)

NORMAL_DIRS = ("normals", "pseudo3d", "ps", "normal")


class RealIADD3(AnomalyDataset):
    AUX_CHOICES, AUX_WHAT = (3, 0), "normals (aux_ch=3) or RGB only (0)"
    aux_file_channels = 3       # photometric-stereo normals stored as RGB
    aux_kind = "normals"
    has_valid = True

    def __init__(self, root: str, object_name: str, split: str = "train", img_size=256, aux_ch: int = 3,
                 normal_axis_order: str = "xyz", normal_flip: str = "", require_normals: bool = True, **kw):
        self.check_aux_ch(aux_ch, "Real-IAD D3")
        if split not in ("train", "test"):
            raise DatasetError(f"Real-IAD D3 has the splits train and test, got {split!r}")
        self.axis_order, self.flip = normal_axis_order, normal_flip
        split_dir = require_dir(os.path.join(root, object_name, split), f"Real-IAD D3 {object_name}/{split} folder")
        records: List[Record] = []
        missing = 0
        for defect in subfolders(split_dir):
            ddir = os.path.join(split_dir, defect)
            ndir = next((os.path.join(ddir, n) for n in NORMAL_DIRS if os.path.isdir(os.path.join(ddir, n))), None)
            if aux_ch and ndir is None and require_normals:
                raise DatasetError(f"no normals folder in {ddir}: expected one of {NORMAL_DIRS}")
            for p in list_images(os.path.join(ddir, "rgb"), f"{split}/{defect}/rgb"):
                stem = os.path.splitext(os.path.basename(p))[0]
                aux: Optional[str] = None
                if aux_ch:
                    aux = os.path.join(ndir, stem + ".png") if ndir else None
                    if aux is None or not os.path.isfile(aux):
                        if require_normals:
                            raise DatasetError(f"normals missing for {p}: expected {aux}")
                        missing += 1
                        aux = None
                gt = os.path.join(ddir, "gt", stem + ".png")
                if defect != "good" and not os.path.isfile(gt):
                    raise DatasetError(f"mask missing for {p}: expected {gt}")
                records.append(Record(p, aux, gt if os.path.isfile(gt) else None, int(defect != "good"),
                                      defect, object_name))
        if missing:
            logger.warning("Real-IAD D3 %s/%s: %d images have no normals file; they load with valid = 0",
                           object_name, split, missing)
        super().__init__(records, img_size, aux_ch, split, f"Real-IAD D3 {object_name}", **kw)

    def load_raw(self, i):
        r = self.records[i]
        if self.aux_ch and r.aux is None:  # allowed only with require_normals=False
            rgb = read_image(r.rgb, "RGB")
            mask = self.load_raw_mask(r, rgb)
            return rgb, np.zeros(rgb.shape[:2] + (3,), np.float32), mask, np.zeros(rgb.shape[:2], bool)
        return super().load_raw(i)

    @classmethod
    def read_aux(cls, path, aux_ch=3, axis_order: str = "xyz", flip: str = ""):
        return decode_normals_png(read_image(path), axis_order, flip, path)

    def _load_aux(self, path):
        return self.read_aux(path, self.aux_ch, self.axis_order, self.flip)
