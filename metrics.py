"""Anomaly-detection metrics as pure functions: arrays in, floats or dicts out.

Definitions (higher score = more anomalous; "t" ranges over every distinct score, no threshold grid):

* AUROC: area under the ROC curve (TPR vs FPR over all thresholds), ties handled exactly.
* AP: average precision, sum_k (R_k - R_{k-1}) P_k over the precision-recall curve (scikit-learn's definition).
* F1-max: max over thresholds t of F1 for the prediction "score >= t". On a test set this is an ORACLE threshold
  (chosen with the test labels): report it as such, never as a deployable operating point.
* Pixel metrics pool every pixel of every image of the set into one ranking (not a mean over images).
* AUPRO (MVTec AD / MVTec 3D-AD definition): FPR(t) over all normal pixels of the set; PRO(t) = the mean over all
  8-connected ground-truth regions of the set of the fraction of the region's pixels with score >= t. The curve
  PRO(FPR) (from (0, 0), through one point per distinct score) is integrated with the trapezoid rule up to
  FPR = fpr_limit (linearly interpolated at the limit) and divided by fpr_limit, so a perfect map gives 1.

Degenerate inputs (one class only, no anomalous or no normal pixels) give NaN with a warning, never a crash.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["image_auroc", "average_precision", "f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro",
           "pro_curve", "compute_metrics", "METRIC_KEYS"]

METRIC_KEYS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro")
ArrayLike = Union[np.ndarray, Sequence[float]]  # torch tensors are accepted too (converted with .numpy())


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _degenerate(what: str) -> float:
    warnings.warn(f"{what}: returning NaN", RuntimeWarning, stacklevel=3)
    return float("nan")


def _descending(scores: np.ndarray) -> np.ndarray:
    """Indices that sort scores in descending order. The order inside a group of tied scores does not matter:
    every curve is read only at the last index of each tie group, where cumulative sums are order-free."""
    return np.argsort(scores)[::-1]


def _ranked_counts(scores: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort by descending score and return, per distinct score, the cumulative TP and FP counts and the score."""
    order = _descending(scores)
    s = scores[order]
    y = labels[order].astype(np.float64)
    tp = np.cumsum(y)
    fp = np.cumsum(1.0 - y)
    last = np.r_[np.diff(s) != 0, True]          # last index of each group of tied scores
    return tp[last], fp[last], s[last]


