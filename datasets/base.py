"""The common dataset machinery: records, file discovery with clear errors, and __getitem__."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import IMAGE_EXTENSIONS, AlignedTransform, DatasetError, read_image, read_mask

__all__ = ["Record", "AnomalyDataset", "list_images", "require_dir", "find_mask", "natural_key", "SPLITS"]

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Record:
    """One sample on disk. aux / mask may be None (RGB-only data; test images without a mask)."""
    rgb: str
    aux: Optional[str]
    mask: Optional[str]
    label: int
    defect: str
    object: str


def natural_key(path: str):
    """Sort '2.png' before '10.png'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(path))]


def require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise DatasetError(f"{what} not found: {path}")
    return path


def list_images(folder: str, what: str = "image folder", extensions: Sequence[str] = IMAGE_EXTENSIONS) -> List[str]:
    """Image files of a folder in natural order; a missing or empty folder is an error."""
    require_dir(folder, what)
    files = [os.path.join(folder, f) for f in os.listdir(folder)
             if f.lower().endswith(tuple(extensions)) and not f.startswith(".")]
    if not files:
        raise DatasetError(f"{what} has no images ({', '.join(extensions)}): {folder}")
    return sorted(files, key=natural_key)


def find_mask(gt_dir: str, stem: str) -> Optional[str]:
    """MVTec-style mask of an image: <stem>_mask.<ext> or <stem>.<ext> in gt_dir (None if absent)."""
    for name in (f"{stem}_mask", stem):
        for ext in (".png", ".jpg", ".bmp", ".tif", ".tiff"):
            p = os.path.join(gt_dir, name + ext)
            if os.path.isfile(p):
                return p
    return None


class AnomalyDataset(Dataset):
    """Records + aligned transform -> the sample dict of DESIGN.md.

    Subclasses set ``aux_kind`` ("normals", "depth", "intensity" or None), ``has_valid`` (whether aux has a
    per-pixel validity map) and ``aux_matches_rgb`` (whether aux must have the RGB image's size), and
    implement ``_load_aux(path) -> (aux (H, W, C) float32, valid (H, W) bool or None)``.
    """
    aux_kind: Optional[str] = None
    has_valid = False
    aux_matches_rgb = True

    def __init__(self, records: List[Record], img_size, aux_ch: int, split: str, name: str,
                 crop_size=None, hflip: float = 0.0, vflip: float = 0.0, seed: int = 0):
        if not records:
            raise DatasetError(f"{name}: the {split} split is empty")
        self.records, self.aux_ch, self.split, self.name = records, aux_ch, split, name
        self.seed, self.epoch = seed, 0
        self.transform = AlignedTransform(img_size, self.aux_kind if aux_ch else None, crop_size, hflip, vflip)
        self.augment = bool(hflip or vflip)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Random flips depend on (seed, epoch, index): reproducible with any number of workers."""
        self.epoch = epoch

    def _load_aux(self, path: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        raise TypeError(f"{type(self).__name__} has an aux modality but defines no _load_aux")

    @staticmethod
    def load_raw_mask(r: Record, rgb: np.ndarray) -> Optional[np.ndarray]:
        mask = read_mask(r.mask) if r.mask else None
        if mask is not None and mask.shape != rgb.shape[:2]:
            raise DatasetError(f"mask {r.mask} is {mask.shape[1]}x{mask.shape[0]} but its image {r.rgb} is "
                               f"{rgb.shape[1]}x{rgb.shape[0]}; they must have the same size")
        return mask

    def load_raw(self, i: int):
        """Numpy arrays of sample i before transforms: rgb (H, W, 3) uint8, aux, mask, valid."""
        r = self.records[i]
        rgb = read_image(r.rgb, "RGB")
        mask = self.load_raw_mask(r, rgb)
        aux = valid = None
        if self.aux_ch:
            aux, valid = self._load_aux(r.aux)
            if aux.shape[2] != self.aux_ch:
                raise DatasetError(f"{r.aux} gives {aux.shape[2]} aux channels, expected {self.aux_ch}")
            if self.aux_matches_rgb and aux.shape[:2] != rgb.shape[:2]:
                raise DatasetError(f"aux {r.aux} is {aux.shape[1]}x{aux.shape[0]} but {r.rgb} is "
                                   f"{rgb.shape[1]}x{rgb.shape[0]}; they must have the same size")
        return rgb, aux, mask, valid

    def __getitem__(self, i: int) -> Dict[str, object]:
        r = self.records[i]
        rgb, aux, mask, valid = self.load_raw(i)
        rng = np.random.default_rng((self.seed, self.epoch, i)) if self.augment else None
        out = self.transform(rgb, aux, mask, valid, rng=rng)
        if self.aux_ch and self.has_valid and "valid" not in out:
            out["valid"] = torch.ones_like(out["mask"])
        if not (self.aux_ch and self.has_valid):
            out.pop("valid", None)
        out.update(label=int(r.label), defect=r.defect, object=r.object, path=r.rgb)
        return out

    def defect_counts(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for r in self.records:
            counts[r.defect] = counts.get(r.defect, 0) + 1
        return counts
