"""Reading files and aligned transforms shared by every dataset.

All modalities of a sample go through the same resize / centre crop / flip, so they stay aligned:
  * RGB: bilinear (antialiased) resize, ImageNet normalisation;
  * normals (aux_kind "normals"): resized as vectors weighted by the valid mask, then re-normalised to unit
    length; a horizontal flip negates the x component, a vertical flip the y component;
  * depth ("depth"): resized with the valid mask as weights, then standardised per image over valid pixels
    (invalid pixels are 0);
  * infrared / intensity ("intensity"): values in [0, 1] mapped to (x - 0.5) / 0.25;
  * FPFH ("fpfh", 33 channels: point-feature histograms of the cloud, pointcloud.py): resized with the valid mask
    as weights, kept as they are (histogram percentages; the memory bank compares them as they come);
  * normals + FPFH ("normals+fpfh", 36 channels: 3 normals then 33 FPFH; MambaAlign with an FPFH memory bank,
    ``train.py --aux_feature fpfh``): each part as above;
  * masks: binarised with ``> 0`` (some official masks store 253..255 or class ids, not 255), resized nearest.

Normals convention: camera frame (x right, y down, z forward), unit vectors pointing towards the camera.
"""
from __future__ import annotations

import os

from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "AUX_KINDS", "DatasetError", "read_image", "read_mask", "translate",
           "probe_file", "GEOMETRY_AUX_KIND", "NORMALS_KINDS",
           "read_tiff", "to_hw", "AlignedTransform", "normals_from_xyz", "decode_normals_png",
           "normalize_rgb", "denormalize_rgb", "aux_to_image", "colormap"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUX_KINDS = {"normals": 3, "depth": 1, "intensity": 1, "fpfh": 33, "normals+fpfh": 36}
