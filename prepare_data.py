"""Non-destructive preprocessing into a NEW folder (the source is only ever read).

    python prepare_data.py mvtec3d --src /data/mvtec_3d_anomaly_detection --dst /data/mvtec3d_prep --workers 4
    python prepare_data.py eyecandies --src /data/Eyecandies --dst /data/eyecandies_mvtec3d

mvtec3d: for every xyz TIFF, fit the background plane with open3d's RANSAC (``segment_plane``) on the points of an
image border band, remove the points within --plane_dist of it, and keep the largest 8-connected component of what
remains (zeros mark removed points, as in the raw data: pointcloud.remove_background); then cache, beside the xyz
folder, what loading would otherwise recompute on every read: unit normals (``normals/<n>.npz``) and, with --fpfh,
the FPFH point features on a grid (``fpfh/<n>.npz``, for ``train.py --model knn --aux_feature fpfh``). RGB and
ground-truth files are copied unchanged. The output has the MVTec 3D-AD layout, so ``--dataset mvtec3d`` reads it.
Resumable: finished files are skipped (each is written to a temporary name and renamed, so a file that exists is
complete). A file that cannot be read is named at the end; the rest is prepared.

eyecandies: converts Eyecandies (<Category>/{train,val,test_public}/data/<id>_image_<k>.png, <id>_depth.png,
<id>_info_depth.yaml, <id>_mask.png) into the MVTec 3D-AD layout (rgb, xyz from depth and a pinhole camera, gt;
train -> train/good, val -> validation/good, test_public -> test/{good,bad} by whether the mask is empty).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
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
    try:
        tifffile.imwrite(tmp, arr.astype(np.float32), photometric="minisblack")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_background(xyz: np.ndarray, dist: float = PLANE_DIST, border: float = BORDER_FRACTION,
                      iterations: int = RANSAC_ITERATIONS, seed: int = 0) -> np.ndarray:
    """The background plane and everything outside the largest component of an organised cloud zeroed
    (pointcloud.remove_background: open3d's segment_plane on the border band)."""
    from pointcloud import remove_background as remove
    return remove(xyz, dist, border, iterations, seed)


def _prepare_xyz(src: str, dst: str, dist, border, iterations, fpfh: bool) -> str:
    """One xyz file: background removed into ``dst``, normals (and FPFH) cached beside it. Returns "processed"
    or "skipped" (already done); a bad file raises DatasetError naming it."""
    from datasets.mvtec3d import cache_is_current, cache_path, fpfh_grid_of, read_xyz, write_cache
    from datasets.transforms import normals_from_xyz
    caches = [("normals", cache_path(dst, "normals"))] + ([("fpfh", cache_path(dst, "fpfh"))] if fpfh else [])
    if os.path.exists(dst) and all(cache_is_current(c, kind) for kind, c in caches):
        return "skipped"
    xyz = read_xyz(dst) if os.path.exists(dst) else remove_background(read_xyz(src), dist, border, iterations)
    for kind, cache in caches:
        if cache_is_current(cache, kind):
            continue
        if kind == "normals":
            write_cache(cache, *normals_from_xyz(xyz, dst), kind="normals")
        else:
            write_cache(cache, *fpfh_grid_of(xyz), image_hw=xyz.shape[:2], kind="fpfh")
    if not os.path.exists(dst):
        _write_tiff(dst, xyz)        # last: its presence (with the caches) marks the sample done
    return "processed"


def _prepare_one(task, dist, border, iterations, fpfh):
    """(result, problem): a bad file is reported, never raised, so one file cannot stop the others."""
    from datasets.transforms import DatasetError
    kind, src, dst = task
    try:
        if kind == "xyz":
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            return _prepare_xyz(src, dst, dist, border, iterations, fpfh), None
        if os.path.exists(dst):
            return "skipped", None
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = dst + ".tmp"
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return "copied", None
    except (DatasetError, OSError, ValueError) as exc:
        return "failed", f"{src}: {' '.join(str(exc).split())}"


def _check_paths(src: str, dst: str) -> None:
    if not os.path.isdir(src):
        raise SystemExit(f"--src not found: {src}")
    s, d = os.path.realpath(src), os.path.realpath(dst)
    if s == d or d.startswith(s + os.sep) or s.startswith(d + os.sep):
        raise SystemExit(f"--dst must be a new folder outside --src (got src={src}, dst={dst})")


def prepare_mvtec3d(src: str, dst: str, workers: int = 1, dist: float = PLANE_DIST, border: float = BORDER_FRACTION,
                    iterations: int = RANSAC_ITERATIONS, progress: bool = True, fpfh: bool = False) -> dict:
    """Prepare every file (see the module docstring). Returns the counts and, under "failed", the problems:
    every file that could not be prepared, named (the rest is done; run again to resume)."""
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
    fn = partial(_prepare_one, dist=dist, border=border, iterations=iterations, fpfh=fpfh)
    counts, failed = {"processed": 0, "copied": 0, "skipped": 0}, []
    with Pool(workers) if workers > 1 else _Serial() as pool:
        for r, problem in tqdm(pool.imap_unordered(fn, tasks), total=len(tasks), desc="mvtec3d",
                               disable=not progress):
            if problem:
                failed.append(problem)
            else:
                counts[r] += 1
    if failed:
        counts["failed"] = sorted(failed)
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
    m.add_argument("--fpfh", action="store_true",
                   help="also cache FPFH point features (for train.py --model knn --aux_feature fpfh; about half a "
                        "second per cloud)")
    e = sub.add_parser("eyecandies", help="convert Eyecandies to the MVTec 3D-AD layout")
    e.add_argument("--src", required=True, help="the Eyecandies root (read only)")
    e.add_argument("--dst", required=True, help="a new folder for the converted tree")
    e.add_argument("--focal", type=float, default=EYECANDIES_FOCAL, help="camera focal length in pixels")
    e.add_argument("--light", type=int, default=0, help="which of the lighting images (<id>_image_<k>.png) is RGB")
    return p


def main(args) -> dict:
    if args.what == "mvtec3d":
        counts = prepare_mvtec3d(args.src, args.dst, args.workers, args.plane_dist, args.border, args.iterations,
                                 fpfh=args.fpfh)
    else:
        counts = prepare_eyecandies(args.src, args.dst, args.focal, args.light)
    failed = counts.pop("failed", [])
    print(f"{args.what}: {counts} -> {args.dst}")
    if failed:
        for f in failed:
            print(f"  could not prepare {f}", file=sys.stderr)
        from engine import RunError
        raise RunError(f"{len(failed)} file(s) could not be prepared (named above; the rest is done): fix or remove "
                       f"them and run the same command again to finish")
    return counts


if __name__ == "__main__":
    from engine import run_cli
    run_cli(main, get_args_parser(),
            on_interrupt=lambda args: "every finished file is kept whole; run the same command again to resume")
