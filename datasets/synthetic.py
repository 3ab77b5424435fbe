"""A procedural multimodal object dataset: the embedded default that runs with no download.

Each sample is an object on a grey table, seen from above by an RGB camera and a registered depth sensor:
  * object types (``OBJECT_TYPES``): ``tile`` (a bevelled textured square plate), ``disc`` (a spherical cap),
    ``ring`` (a torus); pose (position, rotation, scale), colour and texture vary per sample;
  * geometry: a height map h (pixels) -> exact depth (``TABLE_DEPTH - h``) and normals
    n = normalise(-dh/dx, -dh/dy, -1) (camera frame, pointing at the camera, as everywhere in this repo);
  * RGB: albedo x Lambert shading of the DEFECT-FREE geometry under a fixed light.

Test defects, each with an exact mask, from families the training synthesis (``datasets.synthesis``) never
draws, so the test split does not measure the synthesiser against itself. Training anomalies are Perlin-noise
blobs (at least MIN_MASK_FRACTION of the image, cells of >= 8 px) filled with textures or discolourations, and
SMOOTH domes and plateaus (steepest slope at most NORMAL_BUMP_SLOPE[1], about 50 degrees). The test defects:
  * ``pit``       geometry-only: a sharp-walled pit (a step down, vertical walls, steeper than any training
                  bump) in a small irregular polygon; RGB is the defect-free render, so only depth/normals show it;
  * ``scratch``   both: a straight, sharp-walled groove 1-2 px wide; RGB shades the scratched geometry (no
                  albedo change), so it shows in RGB only through its shading;
  * ``hairline``  RGB-only: a 1 px line of changed albedo, thinner than any training mask;
  * ``specular``  RGB-only: a tiny saturated highlight, smaller than the smallest training mask;
  * ``good``      no defect.

Everything is a deterministic function of (seed, split, index). ``write_mvtec3d_tree`` writes the dataset as an
MVTec 3D-AD tree (rgb PNG, xyz TIFF from a pinhole camera, gt PNG) and ``write_mulsen_tree`` as a MulSen-AD tree
(RGB, Infrared, Pointcloud/*.stl meshes of the part), so the same files exercise the real loaders.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import numpy as np
from scipy import ndimage

from .base import AnomalyDataset, Record
from .transforms import GEOMETRY_AUX_KIND, DatasetError, to_hw

__all__ = ["OBJECT_TYPES", "DEFECT_TYPES", "render_sample", "SyntheticDataset", "write_mvtec3d_tree",
           "write_mulsen_tree", "height_mesh", "write_stl", "depth_to_xyz", "TABLE_DEPTH", "FOCAL"]

OBJECT_TYPES = ("disc", "ring", "tile")
DEFECT_TYPES = ("pit", "scratch", "hairline", "specular")
# Written xyz: a pinhole camera with focal length = table distance, so one pixel spans one height unit at the
# table and the view is nearly orthographic (objects are < 1% of the distance tall), like the renderer.
TABLE_DEPTH = 10000.0
FOCAL = 10000.0
TEXTURE_HEIGHT = 0.004       # the fine surface texture: height noise of this std (fraction of the image side)
PIT_RADIUS = (0.03, 0.06)       # pit: polygon radius, fraction of the image side ...
PIT_DEPTH = (0.03, 0.05)        # ... and depth (a step: walls are vertical)
SCRATCH_LENGTH = (0.2, 0.4)     # scratch: straight segment length, fraction of the side ...
SCRATCH_DEPTH = (0.02, 0.035)   # ... and groove depth
HAIRLINE_LENGTH = (0.2, 0.45)   # hairline: 1 px wide line length, fraction of the side
SPECULAR_RADIUS = (0.012, 0.02)  # specular spot radius, fraction of the side (area < 0.2 % of the image)
LIGHT = np.array([-0.4, -0.5, -0.77])  # direction towards the light (camera frame), roughly from the camera
DEFAULT_COUNTS = {"train": 160, "test_good": 16, "test_defect": 16}
RENDER_CACHE_MB = 2048       # rendered samples kept per dataset object (oldest dropped first)
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


def _smooth_noise(rng: np.random.Generator, H: int, W: int, sigma: float) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal((H, W)), sigma, mode="wrap")
    return n / (n.std() + 1e-8)


def _object_geometry(obj: str, H: int, W: int, rng: np.random.Generator):
    """Height map (pixels) and object mask for one pose of object type `obj`."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    s = min(H, W)
    cy, cx = H / 2 + rng.uniform(-0.08, 0.08) * H, W / 2 + rng.uniform(-0.08, 0.08) * W
    scale = rng.uniform(0.8, 1.0)
    theta = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    if obj == "tile":
        half = 0.3 * s * scale
        d = np.maximum(np.abs(u), np.abs(v))
        h = 0.06 * s * np.clip((half - d) / (0.05 * s), 0, 1)   # plateau with a bevel
        inside = d < half
    elif obj == "disc":
        R = 0.33 * s * scale
        r2 = u ** 2 + v ** 2
        h = np.where(r2 < R ** 2, 0.25 * s * (np.sqrt(np.clip(1 - r2 / R ** 2, 0, 1))), 0.0)
        inside = r2 < R ** 2
    elif obj == "ring":
        R, a = 0.25 * s * scale, 0.09 * s * scale
        dr = np.sqrt(u ** 2 + v ** 2) - R
        h = np.where(np.abs(dr) < a, np.sqrt(np.clip(a ** 2 - dr ** 2, 0, None)), 0.0)
        inside = np.abs(dr) < a
    else:
        raise DatasetError(f"unknown synthetic object type {obj!r}; choose one of {OBJECT_TYPES}")
    return h, inside


