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
  Summaries report it at 0.3 (``aupro``) and at the strict limits 0.1, 0.05, 0.01 (``aupro_0.1`` ...).
* Anomalous images without a mask (the defect is visible only in another modality) are left out of the pixel
  metrics and kept in the image metrics (:func:`pixel_images_kept`).

Degenerate inputs (one class only, no anomalous or no normal pixels) give NaN with a warning, never a crash.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["threshold_at_fpr", "exceedance_bounds", "image_auroc", "average_precision", "f1_max", "pixel_auroc",
           "pixel_ap", "pixel_f1_max", "aupro",
           "aupro_key", "pro_curve", "pixel_images_kept", "compute_metrics", "METRIC_KEYS", "STRICT_LIMITS"]

# AUPRO at FPR 0.3 saturates on small defects (a map that only outlines the object scores about 0.96 there);
# the strict limits separate methods.
STRICT_LIMITS = (0.1, 0.05, 0.01)
METRIC_KEYS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro",
               "aupro_0.1", "aupro_0.05", "aupro_0.01")
ArrayLike = Union[np.ndarray, Sequence[float]]  # torch tensors are accepted too (converted with .numpy())


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _degenerate(what: str) -> float:
    warnings.warn(f"{what}: returning NaN", RuntimeWarning, stacklevel=3)
    return float("nan")


# Below this many scores an argsort is as fast as packing keys.
PACKED_SORT_MIN = 1 << 14


