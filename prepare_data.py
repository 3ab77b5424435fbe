"""Non-destructive preprocessing into a NEW folder (the source is only ever read).

    python prepare_data.py mvtec3d --src /data/mvtec_3d_anomaly_detection --dst /data/mvtec3d_prep --workers 4
    python prepare_data.py eyecandies --src /data/Eyecandies --dst /data/eyecandies_mvtec3d

mvtec3d: for every xyz TIFF, fit the background plane with RANSAC on the points of an image border band, remove
the points within --plane_dist of it, and keep the largest 8-connected component of what remains (zeros mark
removed points, as in the raw data). RGB and ground-truth files are copied unchanged. The output has the MVTec
3D-AD layout, so ``--dataset mvtec3d`` reads it. Resumable: finished files are skipped (each is written to a
temporary name and renamed, so a file that exists is complete).

eyecandies: converts Eyecandies (<Category>/{train,val,test_public}/data/<id>_image_<k>.png, <id>_depth.png,
<id>_info_depth.yaml, <id>_mask.png) into the MVTec 3D-AD layout (rgb, xyz from depth and a pinhole camera, gt;
train -> train/good, val -> validation/good, test_public -> test/{good,bad} by whether the mask is empty).
"""
from __future__ import annotations

import argparse
import os
import shutil
from functools import partial
from multiprocessing import Pool
from typing import List, Tuple

import numpy as np

# Named defaults of the background removal.
BORDER_FRACTION = 0.1       # the band of the image border whose points fit the plane
RANSAC_ITERATIONS = 300
PLANE_DIST = 0.005          # in the data's units (MVTec 3D-AD xyz: the value used by common 3D-AD pipelines)
EYECANDIES_FOCAL = 711.11   # pixels, for the 512 x 512 Eyecandies renders (override with --focal)


def _write_tiff(path: str, arr: np.ndarray) -> None:
    import tifffile
    tmp = path + ".tmp.tiff"
    tifffile.imwrite(tmp, arr.astype(np.float32), photometric="minisblack")
    os.replace(tmp, path)


def fit_plane_ransac(points: np.ndarray, dist: float, iterations: int, rng: np.random.Generator
                     ) -> Tuple[np.ndarray, float]:
    """RANSAC plane n . p + d = 0 (|n| = 1) through (M, 3) points, refined by least squares on the inliers."""
    if len(points) < 3:
        raise ValueError("fewer than 3 points to fit a plane")
    best_inl, best = None, None
    for _ in range(iterations):
        a, b, c = points[rng.choice(len(points), 3, replace=False)]
        n = np.cross(b - a, c - a)
        norm = np.linalg.norm(n)
        if norm < 1e-12:
            continue
        n /= norm
        inl = np.abs(points @ n - n @ a) < dist
        if best_inl is None or inl.sum() > best_inl.sum():
            best_inl, best = inl, (n, -n @ a)
    if best is None:
        raise ValueError("degenerate points: no plane found")
    p = points[best_inl]
    centroid = p.mean(0)
    n = np.linalg.svd(p - centroid)[2][-1]
    return n, float(-n @ centroid)


def remove_background(xyz: np.ndarray, dist: float = PLANE_DIST, border: float = BORDER_FRACTION,
                      iterations: int = RANSAC_ITERATIONS, seed: int = 0) -> np.ndarray:
    """Zero the background plane's points and everything outside the largest remaining connected component."""
    from scipy import ndimage
    H, W, _ = xyz.shape
    valid = np.any(xyz != 0, axis=2)
    b = max(1, int(round(border * min(H, W))))
    band = np.zeros((H, W), bool)
    band[:b], band[-b:], band[:, :b], band[:, -b:] = True, True, True, True
    pts = xyz[band & valid]
    out = xyz.copy()
    if len(pts) >= 3:
        n, d = fit_plane_ransac(pts.astype(np.float64), dist, iterations, np.random.default_rng(seed))
        on_plane = np.abs(xyz.reshape(-1, 3) @ n + d).reshape(H, W) < dist
        valid &= ~on_plane
    lab, k = ndimage.label(valid, structure=np.ones((3, 3), bool))
    if k > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        valid = lab == int(np.argmax(sizes))
    out[~valid] = 0
    return out