def _normals(h: np.ndarray) -> np.ndarray:
    gy, gx = np.gradient(h)
    n = np.stack([-gx, -gy, -np.ones_like(h)], axis=-1)
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


def _interior_point(rng: np.random.Generator, region: np.ndarray, margin: int):
    core = ndimage.binary_erosion(region, iterations=margin)
    ys, xs = np.nonzero(core if core.sum() > 20 else region)
    k = rng.integers(len(ys))
    return float(ys[k]), float(xs[k])


def _polygon(rng: np.random.Generator, H: int, W: int, region: np.ndarray, radius: float) -> np.ndarray:
    """A small irregular polygon (5-8 vertices, radius jittered by +-30 %) inside `region`, sharp-edged."""
    cy, cx = _interior_point(rng, region, int(radius) + 2)
    n = int(rng.integers(5, 9))
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = radius * rng.uniform(0.7, 1.3, n)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    theta = np.arctan2(yy - cy, xx - cx) % (2 * np.pi)
    # the polygon's radius at each pixel's angle: linear between the two neighbouring vertices
    a = np.r_[ang, ang[0] + 2 * np.pi]
    r = np.r_[rad, rad[0]]
    t = np.where(theta < ang[0], theta + 2 * np.pi, theta)
    edge = np.interp(t, a, r)
    return (np.hypot(yy - cy, xx - cx) <= edge) & region


