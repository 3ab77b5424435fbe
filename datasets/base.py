"""The common dataset machinery: records, file discovery with clear errors, and __getitem__."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import (IMAGE_EXTENSIONS, AlignedTransform, DatasetError, probe_file, read_image, read_mask,
                         translate)

__all__ = ["Record", "AnomalyDataset", "ShiftedAux", "list_images", "require_dir", "find_mask", "natural_key"]


@dataclass(frozen=True)
class Record:
    """One sample on disk. aux / mask may be None (RGB-only data; test images without a mask); cloud: the part's
    point cloud or mesh from a separate 3D sensor (MulSen-AD's Pointcloud/*.stl), where the dataset has one."""
    rgb: str
    aux: Optional[str]
    mask: Optional[str]
    label: int
    defect: str
    object: str
    cloud: Optional[str] = None


def natural_key(path: str):
    """Sort '2.png' before '10.png'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(path))]


def require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise DatasetError(f"{what} not found: {path}")
    return path


def subfolders(folder: str) -> List[str]:
    """Names of the sub-folders of ``folder`` (a split's defect-type folders), sorted; files are ignored."""
    return sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))


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

    Subclasses set ``aux_kind`` ("normals", "depth", "intensity" or None; or ``aux_kinds`` by aux_ch), ``has_valid``
    (whether aux has a per-pixel validity map) and ``aux_matches_rgb`` (whether aux must have the RGB image's
    size), and implement the class method ``read_aux(path, aux_ch) -> (aux (H, W, C) float32, valid (H, W) bool
    or None)``.
    """
    aux_kind: Optional[str] = None
    # {aux_ch: aux_kind} for families whose modality depends on aux_ch (the geometry ones: normals, depth, FPFH)
    aux_kinds: Optional[Dict[int, Optional[str]]] = None
    has_valid = False
    aux_matches_rgb = True
    aux_file_channels: Optional[int] = None    # channels an aux FILE must have (None: any)
    # Above this many files the up-front check shows a progress bar.
    CHECK_PROGRESS_FROM = 500

    # The aux channel counts a family provides (the first is its default) and how to say so in an error.
    AUX_CHOICES: Tuple[int, ...] = (0,)
    AUX_WHAT = "RGB only (aux_ch=0)"

    @classmethod
    def check_aux_ch(cls, aux_ch: int, family: str) -> None:
        if aux_ch not in cls.AUX_CHOICES:
            raise DatasetError(f"{family} provides {cls.AUX_WHAT}; got aux_ch={aux_ch}")

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

    @classmethod
    def aux_kind_for(cls, aux_ch: int) -> Optional[str]:
        """The aux modality ("normals", "depth", "intensity") this family gives with ``aux_ch`` channels."""
        if cls.aux_kinds is not None:
            return cls.aux_kinds[aux_ch]
        return cls.aux_kind if aux_ch else None

    @classmethod
    def read_aux(cls, path: str, aux_ch: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """One aux FILE of this family -> (aux (H, W, aux_ch) float32, valid (H, W) bool or None). A class method,
        so that predict.py reads new parts' files exactly as training read the dataset's."""
        raise TypeError(f"{cls.__name__} has no aux modality to read")

    def points(self, i: int) -> np.ndarray:
        """The organised point cloud (H, W, 3) of sample i, zeros = missing (geometry datasets)."""
        raise TypeError(f"{type(self).__name__} has no point clouds")

    def xyz_at(self, i: int) -> torch.Tensor:
        """Sample i's points on the training grid, (3, H, W) (AlignedTransform.points): what training anomalies of
        normals + FPFH displace (datasets.synthesis). Flips are not applied to them, so a flipping dataset refuses."""
        if self.augment:
            raise DatasetError(f"{self.name}: random flips are not applied to the points training anomalies "
                               f"displace; build the dataset without hflip / vflip for normals + FPFH")
        return self.transform.points(self.points(i))

    def _load_aux(self, path: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        return self.read_aux(path, self.aux_ch)

    @staticmethod
    def load_raw_mask(r: Record, rgb: np.ndarray) -> Optional[np.ndarray]:
        # A good image has no defect to outline: a mask file beside it (MVTec 3D-AD's empty test/good/gt, a
        # GT/good folder) is ignored; check_files refuses one that marks anything.
        mask = read_mask(r.mask) if r.mask and r.label else None
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

    def check_files(self, progress: bool = True) -> None:
        """Read every file of the split cheaply before any training step (:func:`probe_file`: headers, PNG
        checksums, TIFF extents) and check sizes and channels; raise ONE DatasetError naming every bad file."""
        from tqdm import tqdm
        n_files = sum(1 + bool(r.mask) + bool(self.aux_ch and r.aux) for r in self.records)
        bar = tqdm(self.records, desc=f"checking {n_files} files of {self.name} {self.split}", leave=False,
                   disable=not progress or n_files < self.CHECK_PROGRESS_FROM)
        problems: List[str] = []
        for r in bar:
            try:
                h, w, _ = probe_file(r.rgb)
                if r.mask:
                    mh, mw, _ = probe_file(r.mask)
                    if (mh, mw) != (h, w):
                        raise DatasetError(f"mask {r.mask} is {mw}x{mh} but its image {r.rgb} is {w}x{h}")
                    if not r.label and read_mask(r.mask).any():
                        raise DatasetError(f"mask {r.mask} marks a defect on a good image ({r.rgb}); good images "
                                           f"take no mask (remove it, or move the image to its defect's folder)")
                if self.aux_ch and r.aux:
                    ah, aw, ac = probe_file(r.aux)
                    if self.aux_file_channels is not None and ac != self.aux_file_channels:
                        raise DatasetError(f"aux file {r.aux} has {ac} channel(s), expected "
                                           f"{self.aux_file_channels}")
                    if self.aux_matches_rgb and (ah, aw) != (h, w):
                        raise DatasetError(f"aux {r.aux} is {aw}x{ah} but {r.rgb} is {w}x{h}")
            except DatasetError as exc:
                problems.append(str(exc))
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise DatasetError(f"{len(problems)} bad file(s) in the {self.split} split of {self.name}: {shown}")

    def defect_counts(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for r in self.records:
            counts[r.defect] = counts.get(r.defect, 0) + 1
        return counts


class ShiftedAux(Dataset):
    """A robustness study's view of a dataset: every sample's aux shifted right by ``dx`` pixels (sub-pixel,
    bilinear); RGB and the mask (which follows RGB) unchanged."""

    def __init__(self, base: Dataset, dx: float):
        self.base, self.dx = base, float(dx)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Dict[str, object]:
        s = dict(self.base[i])
        if s.get("aux") is not None:
            s["aux"] = translate(s["aux"], self.dx).to(s["aux"].dtype)
        return s