def _prepare_one(task, dist, border, iterations):
    kind, src, dst = task
    if os.path.exists(dst):
        return "skipped"
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if kind == "copy":
        tmp = dst + ".tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        return "copied"
    from datasets.mvtec3d import read_xyz
    _write_tiff(dst, remove_background(read_xyz(src), dist, border, iterations))
    return "processed"


def _check_paths(src: str, dst: str) -> None:
    if not os.path.isdir(src):
        raise SystemExit(f"--src not found: {src}")
    s, d = os.path.realpath(src), os.path.realpath(dst)
    if s == d or d.startswith(s + os.sep) or s.startswith(d + os.sep):
        raise SystemExit(f"--dst must be a new folder outside --src (got src={src}, dst={dst})")


def prepare_mvtec3d(src: str, dst: str, workers: int = 1, dist: float = PLANE_DIST, border: float = BORDER_FRACTION,
                    iterations: int = RANSAC_ITERATIONS, progress: bool = True) -> dict:
    from tqdm import tqdm
    _check_paths(src, dst)
    tasks: List[Tuple[str, str, str]] = []
    for dirpath, _, files in os.walk(src):
        for f in sorted(files):
            rel = os.path.relpath(os.path.join(dirpath, f), src)
            parts = rel.split(os.sep)
            if len(parts) >= 2 and parts[-2] == "xyz" and f.lower().endswith((".tif", ".tiff")):
                tasks.append(("xyz", os.path.join(src, rel), os.path.join(dst, rel)))
            elif len(parts) >= 2 and parts[-2] in ("rgb", "gt"):
                tasks.append(("copy", os.path.join(src, rel), os.path.join(dst, rel)))
    if not any(t[0] == "xyz" for t in tasks):
        raise SystemExit(f"no xyz TIFFs found under {src}: expected <class>/<split>/<defect>/xyz/*.tiff")
    fn = partial(_prepare_one, dist=dist, border=border, iterations=iterations)
    counts = {"processed": 0, "copied": 0, "skipped": 0}
    with Pool(workers) if workers > 1 else _Serial() as pool:
        for r in tqdm(pool.imap_unordered(fn, tasks), total=len(tasks), desc="mvtec3d", disable=not progress):
            counts[r] += 1
    return counts


class _Serial:
    """The Pool interface, in this process (for --workers 1)."""
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    @staticmethod
    def imap_unordered(fn, items):
        return map(fn, items)