def _descending(scores: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(order, sorted): indices that sort scores in descending order, and the scores in that order. The order
    inside a group of tied scores does not matter: every curve is read only at the last index of each tie group,
    where counts are order-free (PRO's weights are summed in the pixels' order there, so the rounding of its last
    bits is the order's).

    float32 scores (every map of this repo) are sorted as one uint64 key per score: the float's bits mapped to
    an order-preserving unsigned integer in the high half, the index in the low half. numpy sorts plain integers
    with its vectorised sort, and the sorted scores come back from the keys without a gather; 3.8 M scores (58
    maps of 256 x 256) take 40-65 ms that way against 170-220 ms for ``argsort`` and a gather, which were most of
    a summary's metrics."""
    if scores.dtype != np.float32 or not PACKED_SORT_MIN <= scores.size < 1 << 32:
        order = np.argsort(scores)[::-1]
        return order, scores[order]
    bits = np.ascontiguousarray(scores).view(np.uint32)
    sign = np.uint32(1 << 31)
    # negative floats: every bit flipped (larger magnitude, smaller key); others: the sign bit set
    key = np.where(bits >= sign, ~bits, bits | sign).astype(np.uint64)
    key <<= np.uint64(32)
    key |= np.arange(scores.size, dtype=np.uint64)
    key.sort()
    key = key[::-1]
    mapped = (key >> np.uint64(32)).astype(np.uint32)
    ordered = np.where(mapped >= sign, mapped ^ sign, ~mapped).view(np.float32)
    return (key & np.uint64(0xFFFFFFFF)).astype(np.intp), ordered


def _ranked(scores: np.ndarray, labels: np.ndarray):
    """Sort by descending score -> (order, the boolean labels in that order, and per distinct score: the
    cumulative TP and FP counts at its tie group's last index, and the score)."""
    order, s = _descending(scores)
    y = labels[order]
    last = np.append(np.flatnonzero(s[1:] != s[:-1]), s.size - 1)   # last index of each tie group
    tp = np.cumsum(y, dtype=np.float64)[last]
    return order, y, tp, (last + 1) - tp, s[last]                  # fp: integers, exact in float64


def _ranked_counts(scores: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per distinct score (descending): the cumulative TP and FP counts and the score."""
    return _ranked(scores, labels)[2:]


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


# The formulas, on cumulative counts per distinct score (tp, fp, thr as _ranked_counts returns them, P positives
# and N negatives in all): one copy serves the image metrics and the pooled-pixel ranking.

def _auroc_of(tp, fp, P: int, N: int) -> float:
    return float(np.trapezoid(np.r_[0.0, tp / P], np.r_[0.0, fp / N]))


def _ap_of(tp, fp, P: int) -> float:
    return float(np.sum(np.diff(np.r_[0.0, tp / P]) * (tp / (tp + fp))))


def _f1max_of(tp, fp, thr, P: int) -> Tuple[float, float]:
    precision, recall = tp / (tp + fp), tp / P
    denom = precision + recall
    f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
    k = int(np.argmax(f1))
    return float(f1[k]), float(thr[k])


def _both_classes(P: int, N: int, what: str) -> bool:
    """True when the ranking has positives and negatives; otherwise warns (the caller returns NaN)."""
    if P == 0 or N == 0:
        _degenerate(f"{what} needs both classes (positives={P}, negatives={N})")
        return False
    return True


def _auroc(s: np.ndarray, y: np.ndarray, what: str) -> float:
    P, N = int(y.sum()), int((~y).sum())
    if not _both_classes(P, N, what):
        return float("nan")
    tp, fp, _ = _ranked_counts(s, y)
    return _auroc_of(tp, fp, P, N)


def _ap(s: np.ndarray, y: np.ndarray, what: str) -> float:
    P, N = int(y.sum()), int((~y).sum())
    if not _both_classes(P, N, what):
        return float("nan")
    tp, fp, _ = _ranked_counts(s, y)
    return _ap_of(tp, fp, P)


def _f1max(s: np.ndarray, y: np.ndarray, what: str) -> Tuple[float, float]:
    P, N = int(y.sum()), int((~y).sum())
    if not _both_classes(P, N, what):
        return float("nan"), float("nan")
    return _f1max_of(*_ranked_counts(s, y), P)


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


class _PixelRanking:
    """All pixels of a set sorted ONCE by descending score; every pixel metric is read off this one order.

    maps, masks: (N, H, W). ``tp``, ``fp``: cumulative anomalous / normal pixel counts at the last index of each
    group of tied scores (where cumulative sums do not depend on the order inside the group); ``thr``: that
    group's score. Regions for PRO are the 8-connected components of each image's mask."""

    def __init__(self, maps, masks, what: str = "pixel metrics"):
        maps, masks = _np(maps), _np(masks) > 0
        if maps.ndim == 2:
            maps, masks = maps[None], masks[None]
        if maps.shape != masks.shape or maps.ndim != 3:
            raise ValueError(f"{what}: maps and masks must both be (N, H, W), got {maps.shape} and {masks.shape}")
        self.maps, self.masks = maps, masks
        scores = maps.ravel() if maps.dtype in (np.float32, np.float64) else maps.astype(np.float64).ravel()
        if not np.isfinite(scores).all():
            raise ValueError(f"{what}: maps contain NaN or inf")
        self.order, self.ranked_labels, self.tp, self.fp, self.thr = _ranked(scores, masks.ravel())
        self.P = int(self.ranked_labels.sum())
        self.N = self.ranked_labels.size - self.P

    def pro_curve(self):
        """(fpr, pro) from (0, 0), one point per distinct score; None when there are no regions or no normal
        pixels. Each normal pixel adds 1/n_normal to the FPR; each pixel of region r adds 1/(|r| * n_regions)
        to the PRO."""
        from scipy import ndimage
        structure = np.ones((3, 3), dtype=bool)                  # 8-connectivity
        region_ids = np.zeros(self.masks.shape, dtype=np.int32)
        sizes = []
        n_regions = 0
        for i in np.flatnonzero(self.masks.reshape(self.masks.shape[0], -1).any(1)):
            lab, n = ndimage.label(self.masks[i], structure=structure)
            if n:
                region_ids[i] = np.where(lab > 0, lab + n_regions, 0)
                sizes.extend(np.bincount(lab.ravel())[1:].tolist())
                n_regions += n
        if n_regions == 0 or self.N == 0:
            return None, (n_regions, self.N)
        inv = 1.0 / (np.asarray(sizes, dtype=np.float64) * n_regions)
        # Only anomalous pixels carry weight: their weights in ranked order, summed; a normal pixel would add 0.0,
        # which leaves a float sum as it is, so PRO at a tie group's end is this sum after its tp-th anomalous
        # pixel, the same bits as a running sum over every pixel.
        ranked_anomalous = self.order[np.flatnonzero(self.ranked_labels)]
        running = np.cumsum(inv[region_ids.ravel()[ranked_anomalous] - 1])
        pro = np.r_[0.0, running][self.tp.astype(np.int64)]
        fpr = np.clip(np.r_[0.0, self.fp / self.N], 0.0, 1.0)
        return fpr, np.clip(np.r_[0.0, pro], 0.0, 1.0)


def pro_curve(maps: ArrayLike, masks: ArrayLike):
    """The PRO curve of a set: (fpr, pro) arrays from (0, 0), one point per distinct score.
    maps, masks: (N, H, W). Regions are the 8-connected components of each image's mask. Returns
    (None, (n_regions, n_normal)) when the curve is undefined."""
    return _PixelRanking(maps, masks, "pro_curve").pro_curve()


def _check_limit(fpr_limit: float) -> None:
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


def _integrate_pro(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Trapezoid area under PRO(FPR) up to fpr_limit (PRO linearly interpolated at the limit) / fpr_limit."""
    k = int(np.searchsorted(fpr, fpr_limit, side="right"))
    if k < fpr.size and fpr[k - 1] < fpr_limit:
        x0, x1, y0, y1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        fx, fy = np.r_[fpr[:k], fpr_limit], np.r_[pro[:k], y_lim]
    else:
        fx, fy = fpr[:k], pro[:k]
    return float(np.trapezoid(fy, fx) / fpr_limit)


def _aupro_from(ranking: _PixelRanking, limits: Sequence[float]) -> List[float]:
    for limit in limits:
        _check_limit(limit)
    fpr, pro = ranking.pro_curve()
    if fpr is None:
        n_regions, n_normal = pro
        return [_degenerate(f"aupro needs anomalous regions and normal pixels (regions={n_regions}, "
                            f"normal pixels={n_normal})") for _ in limits]
    return [_integrate_pro(fpr, pro, limit) for limit in limits]


def aupro(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Normalised area under PRO(FPR) for FPR in [0, fpr_limit] (MVTec definition; see the module docstring)."""
    _check_limit(fpr_limit)
    return _aupro_from(_PixelRanking(maps, masks, "aupro"), [fpr_limit])[0]


def aupro_key(fpr_limit: float) -> str:
    """The summary key of AUPRO at a limit: ``aupro`` at the MVTec limit 0.3, ``aupro_0.05`` etc. otherwise."""
    return "aupro" if fpr_limit == 0.3 else f"aupro_{fpr_limit:g}"


def _ranking_metrics(r: _PixelRanking, what: str) -> Dict[str, float]:
    """AUROC, AP and F1-max of the pooled-pixel ranking (the image metrics' formulas)."""
    if not _both_classes(r.P, r.N, what):
        return {"auroc": float("nan"), "ap": float("nan"), "f1_max": float("nan")}
    return {"auroc": _auroc_of(r.tp, r.fp, r.P, r.N), "ap": _ap_of(r.tp, r.fp, r.P),
            "f1_max": _f1max_of(r.tp, r.fp, r.thr, r.P)[0]}


def pixel_images_kept(image_labels: ArrayLike, masks: ArrayLike) -> np.ndarray:
    """Boolean (N,): the images that enter pixel metrics. An anomalous image whose mask is empty (its defect shows
    in another modality, so this modality has no ground truth) is left out: its all-zero mask would count its
    defect pixels as normal. It stays in the image metrics."""
    labels = _np(image_labels).ravel() > 0
    masks = _np(masks)
    has_mask = masks.reshape(masks.shape[0], -1).any(axis=1)
    return ~(labels & ~has_mask)


def compute_metrics(image_scores: ArrayLike, image_labels: ArrayLike, maps: Optional[ArrayLike] = None,
                    masks: Optional[ArrayLike] = None, fpr_limit: float = 0.3) -> Dict[str, float]:
    """All metrics of METRIC_KEYS, plus ``pixel_images_excluded`` (anomalous images without a mask, left out of
    the pixel metrics, see :func:`pixel_images_kept`). ``aupro`` is taken at ``fpr_limit`` (MVTec: 0.3), the
    strict keys at their own limits. The pooled pixels are sorted once for every pixel metric. Pixel metrics are
    NaN when no maps/masks are given."""
    out = {"image_auroc": image_auroc(image_scores, image_labels),
           "image_ap": average_precision(image_scores, image_labels),
           "image_f1_max": f1_max(image_scores, image_labels)}
    pixel_keys = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro") + tuple(aupro_key(l) for l in STRICT_LIMITS)
    if maps is None or masks is None:
        out.update({k: float("nan") for k in pixel_keys})
        out["pixel_images_excluded"] = 0
        return out
    maps, masks = _np(maps), _np(masks)
    if maps.ndim == 2:
        maps, masks = maps[None], masks[None]
    keep = pixel_images_kept(image_labels, masks)
    out["pixel_images_excluded"] = int((~keep).sum())
    if not keep.any():     # every image anomalous and without a mask: no pixel to rank
        _degenerate("pixel metrics need an image with a mask or a good image (every image is anomalous without "
                    "a mask)")
        out.update({k: float("nan") for k in pixel_keys})
        return out
    ranking = _PixelRanking(maps[keep], masks[keep], "pixel metrics")
    r = _ranking_metrics(ranking, "pixel metrics")
    out.update(pixel_auroc=r["auroc"], pixel_ap=r["ap"], pixel_f1_max=r["f1_max"])
    limits = (fpr_limit,) + STRICT_LIMITS
    out.update(zip(("aupro",) + tuple(aupro_key(l) for l in STRICT_LIMITS), _aupro_from(ranking, limits)))
    return out


def threshold_at_fpr(normal_scores: ArrayLike, target_fpr: float) -> float:
    """The decision threshold that a ``target_fpr`` share of ``normal_scores`` (image scores of good parts) lie
    above: their (1 - target_fpr) quantile, linearly interpolated between order statistics (numpy's default,
    torch.quantile's too). Where it came from matters: train.py takes it from train normals, predict.py
    --calibrate_on from a line's good parts; never from a test split."""
    s = _np(normal_scores).astype(np.float64).ravel()
    if s.size < 2 or not np.isfinite(s).all():
        raise ValueError(f"a threshold needs at least 2 finite scores of good parts, got {s[:5].tolist()}")
    if not 0.0 <= target_fpr <= 1.0:
        raise ValueError(f"target_fpr must be in [0, 1], got {target_fpr}")
    return float(np.quantile(s, 1.0 - target_fpr))


def exceedance_bounds(normal_scores: ArrayLike, threshold: float) -> Tuple[float, float]:
    """(lo, hi): bounds of the probability that a new good part, exchangeable with the n good parts whose
    ``normal_scores`` set ``threshold`` (i.i.d. draws of one distribution: the same line, the same model), scores
    above it. Of n + 1 exchangeable continuous scores each rank is equally likely, so the new one lies above the
    k-th largest of the n with probability k / (n + 1). With a scores above the threshold: it lies between the
    a-th and the (a + 1)-th largest (lo = a / (n + 1), hi = (a + 1) / (n + 1)), or is the (a + 1)-th (lo = hi).
    A quantile of few scores flags more new good parts than its target: the 0.95 quantile of 5 (between the two
    largest) flags 1/6 to 1/3 of them, of 20 about 5-10 %, of 100 about 5-6 %. Distribution-free, so it holds for
    any model; it assumes the new parts come from where the n came from."""
    s = _np(normal_scores).astype(np.float64).ravel()
    if s.size < 1 or not np.isfinite(s).all() or not math.isfinite(threshold):
        raise ValueError(f"exceedance_bounds needs finite scores and a finite threshold, got {s[:5].tolist()} "
                         f"and {threshold}")
    above, n = int((s > threshold).sum()), s.size
    hi = (above + 1) / (n + 1)
    return (hi if bool((s == threshold).any()) else above / (n + 1)), hi


def nanmean(values) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")
