"""MVTec 3D-AD (and Eyecandies after ``prepare_data.py eyecandies``), raw or preprocessed:

    <root>/<class>/{train,validation,test}/<defect>/rgb/<n>.png
    <root>/<class>/{train,validation,test}/<defect>/xyz/<n>.tiff     organised H x W x 3 points, zeros = missing
    <root>/<class>/test/<defect>/gt/<n>.png
    <root>/<class>/<split>/<defect>/{normals,fpfh}/<n>.npz            caches written by prepare_data.py (optional)

aux_ch 3: unit normals from neighbouring points; aux_ch 1: depth (the z coordinate); aux_ch 33: FPFH point features
on a grid (pointcloud.fpfh_grid, BTF's geometry features: ``train.py --model knn --aux_feature fpfh``); aux_ch 36:
normals then FPFH (MambaAlign with an FPFH memory bank: ``train.py --aux_feature fpfh``; ``xyz_at`` gives the
training anomalies the points to displace). ``valid``
is False where points are missing (and, for normals, where a point has no neighbour along an axis). Normals and
FPFH come from prepare_data.py's caches beside the xyz folder where they exist (a prepared 400x400 sample loads in
milliseconds), else they are computed from the xyz file on every read (FPFH: about half a second per cloud).
"""
from __future__ import annotations

import os
import warnings
from typing import List, Optional, Tuple

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


# FPFH is computed on this many cells per side of the image (then read at full resolution by nearest cell).
FPFH_GRID = 128


def cache_path(xyz_path: str, kind: str) -> Optional[str]:
    """Where prepare_data.py caches ``kind`` ("normals", "fpfh") of an xyz file: a sibling folder of its xyz
    folder, same stem, .npz. None for an unknown kind."""
    if not kind:
        return None
    folder, name = os.path.split(xyz_path)
    return os.path.join(os.path.dirname(folder), kind, os.path.splitext(name)[0] + ".npz")


# The version of what each cache kind holds; a cache of another version is stale (computed by an earlier rule:
# normals v1 left the border and the pixels beside missing points without a normal, see normals_from_xyz).
CACHE_VERSIONS = {"normals": 2, "fpfh": 1}


def cache_is_current(path: str, kind: str) -> bool:
    """Whether the cache file at ``path`` exists and holds ``kind`` at its current version (files without a
    version are version 1)."""
    if not os.path.isfile(path):
        return False
    try:
        with np.load(path) as z:
            version = int(z["version"]) if "version" in z.files else 1
    except (OSError, ValueError, EOFError):
        return False
    return version == CACHE_VERSIONS[kind]


def write_cache(path: str, values: np.ndarray, valid: np.ndarray, image_hw: Optional[Tuple[int, int]] = None,
                kind: str = "normals") -> None:
    """An (h, w, C) float16 map and its (h, w) valid mask, written whole (temporary name, then renamed) with the
    current version of ``kind``; a map on a coarser grid than its image (FPFH) records the image's (H, W) to be
    read back at that size."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}.npz"
    hw = np.asarray(image_hw if image_hw is not None else valid.shape, dtype=np.int64)
    try:
        np.savez(tmp, values=values.astype(np.float16), valid=valid.astype(bool), image_hw=hw,
                 version=np.int64(CACHE_VERSIONS[kind]))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_STALE_WARNED = set()


def _warn_stale_cache(path: str, kind: str) -> None:
    """Once per folder: a stale cache is not used (its values were computed by an earlier rule); the values are
    computed from the xyz file instead, as without a cache."""
    folder = os.path.dirname(path)
    if folder not in _STALE_WARNED:
        _STALE_WARNED.add(folder)
        warnings.warn(f"{folder}: {kind} caches written by an earlier prepare_data.py are not used; they are computed "
                      f"from the xyz files instead (slower). Run prepare_data.py again with the same --dst to "
                      f"refresh them.", stacklevel=2)


def read_cache(path: str, source: str) -> Tuple[np.ndarray, np.ndarray]:
    """(values (H, W, C) float32, valid (H, W)) of a cache file at its image's size; a bad one is a DatasetError
    naming it."""
    try:
        with np.load(path) as z:
            values, valid = z["values"].astype(np.float32), z["valid"].astype(bool)
            H, W = (int(v) for v in z["image_hw"])
    except (OSError, KeyError, ValueError, EOFError) as exc:
        raise DatasetError(f"cannot read the cache {path} of {source} ({exc}); delete it to recompute") from None
    if values.shape[:2] != valid.shape:
        raise DatasetError(f"cache {path} of {source} is inconsistent: {values.shape} values, {valid.shape} mask")
    return _to_image(values, valid, H, W)


def _to_image(values: np.ndarray, valid: np.ndarray, H: int, W: int) -> Tuple[np.ndarray, np.ndarray]:
    """A (h, w, C) grid read at (H, W): each pixel takes its grid cell's values."""
    h, w = valid.shape
    if (h, w) == (H, W):
        return values, valid
    rows, cols = np.arange(H) * h // H, np.arange(W) * w // W
    return values[rows][:, cols], valid[rows][:, cols]