def _flat(scores, labels, what):
    s = _np(scores).ravel()
    if s.dtype not in (np.float32, np.float64):
        s = s.astype(np.float64)
    y = _np(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{what}: scores and labels differ in size ({s.size} vs {y.size})")
    if not np.isfinite(s).all():
        raise ValueError(f"{what}: scores contain NaN or inf")
    return s, (y > 0)


def _auroc(s: np.ndarray, y: np.ndarray, what: str) -> float:
    P, N = int(y.sum()), int((~y).sum())
    if P == 0 or N == 0:
        return _degenerate(f"{what} needs both classes (positives={P}, negatives={N})")
    tp, fp, _ = _ranked_counts(s, y)
    tpr = np.r_[0.0, tp / P]
    fpr = np.r_[0.0, fp / N]
    return float(np.trapezoid(tpr, fpr))


def _ap(s: np.ndarray, y: np.ndarray, what: str) -> float:
    P = int(y.sum())
    if P == 0 or P == y.size:
        return _degenerate(f"{what} needs both classes (positives={P}, total={y.size})")
    tp, fp, _ = _ranked_counts(s, y)
    precision = tp / (tp + fp)
    recall = tp / P
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _f1max(s: np.ndarray, y: np.ndarray, what: str) -> Tuple[float, float]:
    P = int(y.sum())
    if P == 0 or P == y.size:
        return _degenerate(f"{what} needs both classes (positives={P}, total={y.size})"), float("nan")
    tp, fp, thr = _ranked_counts(s, y)
    precision = tp / (tp + fp)
    recall = tp / P
    denom = precision + recall
    f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
    k = int(np.argmax(f1))
    return float(f1[k]), float(thr[k])


def image_auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Image-level AUROC (equals sklearn.metrics.roc_auc_score)."""
    return _auroc(*_flat(scores, labels, "image_auroc"), "image_auroc")


def average_precision(scores: ArrayLike, labels: ArrayLike) -> float:
    """Average precision (equals sklearn.metrics.average_precision_score)."""
    return _ap(*_flat(scores, labels, "average_precision"), "average_precision")


def f1_max(scores: ArrayLike, labels: ArrayLike, return_threshold: bool = False):
    """Max over thresholds t of F1 for "score >= t" (an oracle threshold on a test set).
    With ``return_threshold`` returns (f1, t)."""
    f1, t = _f1max(*_flat(scores, labels, "f1_max"), "f1_max")
    return (f1, t) if return_threshold else f1


def pixel_auroc(maps: ArrayLike, masks: ArrayLike) -> float:
    """AUROC over all pixels of all images pooled. maps, masks: (N, H, W) (or any equal shapes)."""
    return _auroc(*_flat(maps, masks, "pixel_auroc"), "pixel_auroc")


def pixel_ap(maps: ArrayLike, masks: ArrayLike) -> float:
    """Average precision over all pixels pooled."""
    return _ap(*_flat(maps, masks, "pixel_ap"), "pixel_ap")


def pixel_f1_max(maps: ArrayLike, masks: ArrayLike) -> float:
    """F1-max over all pixels pooled (oracle threshold)."""
    return _f1max(*_flat(maps, masks, "pixel_f1_max"), "pixel_f1_max")[0]


def pro_curve(maps: ArrayLike, masks: ArrayLike, fpr_limit: Optional[float] = None):
    """The PRO curve of a set: (fpr, pro) arrays from (0, 0), one point per distinct score.
    maps, masks: (N, H, W). Regions are the 8-connected components of each image's mask.
    With ``fpr_limit`` the curve stops at the first point past the limit: only the pixels that score at least
    as high as that point are sorted (an O(n) partition finds them), which is what makes AUPRO fast."""
    from scipy import ndimage
    maps, masks = _np(maps), _np(masks) > 0
    if maps.ndim == 2:
        maps, masks = maps[None], masks[None]
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ValueError(f"aupro: maps and masks must both be (N, H, W), got {maps.shape} and {masks.shape}")
    structure = np.ones((3, 3), dtype=bool)                      # 8-connectivity
    region_ids = np.zeros(masks.shape, dtype=np.int64)
    sizes = [0]
    n_regions = 0
    for i in range(masks.shape[0]):
        lab, n = ndimage.label(masks[i], structure=structure)
        if n:
            region_ids[i] = np.where(lab > 0, lab + n_regions, 0)
            sizes.extend(np.bincount(lab.ravel())[1:].tolist())
            n_regions += n
    n_normal = int((~masks).sum())
    if n_regions == 0 or n_normal == 0:
        return None, (n_regions, n_normal)
    scores = maps.ravel() if maps.dtype in (np.float32, np.float64) else maps.astype(np.float64).ravel()
    if not np.isfinite(scores).all():
        raise ValueError("aupro: maps contain NaN or inf")
    ids = region_ids.ravel()
    if fpr_limit is not None and fpr_limit < 1:
        # The score of the (k+1)-th highest normal pixel, k = ceil(limit * n_normal): keeping every pixel scoring
        # >= it keeps whole tie groups and at least one curve point beyond the limit.
        normal_scores = scores[ids == 0]
        k = min(n_normal - 1, int(math.ceil(fpr_limit * n_normal)))
        cut = np.partition(normal_scores, n_normal - 1 - k)[n_normal - 1 - k]
        keep = scores >= cut
        scores, ids = scores[keep], ids[keep]
    # Each normal pixel adds 1/n_normal to the FPR; each pixel of region r adds 1/(|r| * n_regions) to the PRO.
    fp_step = (ids == 0) / n_normal
    inv = np.zeros(len(sizes))
    inv[1:] = 1.0 / (np.asarray(sizes[1:], dtype=np.float64) * n_regions)
    pro_step = inv[ids]
    order = _descending(scores)
    s = scores[order]
    fpr = np.cumsum(fp_step[order])
    pro = np.cumsum(pro_step[order])
    last = np.r_[np.diff(s) != 0, True]
    fpr = np.clip(np.r_[0.0, fpr[last]], 0.0, 1.0)
    pro = np.clip(np.r_[0.0, pro[last]], 0.0, 1.0)
    return fpr, pro


def aupro(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Normalised area under PRO(FPR) for FPR in [0, fpr_limit] (MVTec definition; see the module docstring)."""
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(maps, masks, fpr_limit)
    if fpr is None:
        n_regions, n_normal = pro
        return _degenerate(f"aupro needs anomalous regions and normal pixels (regions={n_regions}, "
                           f"normal pixels={n_normal})")
    # Interpolate PRO at the limit, then integrate the curve up to it.
    k = int(np.searchsorted(fpr, fpr_limit, side="right"))
    if k < fpr.size and fpr[k - 1] < fpr_limit:
        x0, x1, y0, y1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        fx, fy = np.r_[fpr[:k], fpr_limit], np.r_[pro[:k], y_lim]
    else:
        fx, fy = fpr[:k], pro[:k]
    return float(np.trapezoid(fy, fx) / fpr_limit)


def compute_metrics(image_scores: ArrayLike, image_labels: ArrayLike, maps: Optional[ArrayLike] = None,
                    masks: Optional[ArrayLike] = None, fpr_limit: float = 0.3) -> Dict[str, float]:
    """All metrics of METRIC_KEYS. Pixel metrics are NaN when no maps/masks are given."""
    out = {"image_auroc": image_auroc(image_scores, image_labels),
           "image_ap": average_precision(image_scores, image_labels),
           "image_f1_max": f1_max(image_scores, image_labels)}
    if maps is not None and masks is not None:
        out.update(pixel_auroc=pixel_auroc(maps, masks), pixel_ap=pixel_ap(maps, masks),
                   pixel_f1_max=pixel_f1_max(maps, masks), aupro=aupro(maps, masks, fpr_limit))
    else:
        out.update({k: float("nan") for k in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro")})
    return out


def nanmean(values) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")
