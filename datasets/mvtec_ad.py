"""MVTec-AD-style 2D trees (MVTec AD, VisA in MVTec layout, BTAD, MPDD), RGB only:

    <root>/<class>/train/good/<name>.<ext>
    <root>/<class>/test/<defect>/<name>.<ext>                 (incl. good)
    <root>/<class>/ground_truth/<defect>/<name>_mask.png       (or <name>.png)
"""
from __future__ import annotations

import os
from typing import List

from .base import AnomalyDataset, Record, find_mask, list_images, require_dir, subfolders
from .transforms import DatasetError



class MVTecAD(AnomalyDataset):
    AUX_CHOICES, AUX_WHAT = (0,), "RGB only (aux_ch=0)"

    def __init__(self, root: str, object_name: str, split: str = "train", img_size=256, aux_ch: int = 0, **kw):
        self.check_aux_ch(aux_ch, "MVTec-AD-style data")
        base = require_dir(os.path.join(root, object_name), f"class {object_name!r}")
        records: List[Record] = []
        if split == "train":
            for p in list_images(os.path.join(base, "train", "good"), "train/good"):
                records.append(Record(p, None, None, 0, "good", object_name))
        elif split == "test":
            test_dir = require_dir(os.path.join(base, "test"), "test folder")
            for defect in subfolders(test_dir):
                for p in list_images(os.path.join(test_dir, defect), f"test/{defect}"):
                    mask = None
                    if defect != "good":
                        stem = os.path.splitext(os.path.basename(p))[0]
                        gt_dir = os.path.join(base, "ground_truth", defect)
                        mask = find_mask(gt_dir, stem)
                        if mask is None:
                            raise DatasetError(f"no mask for {p}: expected {gt_dir}/{stem}_mask.png or {stem}.png")
                    records.append(Record(p, None, mask, int(defect != "good"), defect, object_name))
        else:
            raise DatasetError(f"MVTec-AD-style trees have the splits train and test, got {split!r}")
        super().__init__(records, img_size, 0, split, f"MVTec {object_name}", **kw)