def fpfh_grid_of(xyz: np.ndarray, grid: int = FPFH_GRID, voxel: Optional[float] = None
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """FPFH of an organised cloud on a grid of at most ``grid`` cells per side (pointcloud.fpfh_grid)."""
    from pointcloud import fpfh_grid
    return fpfh_grid(xyz, min(grid, *xyz.shape[:2]), voxel)


def fpfh_full_res(xyz: np.ndarray, grid: int = FPFH_GRID, voxel: Optional[float] = None
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """FPFH of an organised cloud at the cloud's own H x W (each pixel its grid cell's features), valid mask;
    ``voxel``: pointcloud.fpfh_features' down-sampling voxel (None: from the cloud's extent)."""
    f, v = _to_image(*fpfh_grid_of(xyz, grid, voxel), *xyz.shape[:2])
    return f, v & np.any(xyz != 0, axis=2)


def _current_cache(path: str, kind: str) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """prepare_data.py's cache of ``kind`` for the xyz file ``path`` where it exists and is current, else None
    (a stale one is warned about once per folder)."""
    cached = cache_path(path, kind)
    if not os.path.isfile(cached):
        return None
    if cache_is_current(cached, kind):
        return read_cache(cached, path)
    _warn_stale_cache(cached, kind)
    return None


class MVTec3D(AnomalyDataset):
    aux_kinds = GEOMETRY_AUX_KIND
    AUX_CHOICES = (3, 1, 0, 33, 36)
    AUX_WHAT = "normals (aux_ch=3), depth (1), FPFH (33), normals + FPFH (36) or RGB only (0)"
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

    def points(self, i: int) -> np.ndarray:
        return read_xyz(self.records[i].aux)

    @classmethod
    def read_aux(cls, path, aux_ch):
        kinds = {3: ("normals",), 33: ("fpfh",), 36: ("normals", "fpfh")}.get(aux_ch, ())
        parts = {k: _current_cache(path, k) for k in kinds}
        # The xyz file is read once, and only when a part has no current cache.
        xyz = read_xyz(path) if not kinds or any(v is None for v in parts.values()) else None
        if "normals" in parts and parts["normals"] is None:
            parts["normals"] = normals_from_xyz(xyz, path)
        if "fpfh" in parts and parts["fpfh"] is None:
            parts["fpfh"] = fpfh_full_res(xyz)
        if not kinds:
            z = xyz[..., 2]
            return z[..., None], z > 0
        values, valids = zip(*(parts[k] for k in kinds))
        # normals + FPFH (36): side by side, valid where both are
        return np.concatenate(values, axis=2), np.logical_and.reduce(valids)
