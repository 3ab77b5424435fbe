"""Metrics against scikit-learn, brute-force loops and a slow, obviously-correct AUPRO reference."""
import math
import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

import metrics


def ref_aupro(maps, masks, limit):
    """Region by region, threshold by threshold, then the trapezoid rule with interpolation at the limit."""
    regions = []
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, n + 1)]
    normal = ~masks
    xs, ys = [0.0], [0.0]
    for t in sorted(np.unique(maps), reverse=True):
        xs.append((maps[normal] >= t).sum() / normal.sum())
        ys.append(np.mean([(maps[i][r] >= t).mean() for i, r in regions]))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def _toy_set(seed, n=4, size=10, decimals=1):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        for _ in range(rng.integers(1, 3)):
            y, x = rng.integers(0, size - 3, 2)
            masks[i, y:y + rng.integers(1, 4), x:x + rng.integers(1, 4)] = True
    maps = np.round(rng.random((n, size, size)) + 0.4 * masks, decimals)  # many ties
    return maps, masks


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_equals_slow_reference(seed, limit):
    maps, masks = _toy_set(seed)
    assert abs(metrics.aupro(maps, masks, limit) - ref_aupro(maps, masks, limit)) < 1e-9


def test_aupro_perfect_and_inverted_maps():
    _, masks = _toy_set(0)
    perfect = masks.astype(float) + 0.01 * np.random.default_rng(1).random(masks.shape)
    assert metrics.aupro(perfect, masks) == pytest.approx(1.0, abs=1e-12)
    inverted = 1.0 - masks.astype(float)
    assert metrics.aupro(inverted, masks) == pytest.approx(0.0, abs=1e-12)
    assert 0.0 <= metrics.aupro(np.random.default_rng(2).random(masks.shape), masks) <= 1.0


def test_aupro_counts_regions_not_pixels():
    # One big region fully detected, one small region missed: PRO = mean over regions = 0.5 (a pixel-weighted
    # score would say ~0.9).
    masks = np.zeros((1, 20, 20), bool)
    masks[0, 2:12, 2:12] = True    # 100 px
    masks[0, 15:17, 15:17] = True  # 4 px
    maps = np.zeros((1, 20, 20))
    maps[0, 2:12, 2:12] = 1.0
    fpr, pro = metrics.pro_curve(maps, masks)
    assert pro[1] == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(4))
def test_image_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    s = np.round(rng.random(300), 2)
    y = rng.random(300) < 0.3
    assert metrics.image_auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert metrics.average_precision(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    maps, masks = _toy_set(seed)
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert metrics.pixel_ap(maps, masks) == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()),
                                                          abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_f1_max_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    s = np.round(rng.random(200), 2)
    y = rng.random(200) < 0.4
    best, best_t = 0.0, None
    for t in np.unique(s):
        pred = s >= t
        tp = (pred & y).sum()
        p = tp / pred.sum()
        r = tp / y.sum()
        f1 = 0.0 if tp == 0 else 2 * p * r / (p + r)
        if f1 > best:
            best, best_t = f1, t
    f1, t = metrics.f1_max(s, y, return_threshold=True)
    assert f1 == pytest.approx(best, abs=1e-12) and t == best_t


