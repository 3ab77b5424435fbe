"""Point clouds and meshes as geometry, through open3d: reading, background plane, normals, FPFH.

* ``read_points(path)``: (N, 3) points of an organised xyz TIFF (MVTec 3D-AD, Eyecandies after preparation: the
  valid pixels), an unorganised cloud (``.ply``, ``.pcd``, ``.xyz``) or a mesh (``.stl``, ``.obj``, a ``.ply`` with
  faces), meshes sampled uniformly to ``MESH_POINTS`` points (seeded).
* ``remove_background(xyz)``: an organised cloud's background plane, fitted with open3d's ``segment_plane`` on the
  image border band, removed with every point within ``dist`` of it, and only the largest connected component
  kept (prepare_data.py; zeros mark removed points, as in the raw data).
* ``fpfh_features(points)``: Fast Point Feature Histograms (Rusu et al. 2009; open3d's ``compute_fpfh_feature``,
  33 bins) on a voxel-down-sampled copy of the cloud, with normals from the same neighbourhoods, read back onto
  every input point from its nearest down-sampled point. Neighbourhood sizes scale with the cloud: the voxel is
  the bounding-box diagonal / ``VOXEL_DIVISIONS`` (clouds in millimetres, metres or pixels get the same
  treatment), normals use ``NORMAL_RADIUS`` voxels, FPFH ``FPFH_RADIUS`` voxels (BTF's 2.5x ratio).
* ``fpfh_grid(xyz, size)``: FPFH of an organised cloud mapped onto a (size, size) pixel grid, averaged over the
  valid pixels of each cell; cells without points are invalid. This is the 33-channel "fpfh" aux modality the
  memory bank reads (``train.py --model knn --aux_feature fpfh``, BTF's geometry half).
* ``PointCloudBank``: an object-level score for clouds with no pixel registration (MulSen-AD's separate 3D
  scanner): a greedy coreset of the FPFH features of the train clouds; a cloud's score is the largest
  nearest-neighbour distance of its points' features (smoothed over ``SCORE_NEIGHBOURS`` points), standardised
  on held-out train clouds.

open3d is imported on first use: where it cannot be imported, ``Open3DMissing`` (a DatasetError) says so in one
line, naming the package, and everything that does not read point clouds still runs. open3d-cpu's wheel links
libusb-1.0, which minimal systems lack; the ``libusb-package`` wheel provides it and is loaded first.
"""
from __future__ import annotations

import glob
import logging
import os
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from datasets.transforms import DatasetError

logger = logging.getLogger(__name__)

__all__ = ["Open3DMissing", "open3d", "read_points", "remove_background", "fpfh_features", "fpfh_grid",
           "PointCloudBank", "CLOUD_EXTENSIONS", "MESH_EXTENSIONS", "FPFH_DIM", "write_ply_scores"]

CLOUD_EXTENSIONS = (".ply", ".pcd", ".xyz", ".xyzn", ".pts")
MESH_EXTENSIONS = (".stl", ".obj", ".off", ".gltf", ".glb")
FPFH_DIM = 33
MESH_POINTS = 20000          # points sampled uniformly from a mesh surface
VOXEL_DIVISIONS = 100        # the down-sampling voxel: bounding-box diagonal / this
NORMAL_RADIUS = 2.0          # normal estimation radius, in voxels
FPFH_RADIUS = 5.0            # FPFH radius, in voxels (BTF: 0.25 vs 0.1 of its voxel-size units: 2.5x normals)
MAX_NN = 100                 # neighbour cap of both searches
PLANE_DIST = 0.005           # background plane: inlier distance (MVTec 3D-AD xyz units)
PLANE_ITERATIONS = 300
BORDER_FRACTION = 0.1        # the image border band the plane is fitted on
SCORE_NEIGHBOURS = 16        # a cloud's point scores are averaged over this many nearest points before the max


class Open3DMissing(DatasetError):
    """open3d cannot be imported: point-cloud options need it (the message names the package)."""


_o3d = None


def open3d():
    """The open3d module, imported once (libusb from the libusb-package wheel loaded first where the system has
    none). Raises Open3DMissing with one line naming the package."""
    global _o3d
    if _o3d is not None:
        return _o3d
    try:
        import ctypes
        import libusb_package
        for lib in glob.glob(os.path.join(os.path.dirname(libusb_package.__file__), "libusb*.so*")):
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    except (ImportError, OSError):
        pass                 # the system's libusb, if any, is found by the loader as usual
    try:
        import open3d as o3d
    except (ImportError, OSError) as exc:
        raise Open3DMissing(f"point clouds need open3d, which does not import here ({exc}); pip install "
                            f"open3d-cpu (or open3d), or run without the point-cloud options") from None
    o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)
    _o3d = o3d
    return o3d


# --------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------