def _segment(rng: np.random.Generator, H: int, W: int, region: np.ndarray, length: float,
             width: int) -> np.ndarray:
    """A straight line segment `width` px wide (1 or 2) inside `region`."""
    cy, cx = _interior_point(rng, region, 3)
    ang = rng.uniform(0, np.pi)
    t = np.linspace(-length / 2, length / 2, int(length * 2) + 1)
    ys, xs = np.round(cy + t * np.sin(ang)).astype(int), np.round(cx + t * np.cos(ang)).astype(int)
    ok = (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
    m = np.zeros((H, W), bool)
    m[ys[ok], xs[ok]] = True
    if width > 1:
        m |= np.roll(m, 1, axis=0 if abs(np.cos(ang)) > abs(np.sin(ang)) else 1)
    return m & region


def render_sample(rng: np.random.Generator, size, obj: str, defect: str = "good") -> Dict[str, np.ndarray]:
    """Render one sample. Returns rgb (H, W, 3) uint8, depth (H, W) float32, normals (H, W, 3) float32,
    mask (H, W) bool, and ``rgb_clean``: the same scene rendered without any defect (for tests)."""
    H, W = to_hw(size)
    s = min(H, W)
    h, inside = _object_geometry(obj, H, W, rng)
    base_col = {"tile": (0.75, 0.45, 0.25), "disc": (0.25, 0.45, 0.75), "ring": (0.55, 0.7, 0.3)}[obj]
    col = np.clip(np.array(base_col) + rng.uniform(-0.1, 0.1, 3), 0.05, 0.95)
    tex = 1 + 0.08 * _smooth_noise(rng, H, W, rng.uniform(1.5, 3.0))
    albedo = np.where(inside[..., None], col * tex[..., None], 0.5 * (1 + 0.03 * _smooth_noise(rng, H, W, 2))[..., None])
    h_clean = h + inside * TEXTURE_HEIGHT * s * _smooth_noise(rng, H, W, 2.0)   # fine surface texture
    mask = np.zeros((H, W), bool)
    h_def, albedo_def = h_clean, albedo
    if defect == "pit":
        mask = _polygon(rng, H, W, inside, rng.uniform(*PIT_RADIUS) * s)
        h_def = h_clean - mask * rng.uniform(*PIT_DEPTH) * s
    elif defect == "scratch":
        mask = _segment(rng, H, W, inside, rng.uniform(*SCRATCH_LENGTH) * s, int(rng.integers(1, 3)))
        h_def = h_clean - mask * rng.uniform(*SCRATCH_DEPTH) * s
    elif defect == "hairline":
        mask = _segment(rng, H, W, inside, rng.uniform(*HAIRLINE_LENGTH) * s, 1)
        gain = rng.choice([rng.uniform(0.2, 0.5), rng.uniform(1.6, 2.2)])
        albedo_def = np.where(mask[..., None], np.clip(albedo * gain, 0, 1), albedo)
    elif defect == "specular":
        cy, cx = _interior_point(rng, inside, 3)
        yy, xx = np.mgrid[0:H, 0:W]
        mask = (np.hypot(yy - cy, xx - cx) <= max(1.0, rng.uniform(*SPECULAR_RADIUS) * s)) & inside
    elif defect != "good":
        raise DatasetError(f"unknown synthetic defect {defect!r}; choose good or one of {DEFECT_TYPES}")

    def shade(alb, height):
        n = _normals(height)
        lam = np.clip(np.sum(n * LIGHT / np.linalg.norm(LIGHT), axis=-1), 0, 1)
        return np.clip(alb * (0.35 + 0.65 * lam)[..., None], 0, 1)

    # Geometry-only defects must not show in RGB: RGB shades the defect-free geometry, except for the scratch,
    # meant to be visible in both modalities (through its shading only).
    rgb = shade(albedo_def, h_def if defect == "scratch" else h_clean)
    if defect == "specular":       # a saturated highlight, not an albedo change: it ignores the shading
        rgb = np.where(mask[..., None], 1.0, rgb)
    rgb_clean = shade(albedo, h_clean)
    to8 = lambda x: (np.round(x * 255)).astype(np.uint8)
    return {"rgb": to8(rgb), "rgb_clean": to8(rgb_clean), "depth": (TABLE_DEPTH - h_def).astype(np.float32),
            "normals": _normals(h_def).astype(np.float32), "mask": mask, "object_mask": inside}


def _plan(split: str, counts: Dict[str, int]) -> List[str]:
    if split in ("train", "validation"):
        return ["good"] * counts["train" if split == "train" else "test_good"]
    return ["good"] * counts["test_good"] + [d for d in DEFECT_TYPES for _ in range(counts["test_defect"])]


class SyntheticDataset(AnomalyDataset):
    """``build_dataset("synthetic", root=None, object_name=<type>, split, img_size, aux_ch)``.

    aux_ch 3: normals, 1: depth, 0: RGB only. ``counts`` overrides DEFAULT_COUNTS (train, test_good,
    test_defect per defect type). Samples are rendered at ``render_size`` (default: img_size) on access.
    """
    aux_kinds = GEOMETRY_AUX_KIND
    AUX_CHOICES = (3, 1, 0, 33, 36)
    AUX_WHAT = "normals (aux_ch=3), depth (1), FPFH (33), normals + FPFH (36) or RGB only (0)"
    has_valid = True

    def __init__(self, root: Optional[str] = None, object_name: str = "disc", split: str = "train", img_size=128,
                 aux_ch: int = 3, seed: int = 0, counts: Optional[Dict[str, int]] = None, render_size=None, **kw):
        if object_name not in OBJECT_TYPES:
            raise DatasetError(f"unknown synthetic object {object_name!r}; choose one of {OBJECT_TYPES}")
        if split not in _SPLIT_IDS:
            raise DatasetError(f"synthetic splits are {tuple(_SPLIT_IDS)}, got {split!r}")
        self.check_aux_ch(aux_ch, "synthetic data")
        self.aux_kind = self.aux_kind_for(aux_ch)
        self.counts = {**DEFAULT_COUNTS, **(counts or {})}
        self.render_size = to_hw(render_size or img_size)
        self.data_seed = seed
        records = [Record(f"synthetic://{object_name}/{split}/{d}/{i:03d}", None, None, int(d != "good"), d,
                          object_name) for i, d in enumerate(_plan(split, self.counts))]
        self._raw, self._raw_bytes = {}, 0
        super().__init__(records, img_size, aux_ch, split, f"synthetic {object_name}", seed=seed, **kw)

    def check_files(self, progress: bool = True) -> None:
        """Nothing to check: samples are rendered, not read."""

    @classmethod
    def read_aux(cls, path, aux_ch):
        """Files of synthetic objects are the MVTec 3D-AD trees ``write_mvtec3d_tree`` writes (xyz TIFFs)."""
        from .mvtec3d import MVTec3D
        return MVTec3D.read_aux(path, aux_ch)

    def render(self, i: int) -> Dict[str, np.ndarray]:
        r = self.records[i]
        rng = np.random.default_rng((self.data_seed, _SPLIT_IDS[self.split], OBJECT_TYPES.index(r.object), i))
        return render_sample(rng, self.render_size, r.object, r.defect)

    def load_raw(self, i: int):
        """The sample's arrays before transforms. Rendering is deterministic and costs ~0.3 s at 256 px, and a
        training run reads each train image once per synthetic view plus for the bank: the arrays are kept (in
        this process, up to RENDER_CACHE_MB) instead of rendered again."""
        if i not in self._raw:
            self._raw[i] = self._load_raw(i)
            self._raw_bytes += sum(a.nbytes for a in self._raw[i] if a is not None)
            while self._raw_bytes > RENDER_CACHE_MB * 2 ** 20 and len(self._raw) > 1:
                first = next(iter(self._raw))
                self._raw_bytes -= sum(a.nbytes for a in self._raw.pop(first) if a is not None)
        return self._raw[i]

    def points(self, i: int) -> np.ndarray:
        return depth_to_xyz(self.render(i)["depth"])

    def _load_raw(self, i: int):
        s = self.render(i)
        aux = valid = None
        if self.aux_ch == 3:
            aux = s["normals"]
        elif self.aux_ch == 1:
            aux = s["depth"][..., None]
        elif self.aux_ch in (33, 36):
            from .mvtec3d import fpfh_full_res
            aux, valid = fpfh_full_res(depth_to_xyz(s["depth"]))
            if self.aux_ch == 36:
                aux = np.concatenate([s["normals"], aux], axis=2)
            return s["rgb"], aux, s["mask"], valid
        if self.aux_ch:
            valid = np.ones(s["mask"].shape, bool)
        return s["rgb"], aux, s["mask"], valid


def depth_to_xyz(z: np.ndarray) -> np.ndarray:
    """(H, W) depth of a render -> (H, W, 3) organised points seen by the pinhole camera of FOCAL (float32)."""
    H, W = z.shape
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    return np.stack([(xx - W / 2) * z / FOCAL, (yy - H / 2) * z / FOCAL, z], axis=-1).astype(np.float32)


def write_mvtec3d_tree(out_root: str, object_name: str = "disc", size=128, seed: int = 0,
                       counts: Optional[Dict[str, int]] = None) -> str:
    """Write the synthetic object as an MVTec 3D-AD tree under out_root/<object>; returns that folder."""
    import tifffile
    from PIL import Image
    for split in ("train", "validation", "test"):
        ds = SyntheticDataset(None, object_name, split, size, aux_ch=3, seed=seed, counts=counts)
        for i, r in enumerate(ds.records):
            s = ds.render(i)
            folder = os.path.join(out_root, object_name, split, r.defect)
            for sub in ("rgb", "xyz") + (("gt",) if split == "test" else ()):
                os.makedirs(os.path.join(folder, sub), exist_ok=True)
            name = f"{i:03d}"
            Image.fromarray(s["rgb"]).save(os.path.join(folder, "rgb", name + ".png"))
            tifffile.imwrite(os.path.join(folder, "xyz", name + ".tiff"), depth_to_xyz(s["depth"]),
                             photometric="minisblack")
            if split == "test":
                Image.fromarray((s["mask"] * 255).astype(np.uint8)).save(os.path.join(folder, "gt", name + ".png"))
    return os.path.join(out_root, object_name)


def height_mesh(height: np.ndarray, inside: np.ndarray, scale: float = 1.0):
    """A triangle mesh of a height map over the pixels ``inside`` (two triangles per grid cell whose four
    corners are inside): vertices (V, 3) as (x, y, height) * scale, faces (F, 3) vertex indices."""
    H, W = height.shape
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    verts = np.stack([xx, yy, height.astype(np.float64)], axis=-1).reshape(-1, 3) * scale
    cell = inside[:-1, :-1] & inside[1:, :-1] & inside[:-1, 1:] & inside[1:, 1:]
    i, j = np.nonzero(cell)
    a, b, c, d = i * W + j, i * W + j + 1, (i + 1) * W + j, (i + 1) * W + j + 1
    faces = np.concatenate([np.stack([a, c, b], 1), np.stack([b, c, d], 1)])
    used = np.unique(faces)
    remap = np.full(H * W, -1)
    remap[used] = np.arange(len(used))
    return verts[used], remap[faces]


def write_stl(path: str, verts: np.ndarray, faces: np.ndarray) -> None:
    """A binary STL file of a triangle mesh (facet normals from the vertex order)."""
    tri = verts[faces].astype(np.float32)                                  # (F, 3, 3)
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    rec = np.zeros(len(faces), dtype=[("n", "<f4", 3), ("v", "<f4", (3, 3)), ("attr", "<u2")])
    rec["n"], rec["v"] = n, tri
    with open(path, "wb") as fh:
        fh.write(b"MambaAlign synthetic part".ljust(80, b" "))
        fh.write(np.uint32(len(faces)).tobytes())
        fh.write(rec.tobytes())


def write_mulsen_tree(out_root: str, object_name: str = "disc", size=128, seed: int = 0,
                      counts: Optional[Dict[str, int]] = None, clouds: bool = True) -> str:
    """Write the synthetic object as a MulSen-AD tree under out_root/<object>: RGB (train, test/<defect>, GT
    masks), Infrared (a grey rendering of the depth, the same names) and, with ``clouds``, Pointcloud/*.stl: the
    part's surface as a mesh, whose geometry-only defects (pits) show there and not in RGB. Returns the folder."""
    from PIL import Image
    H, W = to_hw(size)
    for split in ("train", "test"):
        ds = SyntheticDataset(None, object_name, split, size, aux_ch=1, seed=seed, counts=counts)
        for i, r in enumerate(ds.records):
            s = ds.render(i)
            sub = "train" if split == "train" else os.path.join("test", r.defect)
            name = f"{i}.png"
            for top in ("RGB", "Infrared") + (("Pointcloud",) if clouds else ()):
                os.makedirs(os.path.join(out_root, object_name, top, sub), exist_ok=True)
            Image.fromarray(s["rgb"]).save(os.path.join(out_root, object_name, "RGB", sub, name))
            h = TABLE_DEPTH - s["depth"]
            ir = np.clip(40 + 200 * h / max(float(h.max()), 1e-6), 0, 255).astype(np.uint8)
            Image.fromarray(ir).save(os.path.join(out_root, object_name, "Infrared", sub, name))
            if split == "test" and r.defect != "good":
                gt = os.path.join(out_root, object_name, "RGB", "GT", r.defect)
                os.makedirs(gt, exist_ok=True)
                Image.fromarray((s["mask"] * 255).astype(np.uint8)).save(os.path.join(gt, name))
            if clouds:
                v, f = height_mesh(h, s["object_mask"])
                write_stl(os.path.join(out_root, object_name, "Pointcloud", sub, f"{i}.stl"), v, f)
    return os.path.join(out_root, object_name)


def _main(argv=None):
    import argparse
    p = argparse.ArgumentParser("python -m datasets.synthetic",
                                description="Write the synthetic dataset to disk as an MVTec 3D-AD tree.")
    p.add_argument("--write", required=True, metavar="DIR", help="output root (DIR/<object>/{train,validation,test})")
    p.add_argument("--layout", default="mvtec3d", choices=("mvtec3d", "mulsen"),
                   help="mvtec3d: rgb PNG + xyz TIFF + gt; mulsen: RGB + Infrared PNGs + Pointcloud STL meshes")
    p.add_argument("--objects", default="all", help=f"comma-separated subset of {', '.join(OBJECT_TYPES)}, or all")
    p.add_argument("--size", type=int, default=128, help="image size in pixels")
    p.add_argument("--seed", type=int, default=0, help="dataset seed")
    a = p.parse_args(argv)
    objects = OBJECT_TYPES if a.objects == "all" else a.objects.split(",")
    write = write_mvtec3d_tree if a.layout == "mvtec3d" else write_mulsen_tree
    for obj in objects:
        print(f"wrote {write(a.write, obj, a.size, a.seed)}")


if __name__ == "__main__":
    _main()