def test_degenerate_inputs_give_nan_with_warning():
    with pytest.warns(RuntimeWarning, match="both classes"):
        assert np.isnan(metrics.image_auroc([0.1, 0.2], [0, 0]))
    with pytest.warns(RuntimeWarning):
        assert np.isnan(metrics.f1_max([0.1, 0.2], [1, 1]))
    with pytest.warns(RuntimeWarning, match="regions"):
        assert np.isnan(metrics.aupro(np.zeros((2, 4, 4)), np.zeros((2, 4, 4), bool)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = metrics.compute_metrics([0.1, 0.9], [0, 1], np.zeros((2, 4, 4)), np.zeros((2, 4, 4), bool))
    assert out["image_auroc"] == 1.0 and np.isnan(out["pixel_auroc"]) and np.isnan(out["aupro"])
    assert set(out) == set(metrics.METRIC_KEYS) | {"pixel_images_excluded"}
    assert out["pixel_images_excluded"] == 1  # the anomalous image has no mask


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="differ in size"):
        metrics.image_auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        metrics.image_auroc([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.aupro(np.zeros((1, 2, 2)), np.ones((1, 2, 2), bool), 0.0)


@pytest.mark.parametrize("seed", range(4))
def test_compute_metrics_strict_aupro_limits_equal_slow_reference(seed):
    maps, masks = _toy_set(seed, n=5)
    labels = masks.reshape(len(masks), -1).any(1).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # every image is anomalous: image metrics are NaN
        out = metrics.compute_metrics(maps.max(axis=(1, 2)), labels, maps, masks)
    for key, limit in (("aupro", 0.3), ("aupro_0.1", 0.1), ("aupro_0.05", 0.05), ("aupro_0.01", 0.01)):
        assert out[key] == pytest.approx(ref_aupro(maps, masks, limit), abs=1e-9), key
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert out["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert out["pixel_f1_max"] == pytest.approx(metrics.pixel_f1_max(maps, masks), abs=1e-12)


def test_descending_sorts_float32_keys_exactly():
    """The packed-key sort of float32 scores: a permutation whose scores are numpy's descending sort bit for bit,
    through negatives, signed zeros, subnormals, the extremes and ties."""
    rng = np.random.default_rng(0)
    special = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, 3.4e38, -3.4e38, 1.0, -1.0], np.float32)
    scores = np.concatenate([special.repeat(50), rng.standard_normal(metrics.PACKED_SORT_MIN).astype(np.float32),
                             np.round(rng.random(3000), 2).astype(np.float32)])
    rng.shuffle(scores)
    order, ordered = metrics._descending(scores)
    assert np.array_equal(np.sort(order), np.arange(scores.size))
    assert np.array_equal(scores[order].view(np.uint32), ordered.view(np.uint32))
    assert np.array_equal(ordered, np.sort(scores)[::-1])


@pytest.mark.parametrize("seed", range(3))
def test_compute_metrics_on_float32_maps_large_enough_for_packed_keys(seed):
    """float32 maps of more pixels than PACKED_SORT_MIN, with ties and negative scores: the slow AUPRO reference
    and scikit-learn's pixel metrics."""
    maps, masks = _toy_set(seed, n=4, size=72, decimals=2)
    maps = (maps - 0.5).astype(np.float32)
    assert maps.size >= metrics.PACKED_SORT_MIN
    labels = masks.reshape(len(masks), -1).any(1).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = metrics.compute_metrics(maps.max(axis=(1, 2)), labels, maps, masks)
    for key, limit in (("aupro", 0.3), ("aupro_0.05", 0.05), ("aupro_0.01", 0.01)):
        assert out[key] == pytest.approx(ref_aupro(maps, masks, limit), abs=1e-9), key
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert out["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)


def test_pixel_metrics_are_nan_when_no_image_enters_them():
    """Every image anomalous and without a mask: no pixel enters the pixel metrics, which are NaN with a warning,
    as for any degenerate set (this raised an IndexError before)."""
    rng = np.random.default_rng(0)
    maps, masks = rng.random((3, 8, 8)).astype(np.float32), np.zeros((3, 8, 8), bool)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")        # the image metrics warn too: one class only
        out = metrics.compute_metrics(maps.max(axis=(1, 2)), np.ones(3, int), maps, masks)
    assert any("pixel metrics need" in str(w.message) for w in caught)
    assert out["pixel_images_excluded"] == 3
    assert all(math.isnan(out[k]) for k in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro", "aupro_0.01"))


def test_strict_limits_separate_an_outline_from_a_detector():
    """A map that marks the whole object (here: a disc around the defect) scores high at FPR 0.3 and low at 0.01."""
    yy, xx = np.mgrid[:64, :64]
    obj = (yy - 32) ** 2 + (xx - 32) ** 2 < 12 ** 2
    masks = np.zeros((4, 64, 64), bool)
    masks[:, 30:33, 30:33] = True
    outline = np.broadcast_to(obj.astype(float), masks.shape) + 0.01 * np.random.default_rng(0).random(masks.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # image metrics are undefined here, pixel ones are not
        out = metrics.compute_metrics([1, 1, 1, 1.0], [1, 1, 1, 1], outline, masks)
    assert out["aupro"] > 0.5 and out["aupro_0.01"] < 0.1


def test_anomalous_images_without_mask_are_left_out_of_pixel_metrics():
    maps, masks = _toy_set(3, n=4)
    labels = np.ones(4, int)
    nomask_map = np.full((1,) + maps.shape[1:], 5.0)  # would be a flood of "normal" false positives if counted
    all_maps = np.concatenate([maps, nomask_map])
    all_masks = np.concatenate([masks, np.zeros((1,) + masks.shape[1:], bool)])
    good_map = np.zeros((1,) + maps.shape[1:])
    all_maps = np.concatenate([all_maps, good_map])
    all_masks = np.concatenate([all_masks, np.zeros_like(all_masks[:1])])
    all_labels = np.r_[labels, 1, 0]
    out = metrics.compute_metrics(all_maps.max(axis=(1, 2)), all_labels, all_maps, all_masks)
    assert out["pixel_images_excluded"] == 1
    keep = np.r_[True, True, True, True, False, True]
    assert out["aupro"] == pytest.approx(ref_aupro(all_maps[keep], all_masks[keep], 0.3), abs=1e-9)
    assert out["pixel_ap"] == pytest.approx(average_precision_score(all_masks[keep].ravel(),
                                                                    all_maps[keep].ravel()))
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(all_masks[keep].ravel(), all_maps[keep].ravel()))
    # the image metrics still see all six images
    assert out["image_auroc"] == pytest.approx(roc_auc_score(all_labels, all_maps.max(axis=(1, 2))))


def test_exceedance_bounds_hold_for_exchangeable_scores():
    """A new good part exchangeable with the n that set a threshold lies above the k-th largest of them with
    probability k / (n + 1): the bounds of the quantile threshold_at_fpr takes, checked against the exact value for
    uniform scores (1 - the threshold, averaged over many draws) and on hand-made cases."""
    from metrics import exceedance_bounds, threshold_at_fpr
    five = np.arange(1.0, 6.0)                                  # the 0.95 quantile: 4.8, between the two largest
    assert exceedance_bounds(five, threshold_at_fpr(five, 0.05)) == pytest.approx((1 / 6, 2 / 6))
    assert exceedance_bounds(five, 5.0) == pytest.approx((1 / 6, 1 / 6))      # on a score: exactly its rank
    assert exceedance_bounds(five, 0.0) == pytest.approx((5 / 6, 1.0))
    rng = np.random.default_rng(0)
    for n, fpr in [(5, 0.05), (16, 0.05), (20, 0.05), (40, 0.1)]:
        u = rng.random((20000, n))
        thr = np.quantile(u, 1 - fpr, axis=1)
        flagged = float(np.mean(1.0 - thr))                     # P(new uniform > thr), averaged over the draws
        lo, hi = exceedance_bounds(u[0], threshold_at_fpr(u[0], fpr))
        assert lo <= flagged <= hi, (n, fpr, lo, flagged, hi)
        assert flagged > fpr                                    # a quantile of few parts flags more than its target
    with pytest.raises(ValueError, match="finite"):
        exceedance_bounds([1.0, float("nan")], 0.5)