def read_points(path: str, mesh_points: int = MESH_POINTS, seed: int = 0) -> np.ndarray:
    """(N, 3) float64 points of a point-cloud or mesh file (see the module docstring). Raises DatasetError
    naming the file when it is missing, unreadable or empty."""
    if not os.path.isfile(path):
        raise DatasetError(f"point cloud not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".tif", ".tiff"):
        from datasets.mvtec3d import read_xyz
        xyz = read_xyz(path).reshape(-1, 3).astype(np.float64)
        pts = xyz[np.any(xyz != 0, axis=1)]
    else:
        o3d = open3d()
        pts = None
        if ext in MESH_EXTENSIONS or ext == ".ply":
            mesh = o3d.io.read_triangle_mesh(path)
            if len(mesh.triangles):
                o3d.utility.random.seed(seed)
                pts = np.asarray(mesh.sample_points_uniformly(mesh_points).points)
            elif ext in MESH_EXTENSIONS:
                raise DatasetError(f"cannot read mesh {path}: no triangles (truncated or not a mesh file)")
        if pts is None:
            if ext not in CLOUD_EXTENSIONS:
                kinds = ", ".join(CLOUD_EXTENSIONS + MESH_EXTENSIONS + (".tiff",))
                raise DatasetError(f"{path}: not a point-cloud or mesh file ({kinds})")
            pts = np.asarray(o3d.io.read_point_cloud(path).points)
    pts = pts[np.isfinite(pts).all(axis=1)]
    if len(pts) < 10:
        raise DatasetError(f"cannot read point cloud {path}: {len(pts)} valid points")
    return pts.astype(np.float64)


def _cloud(points: np.ndarray):
    o3d = open3d()
    return o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.ascontiguousarray(points, dtype=np.float64)))


# --------------------------------------------------------------------------------------------------------
# Background plane
# --------------------------------------------------------------------------------------------------------

def fit_plane(points: np.ndarray, dist: float = PLANE_DIST, iterations: int = PLANE_ITERATIONS,
              seed: int = 0) -> Tuple[np.ndarray, float]:
    """(n, d): the plane n . p + d = 0 (|n| = 1) through (M, 3) points, by open3d's RANSAC (segment_plane, seeded),
    refined by least squares on its inliers."""
    if len(points) < 3:
        raise ValueError("fewer than 3 points to fit a plane")
    o3d = open3d()
    o3d.utility.random.seed(seed)
    model, inliers = _cloud(points).segment_plane(dist, 3, iterations)
    p = points[np.asarray(inliers)]
    centroid = p.mean(0)
    n = np.linalg.svd(p - centroid, full_matrices=False)[2][-1]     # (a full U would be M x M)
    return n, float(-n @ centroid)


def remove_background(xyz: np.ndarray, dist: float = PLANE_DIST, border: float = BORDER_FRACTION,
                      iterations: int = PLANE_ITERATIONS, seed: int = 0) -> np.ndarray:
    """An organised cloud (H, W, 3) with the background plane's points, and everything outside the largest
    remaining 8-connected component, set to zero (missing)."""
    from scipy import ndimage
    H, W, _ = xyz.shape
    valid = np.any(xyz != 0, axis=2)
    b = max(1, int(round(border * min(H, W))))
    band = np.zeros((H, W), bool)
    band[:b], band[-b:], band[:, :b], band[:, -b:] = True, True, True, True
    pts = xyz[band & valid].astype(np.float64)
    out = xyz.copy()
    if len(pts) >= 3:
        n, d = fit_plane(pts, dist, iterations, seed)
        valid &= ~(np.abs(xyz.reshape(-1, 3) @ n + d).reshape(H, W) < dist)
    lab, k = ndimage.label(valid, structure=np.ones((3, 3), bool))
    if k > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        valid = lab == int(np.argmax(sizes))
    out[~valid] = 0
    return out


# --------------------------------------------------------------------------------------------------------
# FPFH
# --------------------------------------------------------------------------------------------------------

def voxel_size(points: np.ndarray) -> float:
    """The down-sampling voxel for a cloud: its bounding-box diagonal / VOXEL_DIVISIONS."""
    return float(np.linalg.norm(points.max(0) - points.min(0))) / VOXEL_DIVISIONS or 1.0


def fpfh_features(points: np.ndarray, voxel: Optional[float] = None) -> np.ndarray:
    """(N, 33) FPFH of every point of (N, 3) ``points`` (see the module docstring), float32."""
    o3d = open3d()
    voxel = voxel or voxel_size(points)
    down = _cloud(points).voxel_down_sample(voxel)
    down.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=NORMAL_RADIUS * voxel, max_nn=MAX_NN))
    down.orient_normals_towards_camera_location(np.zeros(3))
    feat = o3d.pipelines.registration.compute_fpfh_feature(
        down, o3d.geometry.KDTreeSearchParamHybrid(radius=FPFH_RADIUS * voxel, max_nn=MAX_NN))
    f = np.asarray(feat.data).T.astype(np.float32)                    # (n_down, 33)
    from scipy.spatial import cKDTree
    _, nearest = cKDTree(np.asarray(down.points)).query(points, k=1)
    return f[nearest]


