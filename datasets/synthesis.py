"""Training anomalies for two modalities (DRAEM-style), as a pure seeded function.

``synthesize(rgb, aux, rng, aux_kind=..., mode=...)`` takes one normalised sample (the tensors a dataset returns:
rgb ImageNet-normalised (3, H, W); aux (C, H, W) as normals / standardised depth / intensity) and returns
``(rgb, aux, mask)`` with an anomaly injected where ``mask`` (1, H, W) is 1:

  * mask: Perlin noise at a random lattice scale, thresholded, kept inside the foreground (``valid`` where
    given, else an estimate: pixels that differ from the border colour);
  * RGB: a texture (a random image from ``texture_source``, e.g. DTD; else a procedural one: coloured Perlin
    noise, a near-uniform colour, a displaced patch of the image itself, or the image itself discoloured, which
    keeps its shading) blended in with a random opacity;
  * aux, consistent with the modality: depth gets a smooth bump or dent over the mask, of one of two shapes
    (``GEOMETRY_PROBS``): a dome (tilted at almost every masked pixel, so the normals show all of it) or a
    plateau (a steep rim around a displaced flat top, like a pressed-in dent; the label is where the surface
    moved, flat top included, which the normals show only through the rim around it); normals are bent by the
    gradient of that same height field (they stay unit vectors); intensity (infrared) a hot or cold spot;
  * mode: "rgb" (aux untouched), "aux" (RGB untouched), "both", or "mixed" (one of the three per sample, with
    ``MIXED_PROBS``).

``misalign(aux, rng, max_px, max_deg)`` shifts/rotates aux against RGB (sub-pixel to a few pixels); the mask
keeps following RGB. It is applied to normal and anomalous samples alike, so a small shift is never a defect.

Run ``python -m datasets.synthesis --preview out.png`` for a contact sheet of every mode.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .transforms import (IMAGE_EXTENSIONS, NORMALS_KINDS, DatasetError, aux_to_image, denormalize_rgb,
                         normalize_rgb, read_image)

__all__ = ["perlin_noise", "perlin_mask", "synthesize", "misalign", "AnomalySynthesizer", "SynthesisDataset",
           "TextureSource", "MODES"]

MODES = ("rgb", "aux", "both", "mixed")
MIXED_PROBS = {"rgb": 1 / 3, "aux": 1 / 3, "both": 1 / 3}
PERLIN_SCALE_EXP = (1, 5)       # lattice cells per side: 2**k, k uniform in this range (inclusive) ...
PERLIN_MIN_CELL = 8             # ... capped so that a cell spans at least this many pixels: at 256 px that is
                                # DRAEM's range; at 128 px finer lattices give speckles of a pixel or two
PERLIN_THRESHOLD = 0.5          # DRAEM's threshold on noise in about [-1, 1]
MIN_MASK_FRACTION = 0.002       # masks smaller than this (of the image) are redrawn
MAX_TRIES = 8
BLEND_RANGE = (0.5, 1.0)        # texture opacity
DISCOLOUR_DARK = (0.25, 0.7)    # discolouration: brightness gain of a darkened region ...
DISCOLOUR_BRIGHT = (1.4, 2.0)   # ... or of a brightened one
DISCOLOUR_HUE = (0.75, 1.25)    # per-channel factor on that gain: a tint
BUMP_AMPLITUDE = (1.0, 2.5)     # depth bump height, in standard deviations of the (standardised) depth
NORMAL_BUMP_SLOPE = (0.3, 1.2)  # steepest slope (17 to 50 degrees) of the synthetic bump that bends normals
NORMAL_DOME_SIGMA = 1.0         # smoothing of that dome: rounds its ridge and rim
GEOMETRY_PROBS = {"dome": 0.5, "plateau": 0.5}   # shapes of a depth / normals anomaly (see ``_geometry``)
PLATEAU_EDGE = (0.012, 0.03)    # plateau: the mask blurred with a sigma of this fraction of the image side ...
PLATEAU_LABEL_LEVEL = 0.1       # ... and labelled where it moved by more than this fraction of its height
GEOMETRY_MIN_TILT = 8.0         # bent normals are also labelled where they turned by more than this (degrees):
                                # a plateau's rim goes on tilting beyond the level above
INTENSITY_AMPLITUDE = (0.8, 2.0)  # infrared spot strength, in normalised units
BUMP_SIGMA = 2.0                # smoothing (pixels) of the mask into a height field
FG_THRESHOLD = 0.08             # foreground estimate: colour distance from the border median (RGB in [0, 1])
FG_FRACTION = (0.002, 0.95)     # an estimate outside this share of the image is implausible and not used;
                                # small parts on a plain background (MulSen-AD's button cell: ~3%) must pass


def perlin_noise(shape: Tuple[int, int], res: Tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2D gradient (Perlin) noise of `shape` with `res` lattice cells per axis; values roughly in [-1, 1]."""
    H, W = shape
    ry, rx = res
    angles = rng.uniform(0, 2 * np.pi, (ry + 1, rx + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = np.linspace(0, ry, H, endpoint=False)
    x = np.linspace(0, rx, W, endpoint=False)
    yi, xi = np.floor(y).astype(int), np.floor(x).astype(int)
    yf, xf = (y - yi)[:, None], (x - xi)[None, :]

    def corner(dy, dx):   # the lattice gradients at each pixel's corner, gathered rows first, then columns
        gy, gx = (np.take(grads[yi + dy, :, k], xi + dx, axis=1) for k in (0, 1))
        return gy * (yf - dy) + gx * (xf - dx)

    fade = lambda t: t * t * t * (t * (t * 6 - 15) + 10)
    u, v = fade(yf), fade(xf)
    n0 = corner(0, 0) * (1 - v) + corner(0, 1) * v
    n1 = corner(1, 0) * (1 - v) + corner(1, 1) * v
    return (n0 * (1 - u) + n1 * u) * math.sqrt(2)


def perlin_mask(shape, rng, foreground: Optional[np.ndarray] = None, scale_exp=PERLIN_SCALE_EXP,
                threshold=PERLIN_THRESHOLD, min_fraction=MIN_MASK_FRACTION) -> np.ndarray:
    """Thresholded Perlin noise at a random scale, inside `foreground`; redrawn until non-trivial."""
    H, W = shape
    k_max = int(np.clip(np.floor(np.log2(min(H, W) / PERLIN_MIN_CELL)), scale_exp[0], scale_exp[1]))
    for _ in range(MAX_TRIES):
        ky, kx = rng.integers(scale_exp[0], k_max + 1, size=2)
        noise = perlin_noise((H, W), (2 ** int(ky), 2 ** int(kx)), rng)
        m = noise > threshold
        if foreground is not None:
            m &= foreground
        if m.mean() >= min_fraction:
            return m
    # A blob at a foreground point: always non-empty, so a sample meant to be anomalous is.
    ys, xs = np.nonzero(foreground) if foreground is not None and foreground.any() else (np.array([H // 2]),
                                                                                         np.array([W // 2]))
    k = rng.integers(len(ys))
    yy, xx = np.mgrid[0:H, 0:W]
    r = max(2.0, 0.06 * min(H, W))
    m = (yy - ys[k]) ** 2 + (xx - xs[k]) ** 2 <= r * r
    return m & foreground if foreground is not None and (m & foreground).any() else m


def estimate_foreground(rgb01: torch.Tensor, threshold: float = FG_THRESHOLD,
                        fraction=FG_FRACTION) -> Optional[np.ndarray]:
    """Pixels whose colour differs from the median border colour; None when their share of the image is outside
    ``fraction`` (then anomalies may go anywhere)."""
    x = rgb01.numpy()
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)
    med = np.median(border, axis=1)[:, None, None]
    fg = np.sqrt(((x - med) ** 2).sum(0)) > threshold
    return fg if fraction[0] < fg.mean() < fraction[1] else None


class TextureSource:
    """Images from a folder tree (e.g. DTD's images/); an empty or unreadable folder is an error."""

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise DatasetError(f"anomaly source folder not found: {path}")
        self.files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                            if f.lower().endswith(IMAGE_EXTENSIONS))
        if not self.files:
            raise DatasetError(f"anomaly source folder has no images ({', '.join(IMAGE_EXTENSIONS)}): {path}")
        self.path = path

    def sample(self, rng: np.random.Generator, shape) -> torch.Tensor:
        """A random texture (3, H, W) in [0, 1], resized from a random image."""
        arr = read_image(self.files[rng.integers(len(self.files))], "RGB")
        t = torch.from_numpy(arr).permute(2, 0, 1).float()[None] / 255
        return F.interpolate(t, size=shape, mode="bilinear", align_corners=False, antialias=True)[0]


def _procedural_texture(rgb01: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """One of, with equal probability: coloured Perlin noise; a near-uniform colour (paint, a foreign patch); a
    displaced, colour-jittered copy of the image itself; or a discolouration (a stain, a burn, a faded patch):
    the image itself times a per-channel gain, darker or brighter, which keeps the part's shading and texture so
    only the colour of the region gives it away."""
    H, W = rgb01.shape[1:]
    kind = rng.integers(4)
    if kind < 2:
        res = 2 ** int(rng.integers(2, 5))
        chans = [perlin_noise((H, W), (res, res), rng) for _ in range(3)]
        base = rng.uniform(0, 1, 3)[:, None, None]
        amplitude = 0.4 if kind == 0 else 0.04   # kind 1: almost flat colour, no texture to give it away
        return torch.from_numpy(np.clip(base + amplitude * np.stack(chans), 0, 1)).float()
    if kind == 2:
        dy, dx = int(rng.integers(H // 4, 3 * H // 4 + 1)), int(rng.integers(W // 4, 3 * W // 4 + 1))
        jitter = torch.from_numpy(rng.uniform(0.6, 1.4, 3)).float()[:, None, None]
        return (torch.roll(rgb01, (dy, dx), (1, 2)) * jitter).clamp(0, 1)
    brightness = rng.uniform(*DISCOLOUR_DARK) if rng.random() < 0.5 else rng.uniform(*DISCOLOUR_BRIGHT)
    gain = torch.from_numpy(brightness * rng.uniform(*DISCOLOUR_HUE, 3)).float()[:, None, None]
    return (rgb01 * gain).clamp(0, 1)


def _dome(mask: np.ndarray, sigma: float) -> np.ndarray:
    """The distance to the mask's border, smoothed: a dome with a slope of about one (pixel per pixel) at almost
    every masked pixel, so a surface bent by it is tilted over the whole anomaly, and labelled by the mask."""
    from scipy import ndimage
    return ndimage.gaussian_filter(ndimage.distance_transform_edt(mask), sigma)


def _blurred(mask: np.ndarray, sigma: float) -> np.ndarray:
    """The mask blurred and scaled to peak at 1: a plateau (flat inside a wide mask, a smooth edge around it)."""
    from scipy import ndimage
    h = ndimage.gaussian_filter(mask.astype(np.float64), sigma)
    return h / (h.max() + 1e-8)


def _geometry(mask: np.ndarray, rng: np.random.Generator, shape: str,
              dome_sigma: float) -> Tuple[np.ndarray, np.ndarray]:
    """A height field of peak 1 for a geometry anomaly over `mask`, and the mask it labels.

    * ``dome``: ``_dome(mask)``, labelled by the mask itself (its every pixel is tilted);
    * ``plateau``: the mask blurred with a sigma drawn from ``PLATEAU_EDGE`` (times the image side): a steep
      rim around a flat top, as a pressed-in dent or a raised pad. Labelled where the surface moved by more than
      ``PLATEAU_LABEL_LEVEL`` of its height: the flat top, which is displaced but keeps its normals, and the
      foot of the rim just outside the mask. Domes alone taught a model that an anomaly is where the surface
      tilts, so on a dent it marked the rim and missed the displaced middle.
    """
    if shape == "dome":
        h = _dome(mask, dome_sigma)
        return h / (h.max() + 1e-8), mask
    if shape == "plateau":
        h = _blurred(mask, float(rng.uniform(*PLATEAU_EDGE)) * min(mask.shape))
        return h, h > PLATEAU_LABEL_LEVEL
    raise ValueError(f"geometry shape must be one of {tuple(GEOMETRY_PROBS)}, got {shape!r}")


def displaced_fpfh(fpfh: torch.Tensor, xyz: torch.Tensor, lift: np.ndarray) -> torch.Tensor:
    """The FPFH map (33, H, W) of a surface raised by ``lift`` (H, W; in pixels of height per pixel of width,
    the field whose gradient bent the normals) on the organised cloud ``xyz`` (3, H, W), zeros = missing.

    The points move against the camera's z by lift x the cloud's point spacing (the median distance between
    horizontal neighbours), so the normals bent by that field are the displaced surface's. The FPFH of the
    displaced and of the original cloud are computed on this grid with one down-sampling voxel, and their
    difference is added to ``fpfh``: the dataset's map may come from another resolution (a prepared 400 x 400
    cloud), and only what the displacement changed is carried over, not what the resolution changes."""
    from .mvtec3d import fpfh_full_res
    from pointcloud import voxel_size
    pts = xyz.permute(1, 2, 0).numpy().astype(np.float32)
    ok = np.any(pts != 0, axis=2)
    if ok.sum() < 10:
        return fpfh
    pair = ok[:, 1:] & ok[:, :-1]
    step = np.linalg.norm(pts[:, 1:] - pts[:, :-1], axis=2)[pair]
    spacing = float(np.median(step)) if step.size else 0.0
    moved = pts.copy()
    moved[..., 2] -= np.where(ok, lift * spacing, 0.0).astype(np.float32)
    voxel = voxel_size(pts[ok])
    before, _ = fpfh_full_res(pts, voxel=voxel)
    after, _ = fpfh_full_res(moved, voxel=voxel)
    delta = torch.from_numpy(after - before).permute(2, 0, 1)
    return fpfh + delta * torch.from_numpy(ok.astype(np.float32))[None]


def synthesize(rgb: torch.Tensor, aux: Optional[torch.Tensor], rng: np.random.Generator, *,
               aux_kind: Optional[str], mode: str = "mixed", valid: Optional[torch.Tensor] = None,
               texture_source: Optional[TextureSource] = None, restrict_to_foreground: bool = True,
               blend_range=BLEND_RANGE, geometry: Optional[str] = None, xyz=None
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, str]:
    """Inject one anomaly. Returns (rgb, aux, mask (1, H, W) float {0, 1}, the mode used).
    ``geometry`` ("dome" or "plateau") fixes the shape of a depth / normals anomaly; None draws it with
    ``GEOMETRY_PROBS``. ``xyz``: the sample's organised points (3, H, W), or a callable giving them (read only
    when needed): aux_kind "normals+fpfh" displaces them by the same height field and recomputes the FPFH."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if geometry is not None and geometry not in GEOMETRY_PROBS:
        raise ValueError(f"geometry must be one of {tuple(GEOMETRY_PROBS)} or None, got {geometry!r}")
    if mode == "mixed":
        mode = rng.choice(list(MIXED_PROBS), p=list(MIXED_PROBS.values()))
    if aux is None and mode != "rgb":
        mode = "rgb"  # RGB-only data: the aux modes do not apply
    H, W = rgb.shape[1:]
    rgb01 = denormalize_rgb(rgb)
    fg = None
    if restrict_to_foreground:
        fg = (valid[0] > 0.5).numpy() if valid is not None and (valid < 0.5).any() else estimate_foreground(rgb01)
    m = perlin_mask((H, W), rng, fg)
    mt = torch.from_numpy(m.astype(np.float32))[None]
    out_rgb, out_aux = rgb, aux
    if mode in ("rgb", "both"):
        tex = texture_source.sample(rng, (H, W)) if texture_source is not None else _procedural_texture(rgb01, rng)
        beta = float(rng.uniform(*blend_range))
        out_rgb = normalize_rgb(rgb01 * (1 - beta * mt) + tex * beta * mt)
    if mode in ("aux", "both"):
        sign = float(rng.choice([-1.0, 1.0]))
        if aux_kind in ("depth", "normals", "normals+fpfh"):
            shape = geometry or str(rng.choice(list(GEOMETRY_PROBS), p=list(GEOMETRY_PROBS.values())))
            h, label = _geometry(m, rng, shape, BUMP_SIGMA if aux_kind == "depth" else NORMAL_DOME_SIGMA)
            label = torch.from_numpy(label)
            if aux_kind == "depth":
                out_aux = aux - torch.from_numpy(h * sign * rng.uniform(*BUMP_AMPLITUDE)).float()[None]
            else:
                gy, gx = torch.gradient(torch.from_numpy(h).float())
                grad = torch.hypot(gx, gy)
                # The steepest slope of the field is drawn from NORMAL_BUMP_SLOPE, whatever its shape and size.
                slope = sign * float(rng.uniform(*NORMAL_BUMP_SLOPE)) / float(grad.max().clamp_min(1e-6))
                label = label | (torch.rad2deg(torch.atan(grad * abs(slope))) > GEOMETRY_MIN_TILT)
                # n / |n_z| = (-h_x, -h_y, -1) for a height field h; adding the bump's (-dh_x, -dh_y, 0) gives
                # the exact normal of the bumped surface, then renormalise.
                n = aux[:3]
                nz = n[2:3].abs().clamp_min(1e-3)
                bent = n / nz - torch.stack([gx, gy, torch.zeros_like(gx)]) * slope
                bent = bent / bent.norm(dim=0, keepdim=True).clamp_min(1e-8)
                out_aux = torch.where(n.norm(dim=0, keepdim=True) > 0, bent, n)
                if aux_kind == "normals+fpfh":
                    if xyz is None:
                        raise ValueError("aux_kind 'normals+fpfh' needs the sample's points (xyz) to displace")
                    fpfh = displaced_fpfh(aux[3:], xyz() if callable(xyz) else xyz, h * slope)
                    out_aux = torch.cat([out_aux, fpfh])
            mt = torch.maximum(mt, label.float()[None])
        elif aux_kind == "intensity":
            # a hot or cold spot: a value offset, which shows at every masked pixel
            spot = _blurred(m, 1.0) * (sign * rng.uniform(*INTENSITY_AMPLITUDE))
            out_aux = aux + torch.from_numpy(spot).float()[None]
        else:
            raise ValueError(f"aux_kind must be normals, normals+fpfh, depth or intensity for mode {mode!r}, "
                             f"got {aux_kind!r}")
    return out_rgb, out_aux, mt, mode


def misalign(aux: torch.Tensor, rng: np.random.Generator, max_px: float, max_deg: float = 0.0,
             aux_kind: Optional[str] = None, shift: Optional[Tuple[float, float]] = None) -> torch.Tensor:
    """Shift aux by (dx, dy) pixels (uniform in [-max_px, max_px] unless `shift` is given) and rotate it by up to
    `max_deg` about the centre; normals' x, y components are rotated with the image."""
    C, H, W = aux.shape
    dx, dy = shift if shift is not None else rng.uniform(-max_px, max_px, 2)
    ang = math.radians(rng.uniform(-max_deg, max_deg)) if max_deg else 0.0
    cos, sin = math.cos(ang), math.sin(ang)
    # Output pixel p samples input at R^-1 (p - c - t) + c; in normalised coordinates (align_corners=False).
    theta = torch.tensor([[cos, sin * H / W, -2 * dx / W * cos - 2 * dy / H * sin * H / W],
                          [-sin * W / H, cos, 2 * dx / W * sin * W / H - 2 * dy / H * cos]], dtype=torch.float32)
    grid = F.affine_grid(theta[None], (1, C, H, W), align_corners=False)
    out = F.grid_sample(aux[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    if aux_kind in NORMALS_KINDS and ang:
        x, y = out[0] * cos - out[1] * sin, out[0] * sin + out[1] * cos
        n = torch.stack([x, y, out[2]])
        out = torch.cat([n / n.norm(dim=0, keepdim=True).clamp_min(1e-8), out[3:]])
    return out


class AnomalySynthesizer:
    """The callable a dataset wrapper uses: synth_prob, mode, textures, misalignment and modality dropout in one
    place. ``aux_dropout``: the chance that a sample's aux is replaced by zeros and marked absent
    (``aux_present`` False), so a model learns to run from RGB alone; an anomaly that lived only in the dropped
    aux is gone with it (label 0, empty mask)."""

    def __init__(self, aux_kind: Optional[str], mode: str = "mixed", synth_prob: float = 0.5,
                 anomaly_source_path: Optional[str] = None, misalign_px: float = 0.0, misalign_deg: float = 0.0,
                 aux_dropout: float = 0.0):
        for name, p in (("synth_prob", synth_prob), ("aux_dropout", aux_dropout)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if mode not in MODES:
            raise ValueError(f"synth mode must be one of {MODES}, got {mode!r}")
        self.aux_kind, self.mode, self.synth_prob = aux_kind, mode, synth_prob
        self.textures = TextureSource(anomaly_source_path) if anomaly_source_path else None
        self.misalign_px, self.misalign_deg = misalign_px, misalign_deg
        self.aux_dropout = aux_dropout

    def __call__(self, sample: Dict[str, object], rng: np.random.Generator,
                 inject: Optional[bool] = None, xyz=None) -> Dict[str, object]:
        """Apply to one sample. ``inject`` forces (True) or forbids (False) an anomaly; None draws with
        synth_prob. Misalignment applies either way. ``xyz``: see ``synthesize``."""
        sample = dict(sample)
        aux = sample.get("aux")
        if inject if inject is not None else rng.random() < self.synth_prob:
            rgb, aux, mask, used = synthesize(sample["rgb"], aux, rng, aux_kind=self.aux_kind, mode=self.mode,
                                              valid=sample.get("valid"), texture_source=self.textures, xyz=xyz)
            sample.update(rgb=rgb, mask=mask, label=int(mask.sum() > 0), defect=f"synthetic_{used}")
        else:
            sample.update(mask=torch.zeros_like(sample["mask"]), label=0, defect="good")
        if aux is not None and (self.misalign_px or self.misalign_deg):
            aux = misalign(aux, rng, self.misalign_px, self.misalign_deg, self.aux_kind)
        if aux is not None:
            present = not (self.aux_dropout and rng.random() < self.aux_dropout)
            if not present:
                aux = torch.zeros_like(aux)
                if sample["defect"] == "synthetic_aux":
                    sample.update(mask=torch.zeros_like(sample["mask"]), label=0, defect="good")
            sample.update(aux=aux, aux_present=present)
        return sample


class SynthesisDataset(Dataset):
    """Wraps a dataset of normal images: item i gets an anomaly drawn with rng (seed, epoch, i), and ``index``:
    the base dataset's index of its image (the memory bank's leave-one-out key).
    With ``fixed=True`` (the validation set) the epoch is ignored and every image appears twice, first with a
    fixed anomaly, then clean: the same anomalies every time, both classes equally present, and each anomalous
    view paired with its own clean one, so the scores compare like with like (with one view per image, which
    images happened to get the anomalies would move a small set's AUROC)."""

    def __init__(self, base: Dataset, synthesizer: AnomalySynthesizer, seed: int = 0, fixed: bool = False,
                 indices: Optional[Sequence[int]] = None):
        self.base, self.synth, self.seed, self.fixed = base, synthesizer, seed, fixed
        self.indices = list(range(len(base))) if indices is None else list(indices)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices) * (2 if self.fixed else 1)

    def __getitem__(self, i: int):
        j = self.indices[i // 2] if self.fixed else self.indices[i]
        # Geometry that is recomputed from displaced points (aux_kind normals+fpfh) reads them when needed.
        xyz = (lambda: self.base.xyz_at(j)) if self.synth.aux_kind == "normals+fpfh" else None
        rng = np.random.default_rng((self.seed, 0 if self.fixed else self.epoch, j))
        sample = self.synth(self.base[j], rng, inject=(i % 2 == 0) if self.fixed else None, xyz=xyz)
        sample["index"] = j
        return sample


# --------------------------------------------------------------------------------------------------------
# Contact sheet
# --------------------------------------------------------------------------------------------------------

def contact_sheet(path: str, object_name: str = "disc", aux_ch: int = 3, size: int = 128, per_mode: int = 4,
                  seed: int = 0, anomaly_source_path: Optional[str] = None, misalign_px: float = 0.0) -> str:
    """Grid: one block of rows per mode, columns = samples; each cell shows RGB | aux | mask side by side."""
    from PIL import Image, ImageDraw
    from .synthetic import SyntheticDataset
    ds = SyntheticDataset(None, object_name, "train", size, aux_ch=aux_ch, seed=seed)
    rows: List[np.ndarray] = []
    labels = []
    for mode in ("rgb", "aux", "both", "mixed"):
        syn = AnomalySynthesizer(ds.aux_kind, mode, 1.0, anomaly_source_path, misalign_px)
        cells = []
        for i in range(per_mode):
            s = syn(ds[i], np.random.default_rng((seed, i, MODES.index(mode))))
            rgb = (denormalize_rgb(s["rgb"]).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            aux = aux_to_image(s["aux"]) if "aux" in s else np.zeros_like(rgb)
            mask = np.repeat((s["mask"][0].numpy() * 255).astype(np.uint8)[..., None], 3, axis=2)
            cells.append(np.concatenate([rgb, aux, mask, np.full((size, 4, 3), 255, np.uint8)], axis=1))
        rows.append(np.concatenate(cells, axis=1))
        labels.append(mode)
    pad = 18
    sheet = np.full((len(rows) * (size + pad), rows[0].shape[1], 3), 255, np.uint8)
    for k, r in enumerate(rows):
        sheet[k * (size + pad) + pad:(k + 1) * (size + pad)] = r
    img = Image.fromarray(sheet)
    draw = ImageDraw.Draw(img)
    for k, mode in enumerate(labels):
        draw.text((4, k * (size + pad) + 3), f"mode={mode}   (each cell: RGB | {ds.aux_kind} | mask)", fill=(0, 0, 0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path


def _main(argv=None):
    p = argparse.ArgumentParser("python -m datasets.synthesis",
                                description="Preview the training-anomaly synthesis on the synthetic dataset.")
    p.add_argument("--preview", required=True, metavar="OUT.png", help="where to write the contact sheet")
    p.add_argument("--object", default="disc", help="synthetic object type (disc, ring, tile)")
    p.add_argument("--aux_ch", type=int, default=3, choices=(1, 3), help="3 = normals, 1 = depth")
    p.add_argument("--size", type=int, default=128, help="image size in pixels")
    p.add_argument("--per_mode", type=int, default=4, help="samples per mode (columns)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--anomaly_source_path", default=None, help="texture folder (e.g. DTD); default: procedural")
    p.add_argument("--misalign_px", type=float, default=0.0, help="max random aux shift in pixels")
    a = p.parse_args(argv)
    out = contact_sheet(a.preview, a.object, a.aux_ch, a.size, a.per_mode, a.seed, a.anomaly_source_path,
                        a.misalign_px)
    print(f"wrote {out}")


if __name__ == "__main__":
    _main()