# What aux_ch means for a geometric sensor (normals or depth; 0 = RGB only).
GEOMETRY_AUX_KIND = {3: "normals", 1: "depth", 0: None, 33: "fpfh", 36: "normals+fpfh"}
# Aux kinds whose first three channels are unit normals (flips and rotations turn them).
NORMALS_KINDS = ("normals", "normals+fpfh")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset file or folder is missing, unreadable or not what the loader expects (the message says)."""


def to_hw(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


# Pillow modes of one-channel images deeper than 8 bits: converting them to "RGB" or "L" saturates (a 16-bit
# image becomes white), so they are scaled to 8 bits first.
_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _to_8bit(im, path: str):
    """A one-channel image deeper than 8 bits as an 8-bit ("L") image: 16-bit integers scaled by 255/65535;
    floats in [0, 1] by 255 and floats in [0, 255] kept; anything else (other ranges, non-finite) is refused."""
    from PIL import Image
    a = np.asarray(im)
    if im.mode == "F":
        if not np.isfinite(a).all():
            raise DatasetError(f"image {path} holds non-finite values (NaN or inf)")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 255:
            raise DatasetError(f"cannot read image {path}: a float image with values in [{lo:g}, {hi:g}]; "
                               f"expected [0, 1] or [0, 255]")
        a = a * 255.0 if hi <= 1.0 else a
    else:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise DatasetError(f"cannot read image {path}: a {im.mode} image with values in [{lo}, {hi}]; "
                               f"expected 16-bit values")
        a = a.astype(np.float64) * (255.0 / 65535.0)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def read_image(path: str, mode: Optional[str] = None) -> np.ndarray:
    """Read an image fully (truncated files fail here, not later) and convert it to ``mode`` if given. Any bit
    depth and mode converts correctly: 16-bit and float one-channel images are scaled to 8 bits first (they
    would saturate), palette, grey+alpha and RGBA images convert by Pillow's rules (alpha dropped)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im.load()
            if mode is not None and im.mode != mode:
                if im.mode in _DEEP_MODES and mode in ("RGB", "L"):
                    im = _to_8bit(im, path)
                im = im.convert(mode) if im.mode != mode else im
            return np.array(im)
    except FileNotFoundError:
        raise DatasetError(f"file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


def read_mask(path: str) -> np.ndarray:
    """A ground-truth mask as a bool (H, W) array: any non-zero value is anomalous."""
    m = read_image(path)
    if m.ndim == 3:
        m = m.max(axis=2)
    return m > 0


def read_tiff(path: str) -> np.ndarray:
    import tifffile
    try:
        arr = np.asarray(tifffile.imread(path))
    except FileNotFoundError:
        raise DatasetError(f"file not found: {path}") from None
    except Exception as exc:  # tifffile raises many types (TiffFileError, ValueError, struct.error) on bad files
        raise DatasetError(f"cannot read TIFF {path}: {exc}") from exc
    if arr.size == 0:  # tifffile returns an empty array for some corrupt files instead of raising
        raise DatasetError(f"cannot read TIFF {path}: no image data (truncated or corrupt file)")
    return arr


def probe_file(path: str) -> Tuple[int, int, int]:
    """(H, W, channels) of an image or TIFF file, read cheaply: headers, PNG chunk checksums (a truncated PNG
    fails here) and, for TIFF, that every strip or tile lies inside the file. Raises DatasetError naming the
    path."""
    if path.lower().endswith((".tif", ".tiff")):
        import tifffile
        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape = tuple(series.shape)
                if series.dataoffset is not None:       # uncompressed, contiguous: it must all be in the file
                    end = series.dataoffset + series.nbytes
                else:
                    end = max((o + c for page in tif.pages for o, c in zip(page.dataoffsets, page.databytecounts)),
                              default=0)
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise DatasetError(f"file not found: {path}") from None
        except Exception as exc:  # tifffile raises many types on bad files
            raise DatasetError(f"cannot read TIFF {path}: {exc}") from exc
        if end > size or not shape or 0 in shape:
            raise DatasetError(f"cannot read TIFF {path}: truncated (its data ends at byte {end}, the file has "
                               f"{size})")
        return shape[0], shape[1], shape[2] if len(shape) > 2 else 1
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            w, h = im.size
            bands = len(im.getbands())
            im.verify()
    except FileNotFoundError:
        raise DatasetError(f"file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc
    return h, w, bands


def decode_normals_png(arr: np.ndarray, axis_order: str = "xyz", flip: str = "", path: str = ""
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """Decode normals stored as an 8- or 16-bit RGB image: [0, max] -> [-1, 1] per channel, reorder channels
    (``axis_order``: which of x, y, z each stored channel holds), negate the axes in ``flip`` and normalise.
    Returns unit normals (H, W, 3) and a valid mask (H, W) (False where the stored vector is ~0)."""
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise DatasetError(f"normals image {path} must have 3 channels, got shape {arr.shape}")
    scale = 65535.0 if arr.dtype == np.uint16 else 255.0 if arr.dtype == np.uint8 else 1.0
    n = arr[..., :3].astype(np.float32)
    n = n / scale * 2 - 1 if scale != 1.0 else n
    if sorted(axis_order) != ["x", "y", "z"]:
        raise ValueError(f"axis_order must be a permutation of 'xyz', got {axis_order!r}")
    out = np.empty_like(n)
    for i, axis in enumerate(axis_order):
        out[..., "xyz".index(axis)] = n[..., i]
    for axis in flip:
        out[..., "xyz".index(axis)] *= -1
    norm = np.linalg.norm(out, axis=2, keepdims=True)
    valid = norm[..., 0] > 1e-3
    out = np.where(norm > 1e-3, out / np.maximum(norm, 1e-12), 0).astype(np.float32)
    return out, valid


def normals_from_xyz(xyz: np.ndarray, path: str = "") -> Tuple[np.ndarray, np.ndarray]:
    """Unit normals (H, W, 3) and a valid mask (H, W) from an organised point cloud (H, W, 3), zeros = missing.

    n = dP/dx x dP/dy, normalised, oriented towards the camera (n . P < 0). Each derivative is the central
    difference where both neighbours have points, else the one-sided difference to the neighbour that has one (as
    ``np.gradient`` does at an array's edge). A pixel is valid when it has a point and a neighbour along each axis.

    Why one-sided: with central differences only, the image border and every pixel beside a missing point had no
    normal (zeros). A model trained on normals rendered everywhere (the synthetic objects) then saw a ring of
    zeros on every image read from xyz and flagged every part; the object's silhouette lost its outermost pixels.
    """
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise DatasetError(f"xyz file {path} must be an organised H x W x 3 point cloud, got shape {xyz.shape}")
    P = xyz.astype(np.float64)
    has = np.any(P != 0, axis=2)

    def derivative(axis: int):
        Pp = np.pad(P, [(1, 1) if a == axis else (0, 0) for a in range(3)])
        hp = np.pad(has, [(1, 1) if a == axis else (0, 0) for a in range(2)])
        cut = lambda x, lo, hi: x[lo:x.shape[0] - hi] if axis == 0 else x[:, lo:x.shape[1] - hi]
        before, after = cut(Pp, 0, 2), cut(Pp, 2, 0)
        h_before, h_after = cut(hp, 0, 2)[..., None], cut(hp, 2, 0)[..., None]
        d = np.where(h_before & h_after, after - before,
                     np.where(h_after, after - P, np.where(h_before, P - before, 0.0)))
        return d, (h_before | h_after)[..., 0]

    dx, ok_x = derivative(1)
    dy, ok_y = derivative(0)
    n = np.cross(dx, dy)
    norm = np.linalg.norm(n, axis=2, keepdims=True)
    valid = has & ok_x & ok_y & (norm[..., 0] > 1e-12)
    n = n / np.maximum(norm, 1e-12)
    flip = np.sum(n * P, axis=2) > 0
    n[flip] *= -1
    n[~valid] = 0
    return n.astype(np.float32), valid


def translate(x: torch.Tensor, dx: float, dy: float = 0.0) -> torch.Tensor:
    """Shift a (C, H, W) map right by dx and down by dy pixels (bilinear, sub-pixel; border values repeat)."""
    C, H, W = x.shape
    theta = torch.tensor([[1.0, 0.0, -2 * dx / W], [0.0, 1.0, -2 * dy / H]], dtype=torch.float32)
    grid = F.affine_grid(theta[None], (1, C, H, W), align_corners=False)
    return F.grid_sample(x[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def _mean_std(x: torch.Tensor):
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return mean, std


def normalize_rgb(rgb01: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of RGB in [0, 1]: (3, H, W) or (B, 3, H, W)."""
    mean, std = _mean_std(rgb01)
    return (rgb01 - mean) / std


def denormalize_rgb(rgb: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation: (3, H, W) or (B, 3, H, W) -> values in [0, 1]."""
    mean, std = _mean_std(rgb)
    return (rgb * std + mean).clamp(0, 1)


def aux_to_image(aux: torch.Tensor) -> np.ndarray:
    """An aux map (C, H, W) as a (H, W, 3) uint8 picture: unit normals (the first 3 of normals + FPFH's 36) as
    colours (n * 0.5 + 0.5), other modalities (depth, infrared; FPFH's first bin) min-max scaled to grey."""
    if aux.shape[0] in (3, AUX_KINDS["normals+fpfh"]):
        return ((aux[:3].permute(1, 2, 0).numpy() * 0.5 + 0.5).clip(0, 1) * 255).astype(np.uint8)
    a = aux[0].numpy()
    a = (a - a.min()) / (a.max() - a.min() + 1e-8)
    return np.repeat((a * 255).astype(np.uint8)[..., None], 3, axis=2)


# viridis, sampled at 9 evenly spaced points (perceptually uniform, colour-blind friendly)
_VIRIDIS = np.array([(68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141), (39, 173, 129),
                     (92, 200, 99), (170, 220, 50), (253, 231, 37)], dtype=np.float64)


def colormap(x: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 viridis."""
    t = np.clip(x, 0, 1) * (len(_VIRIDIS) - 1)
    i = np.minimum(t.astype(int), len(_VIRIDIS) - 2)
    f = (t - i)[..., None]
    return (_VIRIDIS[i] * (1 - f) + _VIRIDIS[i + 1] * f).astype(np.uint8)


def _resize(x: torch.Tensor, size, mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x[None], size=size, mode="nearest-exact")[0]
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def _center_crop(x: torch.Tensor, size) -> torch.Tensor:
    H, W = x.shape[-2:]
    h, w = size
    if h > H or w > W:
        raise ValueError(f"crop size {size} is larger than the resized image {(H, W)}")
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top:top + h, left:left + w]


class AlignedTransform:
    """Resize (and optionally centre-crop and flip) rgb, aux, mask and valid together, then normalise.

    img_size: int or (H, W) after resizing; crop_size: optional centre crop after the resize; hflip / vflip:
    probabilities of random flips (training augmentation; needs ``rng``); aux_kind: normals | depth | intensity.
    Inputs are numpy arrays: rgb (H, W, 3) uint8, aux (H, W, C) float32, mask / valid (H, W) bool.
    """

    def __init__(self, img_size, aux_kind: Optional[str] = None, crop_size=None, hflip: float = 0.0,
                 vflip: float = 0.0, normalize_rgb: bool = True):
        if aux_kind is not None and aux_kind not in AUX_KINDS:
            raise ValueError(f"aux_kind must be one of {sorted(AUX_KINDS)} or None, got {aux_kind!r}")
        self.size = to_hw(img_size)
        self.crop = to_hw(crop_size) if crop_size else None
        self.aux_kind, self.hflip, self.vflip, self.normalize_rgb = aux_kind, hflip, vflip, normalize_rgb

    def __call__(self, rgb: np.ndarray, aux: Optional[np.ndarray] = None, mask: Optional[np.ndarray] = None,
                 valid: Optional[np.ndarray] = None, rng: Optional[np.random.Generator] = None
                 ) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        rgb_t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 255.0
        out["rgb"] = _resize(rgb_t, self.size, "bilinear")
        mask_t = torch.zeros(1, *rgb.shape[:2]) if mask is None else torch.from_numpy(mask.astype(np.float32))[None]
        out["mask"] = _resize(mask_t, self.size, "nearest")
        if aux is not None:
            aux_t = torch.from_numpy(np.ascontiguousarray(aux, dtype=np.float32))
            aux_t = aux_t[None] if aux_t.dim() == 2 else aux_t.permute(2, 0, 1)
            if valid is not None:
                v = torch.from_numpy(valid.astype(np.float32))[None]
                # Mask-weighted resize: missing points do not bleed into their neighbours.
                num = _resize(aux_t * v, self.size, "bilinear")
                den = _resize(v, self.size, "bilinear")
                aux_t = num / den.clamp_min(1e-6)
                out["valid"] = (den > 0.5).float()
                aux_t = aux_t * out["valid"]
            else:
                aux_t = _resize(aux_t, self.size, "bilinear")
            out["aux"] = aux_t
        if self.crop:
            out = {k: _center_crop(v, self.crop) for k, v in out.items()}
        if rng is not None:
            if self.hflip and rng.random() < self.hflip:
                out = {k: v.flip(-1) for k, v in out.items()}
                if self.aux_kind in NORMALS_KINDS:
                    out["aux"][0] = -out["aux"][0]
            if self.vflip and rng.random() < self.vflip:
                out = {k: v.flip(-2) for k, v in out.items()}
                if self.aux_kind in NORMALS_KINDS:
                    out["aux"][1] = -out["aux"][1]
        if "aux" in out:
            out["aux"] = self._normalize_aux(out["aux"], out.get("valid"))
        if self.normalize_rgb:
            out["rgb"] = normalize_rgb(out["rgb"])
        out["mask"] = (out["mask"] > 0.5).float()
        return out

    def points(self, xyz: np.ndarray) -> torch.Tensor:
        """An organised cloud (H, W, 3), zeros = missing, on this transform's grid: (3, h, w), resized with its
        valid mask as weights as aux is, centre-cropped, zeros where missing. For geometry that training anomalies
        displace and FPFH is recomputed from (datasets.synthesis); flips are not applied (see its callers)."""
        t = torch.from_numpy(np.ascontiguousarray(xyz, dtype=np.float32)).permute(2, 0, 1)
        v = (t != 0).any(0, keepdim=True).float()
        den = _resize(v, self.size, "bilinear")
        out = _resize(t * v, self.size, "bilinear") / den.clamp_min(1e-6) * (den > 0.5).float()
        return _center_crop(out, self.crop) if self.crop else out

    def _normalize_aux(self, aux: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
        if self.aux_kind in NORMALS_KINDS:
            n = aux[:3]
            norm = n.norm(dim=0, keepdim=True)
            n = torch.where(norm > 1e-6, n / norm.clamp_min(1e-6), torch.zeros_like(n))
            return torch.cat([n, aux[3:]]) if aux.shape[0] > 3 else n
        if self.aux_kind == "depth":
            v = valid if valid is not None else torch.ones_like(aux[:1])
            n = v.sum()
            if n < 2:
                return torch.zeros_like(aux)
            mean = (aux * v).sum() / n
            std = torch.sqrt((((aux - mean) * v) ** 2).sum() / n).clamp_min(1e-6)
            return (aux - mean) / std * v
        if self.aux_kind == "intensity":
            return (aux - 0.5) / 0.25
        return aux