def fpfh_grid(xyz: np.ndarray, size: int, voxel: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray]:
    """An organised cloud (H, W, 3), zeros = missing, as FPFH on a (size, size) grid: (size, size, 33) float32, the
    mean FPFH of the valid pixels in each cell, and (size, size) bool: cells with at least one point."""
    H, W, _ = xyz.shape
    valid = np.any(xyz != 0, axis=2) & np.isfinite(xyz).all(axis=2)
    out = np.zeros((size, size, FPFH_DIM), np.float32)
    if valid.sum() < 10:
        return out, np.zeros((size, size), bool)
    f = fpfh_features(xyz[valid].astype(np.float64), voxel)
    rows, cols = np.nonzero(valid)
    cell = (rows * size // H) * size + cols * size // W
    sums = np.zeros((size * size, FPFH_DIM), np.float64)
    np.add.at(sums, cell, f)
    counts = np.bincount(cell, minlength=size * size)
    has = counts > 0
    sums[has] /= counts[has, None]
    return sums.reshape(size, size, FPFH_DIM).astype(np.float32), has.reshape(size, size)


# --------------------------------------------------------------------------------------------------------
# Object-level scores of clouds without pixel registration
# --------------------------------------------------------------------------------------------------------

class PointCloudBank:
    """FPFH memory bank of train clouds -> an object-level anomaly score per cloud (see the module docstring).
    ``state()`` / ``from_state()`` travel inside a checkpoint (tensors and plain values only)."""

    def __init__(self, coreset_size: int = 4096, seed: int = 0):
        self.coreset_size, self.seed = coreset_size, seed
        self.bank = torch.zeros(0, FPFH_DIM)
        self.stats = torch.tensor([0.0, 1.0])

    def point_scores(self, points: np.ndarray) -> np.ndarray:
        """(N,) each point's FPFH distance to the bank, averaged over its SCORE_NEIGHBOURS nearest points."""
        from knn import nearest_distance
        from scipy.spatial import cKDTree
        if self.bank.shape[0] == 0:
            raise RuntimeError("the point-cloud bank is empty: fit it first")
        d = nearest_distance(torch.from_numpy(fpfh_features(points)), self.bank).numpy()
        k = min(SCORE_NEIGHBOURS, len(points))
        _, nb = cKDTree(points).query(points, k=k)
        return d[nb.reshape(len(points), k)].mean(1)

    def raw_score(self, points: np.ndarray) -> float:
        return float(self.point_scores(points).max())

    def standardise(self, raw: float) -> float:
        """A raw object score (the largest of ``point_scores``) on the held-out clouds' scale (0: typical)."""
        return (raw - float(self.stats[0])) / float(self.stats[1])

    def score(self, points: np.ndarray) -> float:
        """The cloud's standardised object score (0 is a typical held-out train cloud)."""
        return self.standardise(self.raw_score(points))

    def fit(self, train_clouds, held_clouds, progress=None) -> Dict[str, float]:
        """Bank from the train clouds' FPFH (greedy coreset), standardisation on the held-out clouds' scores.
        Clouds are (N, 3) arrays or file paths."""
        from knn import greedy_coreset
        wrap = progress or (lambda it, **k: it)
        load = lambda c: read_points(c) if isinstance(c, str) else c
        feats = [torch.from_numpy(fpfh_features(load(c))) for c in wrap(train_clouds, desc="point clouds: FPFH")]
        rows = torch.cat(feats)
        self.bank = rows[greedy_coreset(rows, self.coreset_size, projection_dim=0, seed=self.seed)].contiguous()
        raw = np.array([self.raw_score(load(c)) for c in wrap(held_clouds, desc="point clouds: held-out")])
        if len(raw) < 2:
            raise ValueError("standardising the point-cloud scores needs at least 2 held-out clouds")
        self.stats = torch.tensor([raw.mean(), max(raw.std(ddof=1), 1e-6)], dtype=torch.float32)
        return {"bank": int(self.bank.shape[0]), "from_points": int(rows.shape[0]), "mean": float(self.stats[0]),
                "std": float(self.stats[1])}

    def state(self) -> dict:
        return {"bank": self.bank, "stats": self.stats, "coreset_size": self.coreset_size, "seed": self.seed}

    @classmethod
    def from_state(cls, state: dict) -> "PointCloudBank":
        bank = cls(int(state["coreset_size"]), int(state["seed"]))
        bank.bank, bank.stats = state["bank"].float(), state["stats"].float()
        return bank


def write_ply_scores(path: str, points: np.ndarray, scores: np.ndarray) -> None:
    """A coloured .ply: each point coloured by its score (viridis over the cloud's own range)."""
    from datasets.transforms import colormap
    o3d = open3d()
    s = (scores - scores.min()) / max(float(scores.max() - scores.min()), 1e-12)
    pcd = _cloud(points)
    pcd.colors = o3d.utility.Vector3dVector(colormap(s[None, :])[0].astype(np.float64) / 255.0)
    tmp = f"{path}.tmp.{os.getpid()}.ply"
    try:
        if not o3d.io.write_point_cloud(tmp, pcd):
            raise DatasetError(f"could not write {path}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