def _eyecandies_depth(data_dir: str, sid: str) -> np.ndarray:
    import yaml
    from datasets.transforms import DatasetError, read_image
    raw = read_image(os.path.join(data_dir, f"{sid}_depth.png")).astype(np.float64)
    info_path = os.path.join(data_dir, f"{sid}_info_depth.yaml")
    try:
        with open(info_path) as fh:
            info = yaml.safe_load(fh)
        lo, hi = float(info["normalization"]["min"]), float(info["normalization"]["max"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as exc:
        raise DatasetError(f"cannot read the depth range from {info_path} (expected normalization: min, max): "
                           f"{exc}") from exc
    return lo + raw / 65535.0 * (hi - lo)


def prepare_eyecandies(src: str, dst: str, focal: float = EYECANDIES_FOCAL, light: int = 0,
                       progress: bool = True) -> dict:
    from PIL import Image
    from tqdm import tqdm
    from datasets.transforms import read_image
    _check_paths(src, dst)
    split_map = {"train": "train", "val": "validation", "test_public": "test"}
    counts = {"converted": 0, "skipped": 0}
    cats = sorted(c for c in os.listdir(src) if os.path.isdir(os.path.join(src, c)))
    jobs = []
    for cat in cats:
        for s_src, s_dst in split_map.items():
            data_dir = os.path.join(src, cat, s_src, "data")
            if not os.path.isdir(data_dir):
                continue
            ids = sorted(f[: -len(f"_image_{light}.png")] for f in os.listdir(data_dir)
                         if f.endswith(f"_image_{light}.png"))
            jobs += [(cat, s_dst, data_dir, sid) for sid in ids]
    if not jobs:
        raise SystemExit(f"no Eyecandies samples under {src}: expected <Category>/<split>/data/<id>_image_{light}.png")
    for cat, split, data_dir, sid in tqdm(jobs, desc="eyecandies", disable=not progress):
        mask_path = os.path.join(data_dir, f"{sid}_mask.png")
        mask = read_image(mask_path) > 0 if os.path.isfile(mask_path) else None
        if mask is not None and mask.ndim == 3:
            mask = mask.any(2)
        defect = "good" if split != "test" or mask is None or not mask.any() else "bad"
        out = os.path.join(dst, cat, split, defect)
        if os.path.exists(os.path.join(out, "xyz", f"{sid}.tiff")):
            counts["skipped"] += 1
            continue
        for sub in ("rgb", "xyz") + (("gt",) if split == "test" else ()):
            os.makedirs(os.path.join(out, sub), exist_ok=True)
        shutil.copyfile(os.path.join(data_dir, f"{sid}_image_{light}.png"), os.path.join(out, "rgb", f"{sid}.png"))
        z = _eyecandies_depth(data_dir, sid)
        H, W = z.shape
        v, u = np.mgrid[0:H, 0:W].astype(np.float64)
        xyz = np.stack([(u - W / 2) * z / focal, (v - H / 2) * z / focal, z], axis=-1)
        if split == "test":
            m = mask if mask is not None else np.zeros((H, W), bool)
            Image.fromarray((m * 255).astype(np.uint8)).save(os.path.join(out, "gt", f"{sid}.png"))
        _write_tiff(os.path.join(out, "xyz", f"{sid}.tiff"), xyz)   # last: its presence marks the sample done
        counts["converted"] += 1
    return counts


def get_args_parser():
    p = argparse.ArgumentParser("MambaAlign data preparation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("mvtec3d", help="background-plane removal for MVTec 3D-AD into a new tree")
    m.add_argument("--src", required=True, help="the raw MVTec 3D-AD root (read only)")
    m.add_argument("--dst", required=True, help="a new folder for the preprocessed tree")
    m.add_argument("--workers", type=int, default=1, help="parallel processes")
    m.add_argument("--plane_dist", type=float, default=PLANE_DIST,
                   help="points closer than this to the fitted plane are background (data units)")
    m.add_argument("--border", type=float, default=BORDER_FRACTION,
                   help="fraction of the image size forming the border band used to fit the plane")
    m.add_argument("--iterations", type=int, default=RANSAC_ITERATIONS, help="RANSAC iterations")
    e = sub.add_parser("eyecandies", help="convert Eyecandies to the MVTec 3D-AD layout")
    e.add_argument("--src", required=True, help="the Eyecandies root (read only)")
    e.add_argument("--dst", required=True, help="a new folder for the converted tree")
    e.add_argument("--focal", type=float, default=EYECANDIES_FOCAL, help="camera focal length in pixels")
    e.add_argument("--light", type=int, default=0, help="which of the lighting images (<id>_image_<k>.png) is RGB")
    return p


def main(args) -> dict:
    if args.what == "mvtec3d":
        counts = prepare_mvtec3d(args.src, args.dst, args.workers, args.plane_dist, args.border, args.iterations)
    else:
        counts = prepare_eyecandies(args.src, args.dst, args.focal, args.light)
    print(f"{args.what}: {counts} -> {args.dst}")
    return counts


if __name__ == "__main__":
    main(get_args_parser().parse_args())
