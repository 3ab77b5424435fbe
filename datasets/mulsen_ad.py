"""MulSen-AD (RGB + infrared, and the point clouds of its third sensor), in its official tree:

    <root>/<class>/RGB/train/<n>.png
    <root>/<class>/RGB/test/<defect>/<n>.png          (incl. good)
    <root>/<class>/RGB/GT/<defect>/<n>.png            RGB masks; some anomalous images have none
    <root>/<class>/RGB/GT/<defect>/data.csv           optional labels: object, RGB, Infrared, Pointcloud
    <root>/<class>/Infrared/{train,test/<defect>}/<n>.png   same names as RGB
    <root>/<class>/Pointcloud/{train,test/<defect>}/<n>.stl optional: the part's mesh, paired by the file number

Point clouds are not pixel-registered to the images (a separate scanner): each record carries its cloud's path
(``Record.cloud``) and train.py / eval.py score it at object level (pointcloud.PointCloudBank), fused with the
image score for the "any sensor" label. Records without a cloud score from the images alone.

Labels: from data.csv when present (``label_source``: "any" = anomalous in any of the three sensors, the
MulSen-AD setting; or "rgb", "infrared", "rgb_or_infrared"), otherwise from the folder (good = 0). A test image
without an RGB mask gets an all-zero mask and keeps its label. RGB and infrared come from two cameras and are
not registered; they may differ in size (each is resized to img_size).
"""
from __future__ import annotations

import csv
import os
from typing import Dict, List, Optional

import numpy as np

from .base import AnomalyDataset, Record, list_images, require_dir, subfolders
from .transforms import DatasetError, read_image

LABEL_SOURCES = {"any": (0, 1, 2), "rgb": (0,), "infrared": (1,), "rgb_or_infrared": (0, 1)}


def read_label_csv(path: str, stems: List[str], label_source: str) -> Dict[str, int]:
    """data.csv rows (object, RGB, Infrared, Pointcloud) -> {stem: label}. Rows are matched by the first
    column when it names the files, else by order (the official files list samples in numeric order)."""
    cols = LABEL_SOURCES[label_source]
    with open(path, newline="") as fh:
        rows = [r for r in csv.reader(fh) if any(c.strip() for c in r)]
    if len(rows) < 2:
        raise DatasetError(f"label file {path} has no rows")
    body = rows[1:]
    try:
        labels = [max(int(float(r[1 + c])) for c in cols) for r in body]
    except (IndexError, ValueError) as exc:
        raise DatasetError(f"label file {path}: expected rows 'object, RGB, Infrared, Pointcloud' with 0/1 "
                           f"labels, got {body[0]!r} ({exc})") from exc
    keys = [os.path.splitext(os.path.basename(r[0].strip()))[0] for r in body]
    if set(stems) <= set(keys):
        return {k: v for k, v in zip(keys, labels)}
    if len(body) == len(stems):
        return dict(zip(stems, labels))
    raise DatasetError(f"label file {path} has {len(body)} rows for {len(stems)} images and its first column "
                       f"does not name them")


def _cloud_path(pc_dir: str, sub: str, rgb_path: str) -> Optional[str]:
    """The point cloud of an image: the same file number under Pointcloud/<sub>, any cloud or mesh extension."""
    stem = os.path.splitext(os.path.basename(rgb_path))[0]
    for ext in (".stl", ".ply", ".pcd", ".obj"):
        p = os.path.join(pc_dir, sub, stem + ext)
        if os.path.isfile(p):
            return p
    return None


class MulSenAD(AnomalyDataset):
    AUX_CHOICES, AUX_WHAT = (1, 0), "infrared (aux_ch=1) or RGB only (0)"
    aux_kind = "intensity"
    aux_matches_rgb = False

    def __init__(self, root: str, object_name: str, split: str = "train", img_size=256, aux_ch: int = 1,
                 label_source: str = "any", **kw):
        self.check_aux_ch(aux_ch, "MulSen-AD")
        if label_source not in LABEL_SOURCES:
            raise ValueError(f"label_source must be one of {sorted(LABEL_SOURCES)}, got {label_source!r}")
        if split not in ("train", "test"):
            raise DatasetError(f"MulSen-AD has the splits train and test, got {split!r}")
        base = require_dir(os.path.join(root, object_name), f"MulSen-AD class {object_name!r}")
        rgb_dir = require_dir(os.path.join(base, "RGB"), "MulSen-AD RGB folder")
        ir_dir = os.path.join(base, "Infrared")
        if aux_ch:
            require_dir(ir_dir, "MulSen-AD Infrared folder")
        pc_dir = os.path.join(base, "Pointcloud")
        cloud = (lambda sub, p: _cloud_path(pc_dir, sub, p)) if os.path.isdir(pc_dir) else (lambda sub, p: None)
        records: List[Record] = []
        if split == "train":
            for p in list_images(os.path.join(rgb_dir, "train"), "MulSen-AD RGB/train"):
                records.append(Record(p, self._aux_path(ir_dir, "train", p, aux_ch), None, 0, "good", object_name,
                                      cloud("train", p)))
        else:
            test_dir = require_dir(os.path.join(rgb_dir, "test"), "MulSen-AD RGB/test")
            for defect in subfolders(test_dir):
                files = list_images(os.path.join(test_dir, defect), f"MulSen-AD RGB/test/{defect}")
                stems = [os.path.splitext(os.path.basename(p))[0] for p in files]
                gt_dir = os.path.join(rgb_dir, "GT", defect)
                csv_path = os.path.join(gt_dir, "data.csv")
                labels = (read_label_csv(csv_path, stems, label_source) if os.path.isfile(csv_path)
                          else {s: int(defect != "good") for s in stems})
                for p, s in zip(files, stems):
                    mask = os.path.join(gt_dir, os.path.basename(p))
                    records.append(Record(p, self._aux_path(ir_dir, os.path.join("test", defect), p, aux_ch),
                                          mask if os.path.isfile(mask) else None, labels[s], defect, object_name,
                                          cloud(os.path.join("test", defect), p)))
        super().__init__(records, img_size, aux_ch, split, f"MulSen-AD {object_name}", **kw)
        self.clouds_dir = pc_dir if os.path.isdir(pc_dir) else None

    @staticmethod
    def _aux_path(ir_dir: str, sub: str, rgb_path: str, aux_ch: int) -> Optional[str]:
        if not aux_ch:
            return None
        p = os.path.join(ir_dir, sub, os.path.basename(rgb_path))
        if not os.path.isfile(p):
            raise DatasetError(f"infrared image missing for {rgb_path}: expected {p}")
        return p

    @classmethod
    def read_aux(cls, path, aux_ch=1):
        ir = read_image(path)
        if ir.ndim == 3:
            ir = ir[..., :3].mean(axis=2)
        scale = 65535.0 if ir.dtype == np.uint16 or ir.max() > 255 else 255.0
        return (ir.astype(np.float32) / scale)[..., None], None
