"""A training-free memory-bank baseline (PatchCore-style) on the same pretrained two-branch backbone.

For each modality (RGB, and aux where the data has it):

* patch features: the backbone's stage-3 and stage-4 outputs (strides 8 and 16), each averaged over its 3x3
  neighbourhood (local context, PatchCore's aggregation), stage 4 upsampled to stage 3's grid, concatenated;
* a memory bank of the train normals' patch features, reduced by greedy coreset selection (k-center on a seeded
  random projection) to at most ``coreset_size`` patches;
* the anomaly map of a test image: each patch's Euclidean distance to its nearest bank patch (``torch.cdist`` in
  blocks), upsampled to the input size and Gaussian-smoothed; the image score is the maximum of the map.

Modalities are fused by standardising each one's map and image score with the mean and standard deviation
measured on train normals held OUT of the bank (never on test), then summing. ``forward`` returns the same
dict as MambaAlign (``seg_logits`` = fused standardised map, ``anomaly_map`` = its sigmoid, ``score_logit`` =
fused standardised image score, ``score`` = its sigmoid), plus ``per_modality`` with each modality's own
standardised map and score. A model fitted with aux still runs from RGB alone (its RGB part).
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Dict, Iterable, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from metrics import threshold_at_fpr
from rgbx_backbone import RGBXBackbone

logger = logging.getLogger(__name__)

__all__ = ["KNNConfig", "PatchKNN", "MemoryBank", "pooled_patch_features", "fpfh_patches", "greedy_coreset",
           "greedy_coreset_ref", "nearest_distance", "nearest_distance_ref", "BankSearch", "search_dtype",
           "gaussian_blur", "separable_filter"]

MODEL_TYPE = "knn"
FPFH_CHANNELS = 33           # the fpfh aux modality (pointcloud.FPFH_DIM, datasets' aux_ch 33)


@dataclass
class KNNConfig:
    """Every choice of the memory-bank baseline, as plain values (travels inside the checkpoint)."""
    backbone: str = "efficientnet_lite0"
    aux_ch: int = 1
    stages: Tuple[int, ...] = (3, 4)     # backbone stages whose patch features are concatenated
    pool: int = 3                        # local averaging window of the patch features
    coreset_size: int = 4096             # bank size bound per modality
    projection_dim: int = 64             # random projection used only to pick the coreset
    sigma: float = 4.0                   # Gaussian smoothing of the upsampled map, in input pixels
    aux_feature: str = "cnn"             # cnn: the aux image through the backbone; fpfh: aux IS FPFH (33 channels)

    def __post_init__(self):
        self.stages = tuple(int(s) for s in self.stages)
        if self.aux_feature not in ("cnn", "fpfh"):
            raise ValueError(f"aux_feature must be 'cnn' or 'fpfh', got {self.aux_feature!r}")
        if self.aux_feature == "fpfh" and self.aux_ch != FPFH_CHANNELS:
            raise ValueError(f"aux_feature='fpfh' reads {FPFH_CHANNELS}-channel FPFH maps (aux_ch={FPFH_CHANNELS}), "
                             f"got aux_ch={self.aux_ch}")
        if self.aux_feature == "cnn" and self.aux_ch not in (0, 1, 3):
            raise ValueError(f"aux_ch must be 0, 1 or 3, got {self.aux_ch}")
        if self.coreset_size < 1 or self.pool < 1 or self.sigma < 0:
            raise ValueError(f"coreset_size and pool must be >= 1 and sigma >= 0, got {self.coreset_size}, "
                             f"{self.pool}, {self.sigma}")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "KNNConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown KNNConfig fields {unknown} (checkpoint from another version?)")
        return cls(**d)


def _projected(x: torch.Tensor, projection_dim: int, g: torch.Generator) -> torch.Tensor:
    """x (n, c) as float32, after a seeded Gaussian random projection to ``projection_dim`` dimensions where that is
    smaller than c (distances are kept approximately: Johnson-Lindenstrauss)."""
    z = x.float()
    if projection_dim and projection_dim < x.shape[1]:
        proj = torch.randn(x.shape[1], projection_dim, generator=g).to(z.device) / math.sqrt(projection_dim)
        z = z @ proj
    return z


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (p, r) of the rows of a (p, d) to the rows of b (r, d), by the difference
    formula: the value greedy_coreset_ref computes for each pair, bit for bit."""
    return ((a[:, None, :] - b[None]) ** 2).sum(-1)


def _lower_by_pairs(target: torch.Tensor, a: torch.Tensor, rows: torch.Tensor, b: torch.Tensor,
                    cols: torch.Tensor) -> torch.Tensor:
    """Lower ``target[rows[i]]`` (in place) to the difference formula's squared distance of the pair
    (a[rows[i]], b[cols[i]]) where that is smaller; returns target."""
    if rows.numel():
        d2 = (a.index_select(0, rows) - b.index_select(0, cols)).pow(2).sum(1)
        target.scatter_reduce_(0, rows, d2, reduce="amin")
    return target


def _min_sq_dist(query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Every pair's difference formula, the smallest per query row, in blocks of 16 queries (contiguous rows)."""
    return torch.cat([_sq_dist(q, bank).amin(1) for q in query.contiguous().split(16)])


def greedy_coreset_ref(x: torch.Tensor, k: int, projection_dim: int = 64, seed: int = 0) -> torch.Tensor:
    """The reference greedy k-center selection (the test oracle of :func:`greedy_coreset`, same signature and
    result): one pass over every row per chosen row."""
    n = x.shape[0]
    if k >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    z = _projected(x, projection_dim, g)
    chosen = torch.empty(k, dtype=torch.long)
    chosen[0] = int(torch.randint(n, (1,), generator=g))
    min_d = ((z - z[chosen[0]]) ** 2).sum(1)
    for i in range(1, k):
        j = int(torch.argmax(min_d))
        chosen[i] = j
        min_d = torch.minimum(min_d, ((z - z[j]) ** 2).sum(1))
    return chosen


# greedy_coreset's work sizes: candidates examined per step, chosen rows between exact refreshes of every row,
# the rows kept as possible next picks, the rows per block of a refresh, and the widest candidate list that a run
# of picks continues from (its pairwise distances are computed once: a list of 512 rows made a run cost more than
# the steps it saved). They change the time, never the rows. 8 candidates from a pool of 512 against 32 from 2048:
# the two 59 k-row banks of capsule at 256 px 1.23 s (median of 4, alternating) against 1.57 s. With runs (on the
# AMD EPYC VM of docs/profile.md), capsule's two 65 k-row banks: 16 candidates, runs from up to 16, blocks of
# 65536 rows 0.52-0.55 s; 8 candidates 0.55-0.60 s; blocks of 16384 0.58-0.61 s; refreshes every 128 picks
# 0.72 s, every 32 0.83 s; runs from up to 64 rows 0.64-0.72 s; without runs 0.74-0.80 s.
CORESET_CANDIDATES = 16
CORESET_REFRESH = 64
CORESET_POOL = 512
CORESET_ROW_BLOCK = 65536
CORESET_RUN_CANDIDATES = 16


def greedy_coreset(x: torch.Tensor, k: int, projection_dim: int = 64, seed: int = 0) -> torch.Tensor:
    """Indices of k rows of x (n, c) chosen by greedy k-center selection: start from a seeded random row, then
    repeatedly add the row farthest from everything chosen so far, distances measured after a seeded random
    projection to ``projection_dim`` dimensions. Exact: the same rows, in the same order, as
    :func:`greedy_coreset_ref` (ties go to the lowest index), without its pass over every row per step.

    Each row keeps ``u``, its squared distance to the chosen rows, exact up to the last refresh and an upper
    bound after it (distances only fall as rows are chosen). A step examines only the rows with the largest
    bounds: brings them up to date with the difference formula, and stops once the best exact value beats every
    bound left (a wider search otherwise). The next picks come from the same candidates while they can: their
    values lowered by each pick through their pairwise distances (computed once per list, the difference formula's
    values), the best is the next pick as long as it stays above every other row's bound (capsule's two banks at
    256 px: 1884 small distance computations for 8190 picks, against 8580 without runs). Every
    ``CORESET_REFRESH`` steps all rows take in the new chosen rows (:class:`_RefreshFilter`): one matrix product,
    bfloat16 where the CPU has bfloat16 units, finds the (row, chosen) pairs that can lower a row's value (with
    :class:`BankSearch`'s bounds of the product's rounding error), and only those pairs are recomputed with the
    difference formula, so every value is the reference's, bit for bit. The distances are computed by torch on the
    device of x (CPU or CUDA); the per-step bookkeeping (bounds, candidate ranking, maxima) is numpy's on the
    host: a step touches a few dozen rows, where a torch call costs 5-10 us of dispatch and a numpy one 1-2 us
    (4096 of the 59 k rows of a real 256 px class: 1.3-1.5 s -> 1.0-1.2 s on 2 CPU cores). Float32 comparisons
    and maxima are exact in either library."""
    n = x.shape[0]
    if k >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    z = _projected(x, projection_dim, g)
    dev = z.device
    filt = _RefreshFilter(z)
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = int(torch.randint(n, (1,), generator=g))
    centers = z.new_empty(k, z.shape[1])
    centers[0] = z[int(chosen[0])]
    u = ((z - centers[0]) ** 2).sum(1).cpu().numpy()
    upto = np.ones(n, dtype=np.int64)                    # chosen rows [0, upto) are in each row's u
    done = 1                                             # chosen rows [0, done) are in every row's u
    pool, tau = None, None
    i = 1
    while i < k:
        t, pool_size = CORESET_CANDIDATES, CORESET_POOL
        while True:
            if pool is None:   # the rows that can still be the farthest: every other row's u is <= tau
                pool = _largest(u, min(pool_size + 1, n))
                tau = u[pool[-1]] if n > pool_size else np.float32(-1.0)
                pool = pool[:pool_size]
            t = min(t, pool.size)
            pool_u = u[pool]
            top = pool[_largest(pool_u, min(t + 1, pool.size))]
            cand = top[:t]
            lo = int(upto[cand].min())
            if lo < i:
                near = _sq_dist(z[torch.from_numpy(cand).to(dev)], centers[lo:i]).amin(1)
                u[cand] = np.minimum(u[cand], near.cpu().numpy())
                upto[cand] = i
            vals = u[cand]
            best = vals.max()
            rest = u[top[t]] if t < pool.size else tau
            if best > rest and best > tau:
                break
            if t < pool.size:
                t *= 2
            else:              # the pool is used up: a wider one (ties can outnumber any fixed width)
                pool, pool_size = None, 2 * pool_size
        # A run of picks from these candidates: every other row's u is at most max(rest, tau) and stays an upper
        # bound as rows are chosen, so while the candidates' best exact value (lowered by each pick through
        # their pairwise distances, the difference formula's values) stays above it, it is the next pick.
        limit, pairs = max(rest, tau), None
        j = int(cand[vals == best].min())
        while True:
            chosen[i] = j
            centers[i] = z[j]
            if i + 1 - done == CORESET_REFRESH or i == k - 1:
                u_dev = torch.from_numpy(u).to(dev)          # u itself on the CPU: refreshed in place
                filt.refresh(u_dev, centers[done:i + 1])
                if u_dev.device.type != "cpu":
                    u[:] = u_dev.cpu().numpy()
                done = i + 1
                upto.fill(done)
                i += 1
                break
            i += 1
            if not 1 < cand.size <= CORESET_RUN_CANDIDATES:
                break
            if pairs is None:
                at = torch.from_numpy(cand).to(dev)
                pairs = _sq_dist(z[at], z[at]).cpu().numpy()
            vals = np.minimum(vals, pairs[:, np.flatnonzero(cand == j)[0]])
            u[cand] = vals
            upto[cand] = i
            best = vals.max()
            if not best > limit:
                break
            j = int(cand[vals == best].min())
    return torch.from_numpy(chosen)


def _largest(values: np.ndarray, m: int) -> np.ndarray:
    """Positions of the m largest of ``values``, largest first (ties in any order)."""
    part = np.argpartition(values, values.size - m)[values.size - m:] if m < values.size else np.arange(values.size)
    return part[np.argsort(-values[part])]


class _RefreshFilter:
    """The refreshes of :func:`greedy_coreset`: every row's u lowered (in place) to its exact distance to newly
    chosen rows where that is smaller. One matrix product per block of rows finds the (row, chosen) pairs whose
    difference-formula value can be at most the row's u, with :class:`BankSearch`'s proven error bounds (the
    chosen rows as its bank, every row centred on the mean of all rows); only those pairs are recomputed with the
    difference formula, so u stays the reference's, bit for bit. The product runs in :func:`search_dtype`:
    bfloat16 on CPUs with bfloat16 units, where the 59 k-row banks of a real 256 px class spent most of their
    refresh time in float32 products (0.8-1.0 ms against 0.2 ms per block of 16384 rows and 64 chosen rows). The
    rows' side of the product is built once per selection and held through it: a centred copy of the projected
    rows, d + 7 bfloat16 or d float32 columns (65 k rows of 64 projected dims: 9 or 17 MB; with no projection,
    ``projection_dim=0``, as large as the rows themselves in float32)."""

    def __init__(self, z: torch.Tensor):
        self.z, self.mu = z, z.mean(0)
        self.dtype = search_dtype(z.device)
        # the query side depends on the centre, the width and the dtype only: any bank of them makes it
        maker = BankSearch(z[:1], self.dtype, mu=self.mu)
        sides = [maker.query_side(z[s:s + CORESET_ROW_BLOCK]) for s in range(0, z.shape[0], CORESET_ROW_BLOCK)]
        self.side, self.qq = torch.cat([a for a, _ in sides]), torch.cat([b for _, b in sides])

    def refresh(self, u: torch.Tensor, new: torch.Tensor) -> None:
        search = BankSearch(new, self.dtype, mu=self.mu)
        for s in range(0, self.z.shape[0], CORESET_ROW_BLOCK):
            e = s + CORESET_ROW_BLOCK
            rows, at = search.pairs_at_most(self.side[s:e], self.qq[s:e], u[s:e])
            _lower_by_pairs(u[s:e], self.z[s:e], rows, new, at)


# Bank images per block of the leave-one-out scoring after a fit.
LOO_BLOCK = 16
# Query rows per block of the nearest-neighbour search: block x bank rows ~ 2 M products (4 MiB in bfloat16, 8 in
# float32). Searching 8192 real queries (capsule, 256 px) in a 4096-row bank: 26 ms in blocks of 512 against 32 ms
# in blocks of 256 in bfloat16 (float32: 54 against 61 ms); 1024 and 2048 as fast as 512: each block pays a few
# dozen small operations on its queries' bounds, which the larger blocks share.
SEARCH_BLOCK_PRODUCTS = 2 << 20
# Bank rows per chunk whose minimum the search compares before its elements (_positions_at_most).
CANDIDATE_CHUNK = 64
_U32 = 2.0 ** -24            # unit roundoff of float32
_UBF16 = 2.0 ** -8           # unit roundoff of bfloat16 (8 significant bits)


@functools.lru_cache(maxsize=None)
def _cpu_has_bf16_units() -> bool:
    """True on x86 CPUs whose flags list AVX512-BF16 or AMX-BF16 (Linux's /proc/cpuinfo) and where PyTorch has
    oneDNN: there a bfloat16 matrix product runs natively (5-8x a float32 one on this project's 2-core VM);
    elsewhere it is emulated, slower than float32."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def search_dtype(device) -> torch.dtype:
    """The dtype of :func:`nearest_distance`'s candidate products on ``device``: bfloat16 on CPUs that multiply it
    natively (x86 with AVX512-BF16 or AMX), float32 elsewhere. The distances returned are the same either way, bit
    for bit; only the time differs. On CUDA float32: cuBLAS may reduce bfloat16 products in reduced precision
    (``allow_bf16_reduced_precision_reduction``), outside the error bound, and no GPU was at hand to measure it."""
    return torch.bfloat16 if torch.device(device).type == "cpu" and _cpu_has_bf16_units() else torch.float32


def _split3(x: torch.Tensor):
    """x (float32) as three bfloat16 tensors whose sum is x exactly (8 + 8 + 8 significant bits), for |x| from
    2^-100 up to bfloat16's largest value (below, bfloat16's subnormals lose less than 2^-130, inside the search's
    absolute slack; above, the high part is inf and the search computes those queries the plain way)."""
    hi = x.bfloat16()
    r = x - hi.float()
    mid = r.bfloat16()
    return hi, mid, (r - mid.float()).bfloat16()


def _true_positions(mask: torch.Tensor):
    """(rows, cols) of the True entries of a bool (b, w) mask, row-major, as ``mask.nonzero(as_tuple=True)``: the
    mask read as 64-bit words first, so only the few nonzero words are looked at byte by byte (a sparse mask of
    1024 x 4096: 0.6 ms against nonzero's 1.5 ms on 2 CPU cores)."""
    b, w = mask.shape
    if w % 8 or not mask.is_contiguous():
        mask = torch.cat([mask, mask.new_zeros(b, -w % 8)], 1)
        w = mask.shape[1]
    r, c = (mask.view(torch.int64) != 0).nonzero(as_tuple=True)
    k = mask.view(b, w // 8, 8)[r, c].nonzero(as_tuple=True)
    return r[k[0]], c[k[0]] * 8 + k[1]


def _positions_at_most(g: torch.Tensor, thr: torch.Tensor, width: int = None):
    """(rows, cols) of the entries of g (B, n) that are at most their row's ``thr`` (B,): the pairs of
    ``(g <= thr[:, None]).nonzero(as_tuple=True)``, row-major within the first n - n % width columns, then those of
    the rest. Each row's minimum over every chunk of ``width`` columns is compared first (one reduction over g,
    written small), and only the chunks whose minimum passes are compared element by element: a search keeps
    4-7 of 4096 columns per query, so a few chunks per row. The element-wise comparison of the whole block and the
    scan of its (B, n) bool mask cost about twice the chunk minima (0.29 against 0.17 ms per 256 x 4096)."""
    width = width or CANDIDATE_CHUNK
    B, n = g.shape
    full = n - n % width
    rows, cols = [], []
    if full:
        k = full // width
        chunks = g[:, :full].unflatten(1, (k, width))
        hit_r, hit_c = (chunks.amin(2) <= thr[:, None]).nonzero(as_tuple=True)
        sub = (g.view(B * k, width).index_select(0, hit_r * k + hit_c) if full == n and g.is_contiguous()
               else chunks[hit_r, hit_c])
        i, j = (sub <= thr.index_select(0, hit_r)[:, None]).nonzero(as_tuple=True)
        rows.append(hit_r.index_select(0, i))
        cols.append(hit_c.index_select(0, i) * width + j)
    if full < n:
        r, c = (g[:, full:] <= thr[:, None]).nonzero(as_tuple=True)
        rows.append(r)
        cols.append(c + full)
    return (rows[0], cols[0]) if len(rows) == 1 else (torch.cat(rows), torch.cat(cols))


def nearest_distance(query: torch.Tensor, bank: torch.Tensor, block: Optional[int] = None,
                     dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Euclidean distance of each query row (q, c) to its nearest bank row (m, c), both float32: exactly
    ``sqrt(min_j sum((query_i - bank_j) ** 2))``, the difference formula's value for the nearest row summed over
    contiguous rows, bit for bit (:func:`nearest_distance_ref` is the test oracle). The product form
    |q|^2 - 2 q.b + |b|^2 is not used for the result: it loses digits to cancellation when |q| is large and q is
    close to b (float32 features of norm 60 at a distance of 1.5 were off by 0.04), and its argmin, which the
    search took before, picked a farther row in near ties.

    How, per block of queries: both sides are first centred on the bank's mean (distances do not change; the norms
    the error bounds scale with shrink). One matrix product in ``dtype`` (default :func:`search_dtype`: bfloat16
    where the CPU has bfloat16 units, float32 elsewhere) gives every (query, bank row) pair a lower bound of its
    difference-formula value, widened by a proven bound of the product's rounding error (inputs rounded to
    bfloat16, float32 accumulation, output rounding), and each query an upper bound of its smallest value (see
    :class:`BankSearch`). Only the rows whose lower bound is below that can be the nearest; their exact values are
    computed with the difference formula and the smallest is kept: 4-7 rows per query on 4096-row banks of real
    152-dim patch features in bfloat16, about 1 in float32. A query whose bounds are not finite (a NaN or inf in
    the data) is computed directly."""
    if bank.shape[0] == 0:
        raise ValueError("nearest_distance: the bank is empty")
    if torch.onnx.is_in_onnx_export():      # one block, plain operators: the exported graph has a dynamic batch
        nearest = torch.addmm((bank * bank).sum(1)[None], query, bank.T, alpha=-2).argmin(1)
        return (query - bank.index_select(0, nearest)).pow(2).sum(1).sqrt()
    return BankSearch(bank, dtype)(query, block=block)


def nearest_distance_ref(query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """The test oracle of :func:`nearest_distance`: every pair's difference formula, the smallest per query. The
    rows are made contiguous first: a strided query (a feature map's permuted view) is summed in another order,
    which moves the last bit."""
    return _min_sq_dist(query.float(), bank).sqrt()


class BankSearch:
    """A bank (n, c) prepared for nearest-neighbour searches: see :func:`nearest_distance`, which is
    ``BankSearch(bank, dtype)(query)``. Preparing costs a few passes over the bank, so one is made per bank and
    used for many queries (``skip`` leaves rows out per call: leave-one-out without copying the bank).

    Error bounds (u: the product dtype's unit roundoff, 2^-8 for bfloat16; u32 = 2^-24; K = c + 7 terms). With
    q', b' the centred rows and F the difference formula's float32 value for the pair (q, b):
    |F - (|q'|^2 + |b'|^2 - 2 q'.b')| <= kappa (|q'| + |b'|)^2 <= 2 kappa (|q'|^2 + |b'|^2), kappa = (2c + 16) u32
    (centring, the difference formula's and the norms' float32 rounding). bfloat16: the product's rows are
    [q', -alpha |q'|, |q'|^2 (as three bfloat16 parts, exact), 1, 1, 1] and its columns [-2 b', |b'|, 1, 1, 1,
    |b'|^2 (three parts)]: rounding q' and b' to bfloat16 moves q'.b' by at most (2u + u^2) |q'||b'| (Cauchy-
    Schwarz), the float32 accumulation of the exact bfloat16 products by gamma = K u32 / (1 - K u32) times the sum
    of the terms' magnitudes, so with alpha from those two each product L_j is a lower bound of F_j, up to a
    per-query slack eps = 1.01 (2 kappa + 3 gamma)(|q'|^2 + max |b'|^2) and the output's rounding to bfloat16
    (relative u / (1 - u), monotone, so applied to the thresholds, not to every pair); and F_j <= L_j + 2 alpha
    |q'||b'_j| (1 + u)^2 + eps, so the smallest F is at most min L + 2.03 alpha |q'| max|b'| (1 + u)^2 + eps. The
    rows whose L_j is below that are the candidates (4-7 per query on real 152-dim features of 4096-row banks).
    A product with a "+alpha" row per query as well (a per-pair upper bound) kept half as many candidates but
    took twice the product: 8.6 against 5.3-6.0 ms per 1024 real queries. float32: one product
    |b'|^2 - 2 q'.b', within gamma (2 |q'| max|b'| + max |b'|^2) of F - |q'|^2 for every row of the bank, plus the
    same eps (on CUDA also TF32's input rounding, u = 2^-11, in case the user allowed it)."""

    def __init__(self, bank: torch.Tensor, dtype: Optional[torch.dtype] = None, mu: Optional[torch.Tensor] = None):
        if bank.shape[0] == 0:
            raise ValueError("nearest_distance: the bank is empty")
        self.bank = bank.float()
        self.dtype = dtype or search_dtype(self.bank.device)
        if self.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"nearest_distance: dtype must be float32 or bfloat16, got {self.dtype}")
        n, c = self.bank.shape
        # the centre: the bank's mean, or one given (the bounds hold for any centre; they are tight near the data's)
        self.mu = self.bank.mean(0) if mu is None else mu.float()
        b = self.bank - self.mu
        bsq = (b * b).sum(1)
        self.bsq_max = bsq.max()
        self.kappa = (2 * c + 16) * _U32
        k = c + 7
        self.gamma = k * _U32 / (1 - k * _U32)
        if self.dtype == torch.bfloat16:
            u = _UBF16
            self.alpha = 1.01 * (2 * (2 * u + u * u) + 2 * self.gamma * (1 + u) ** 2) / (
                (1 - self.gamma) * (1 - u) ** 2 * (1 - (c + 4) * _U32))
            self.out_round = 1.01 * u / (1 - u)
            cols = torch.empty(k, n, dtype=torch.bfloat16, device=b.device)
            cols[:c] = (-2 * b).T                       # -2 * bfloat16(b'): exact
            cols[c] = bsq.sqrt()
            cols[c + 1:c + 4] = 1
            cols[c + 4], cols[c + 5], cols[c + 6] = _split3(bsq)
            self.cols = cols
        else:
            self.b, self.bsq = b, bsq

    def _columns(self, skip: Optional[torch.Tensor]) -> torch.Tensor:
        """The products' bank side (bfloat16: (c + 7, n); float32: |b'|^2 (n,)), with the |b'|^2 term of the rows
        to skip set to inf: their products are inf, never a candidate nor the smallest upper bound."""
        cols = self.cols if self.dtype == torch.bfloat16 else self.bsq
        if skip is None:
            return cols
        cols = cols.clone()
        if self.dtype == torch.bfloat16:
            cols[-3].masked_fill_(skip, math.inf)
        else:
            cols.masked_fill_(skip, math.inf)
        return cols

    def query_side(self, query: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(side, qq) of float32 query rows (B, c): the product's query side (bfloat16: [q', -alpha |q'|, |q'|^2 in
        three exact bfloat16 parts, 1, 1, 1]; float32: q') and |q'|^2 (B,), q' = query - mu. It depends on the
        centre, c and the dtype only, so searches against other banks of the same centre may reuse it."""
        qc = query - self.mu
        qq = (qc * qc).sum(1)
        if self.dtype != torch.bfloat16:
            return qc, qq
        # |q'|^2's three bfloat16 parts, held exactly in float32 until the one conversion below
        parts = torch.stack([p.float() for p in _split3(qq)], 1)
        side = torch.cat([qc, -(self.alpha * qq.sqrt())[:, None], parts, qc.new_ones(qc.shape[0], 3)], 1)
        return side.bfloat16(), qq

    def _candidates(self, side: torch.Tensor, qq: torch.Tensor, cols: torch.Tensor):
        """(rows, at): the (query, bank row) pairs where the bank row can be the query's nearest (``side``, ``qq``
        from ``query_side``, ``cols`` from ``_columns``; :func:`_positions_at_most`); (B,) bool: the queries whose
        bounds are not finite (NaN or inf in the data), to be computed the plain way."""
        g, thr, plain = self._bounds(side, qq, cols)
        rows, at = _positions_at_most(g, thr)
        return rows, at, plain

    def pairs_at_most(self, side: torch.Tensor, qq: torch.Tensor, bound: torch.Tensor):
        """(rows, cols): every (query, bank row) pair whose difference-formula value can be at most the query's
        ``bound`` (B,), and every pair of a query whose bounds are not finite (what a coreset refresh recomputes).
        Rows whose smallest product is above their threshold are dropped first (one row-wise minimum): most of
        them late in a selection, and the element-wise comparison is the slow part (0.3 ms per 16384 x 64)."""
        g, thr, plain = self._bounds(side, qq, self._columns(None), bound)
        hit = torch.nonzero((g.amin(1) <= thr) | plain)[:, 0]
        mask = (g.index_select(0, hit) <= thr.index_select(0, hit)[:, None]) | plain.index_select(0, hit)[:, None]
        rows, cols = _true_positions(mask)
        return hit.index_select(0, rows), cols

    def _bounds(self, side: torch.Tensor, qq: torch.Tensor, cols: torch.Tensor,
                bound: Optional[torch.Tensor] = None):
        """(g, thr, plain): the products (B, n) and each query's threshold, comparable with them (bfloat16: both
        as int16, see below), above which a bank row cannot be the query's nearest, or with ``bound`` cannot have
        a difference-formula value of at most ``bound``; plain (B,) bool: the queries whose bounds are not finite
        (NaN or inf in the data; their threshold excludes every row), to be computed the plain way."""
        eps = 1.01 * (2 * self.kappa + 3 * self.gamma) * (qq + self.bsq_max)
        if self.dtype == torch.bfloat16:
            g = side @ cols
            if bound is None:
                # Any product L_j stands in for the smallest: min F <= F_j <= L_j + 2 A_j + eps. The row minimum of
                # the products read as 16-bit integers is the smallest product where none is negative and else the
                # negative one nearest zero (bfloat16 is sign-magnitude): a bound either way, looser only for
                # queries within the rounding slack of a bank row. It reads 2 bytes per product where bfloat16's
                # amin converts each (0.02 against 0.18 ms per 512 x 4096 block, a tenth of the block's search).
                low = g.view(torch.int16).amin(1).view(torch.bfloat16).float()
                # min F <= g(min lower) + 2 A_j (A_j <= alpha |q'| max|b'| (1 + u)^2) + eps; + eps again
                wide = 2.03 * (1 + _UBF16) ** 2 * self.alpha * qq.sqrt() * self.bsq_max.sqrt()
                y = low + self.out_round * low.abs() + wide + 2 * eps
            else:       # F_j <= bound  =>  L_j <= bound + eps; + eps again
                y = bound + 2 * eps
            thr = torch.where(y >= 0, y / (1 - self.out_round), y / (1 + self.out_round))
        else:
            g = torch.addmm(cols[None], side, self.b.T, alpha=-2)
            # On CUDA the product may run in TF32 (inputs rounded to 11 significant bits) if the user allowed it
            u = 2.0 ** -11 if side.device.type == "cuda" else 0.0
            qb = qq.sqrt() * self.bsq_max.sqrt()
            err = 1.01 * (2 * (2 * u + u * u) * qb + self.gamma * (2 * (1 + u) ** 2 * qb + self.bsq_max))
            # g_j is within err + eps of F_j - |q'|^2
            thr = (g.amin(1) if bound is None else bound - qq) + 2 * (err + eps)
        thr = thr + thr.abs() * 2.0 ** -20 + 2.0 ** -100      # the threshold's own float32 rounding
        plain = ~torch.isfinite(thr)                          # left to the plain computation
        if self.dtype == torch.bfloat16:
            # F >= 0, so a threshold below 0 may be raised to 0; then a bfloat16 threshold rounded up compares
            # with the products as 16-bit integers: the same order for values >= 0, and every negative value
            # (sign bit set) below it. Comparing bfloat16 with float32 converted a copy first (3x the time).
            thr = (thr.clamp_min(0).masked_fill(plain, 0) * (1 + 2.0 ** -7)).bfloat16()
            return g.view(torch.int16), thr.view(torch.int16), plain
        return g, thr.masked_fill(plain, -math.inf), plain

    def __call__(self, query: torch.Tensor, skip: Optional[torch.Tensor] = None,
                 block: Optional[int] = None) -> torch.Tensor:
        """(q,) distance of each query row to its nearest bank row, leaving out the rows where ``skip`` (n,) is
        True."""
        bank = self.bank
        if skip is not None and bool(skip.all()):
            raise ValueError("nearest_distance: the bank is empty")
        query = query.float().contiguous()      # a feature map's permuted view: rows gathered once, not per block
        block = block or max(64, SEARCH_BLOCK_PRODUCTS // bank.shape[0])
        cols = self._columns(skip)
        out = query.new_empty(query.shape[0])
        for s in range(0, query.shape[0], block):
            q = query[s:s + block]
            rows, at, plain = self._candidates(*self.query_side(q), cols)
            best = _lower_by_pairs(q.new_full((q.shape[0],), math.inf), q, rows, bank, at)
            odd = plain | ~torch.isfinite(best)    # NaN or inf in the data: the plain way
            if bool(odd.any()):
                best[odd] = _min_sq_dist(q[odd], bank if skip is None else bank[~skip])
            out[s:s + q.shape[0]] = best
        return out.sqrt()


def separable_filter(x: torch.Tensor, k: torch.Tensor, mode: str = "reflect") -> torch.Tensor:
    """Each map of x (B, C, H, W) filtered on its own with the odd 1-D kernel k along W, then along H, padded by
    ``mode`` ("reflect" or "replicate", F.pad's) by the kernel's radius.

    The B * C maps run as the channels of one depthwise convolution (``groups``), not as a batch through a
    1-channel convolution: oneDNN's 1-channel path took about 50 ms per 16 maps of 256 x 256 with a 33-tap
    kernel, the depthwise one about 2 ms. At 256 px both give the same bits (every call of a capsule knn fit
    and eval compared); at 128 px and below they differ in the last bits, as the 1-channel path did between
    batch sizes. An ONNX export (export.py) traces the 1-channel form: a graph's group count is fixed, its batch
    axis is not; onnxruntime computes either form to float rounding."""
    if x.numel() == 0:
        return x
    r = (k.numel() - 1) // 2
    B, C, H, W = x.shape
    w = k.to(x.dtype).reshape(1, 1, 1, -1)
    if torch.onnx.is_in_onnx_export():
        y = F.conv2d(F.pad(x.reshape(B * C, 1, H, W), (r, r, 0, 0), mode=mode), w)
        return F.conv2d(F.pad(y, (0, 0, r, r), mode=mode), w.transpose(-1, -2)).reshape(B, C, H, W)
    maps = B * C
    w = w.expand(maps, 1, 1, -1)
    y = F.conv2d(F.pad(x.reshape(1, maps, H, W), (r, r, 0, 0), mode=mode), w, groups=maps)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode=mode), w.transpose(-1, -2), groups=maps)
    return y.reshape(B, C, H, W)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) maps, each on its own (:func:`separable_filter`), truncated at 4
    sigma (and at the map's size), reflect padding."""
    if sigma <= 0:
        return x
    r = max(1, int(math.ceil(4 * sigma)))
    r = min(r, x.shape[-1] - 1, x.shape[-2] - 1)
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return separable_filter(x, k / k.sum(), "reflect")


def pooled_patch_features(stage_feats, pool: int, modalities: Tuple[str, ...]) -> Dict[str, torch.Tensor]:
    """{modality: (B, C, h, w)}: each stage's features (a list of (rgb, aux) pairs from RGBXBackbone) averaged
    over its ``pool`` x ``pool`` neighbourhood, resized to the first stage's grid and concatenated. A modality
    whose features are None is left out."""
    out = {}
    for i, m in enumerate(modalities):
        per_stage = [f[i] for f in stage_feats]
        if per_stage[0] is None:
            continue
        size = per_stage[0].shape[-2:]
        pooled = [F.avg_pool2d(f, pool, stride=1, padding=pool // 2, count_include_pad=False) for f in per_stage]
        pooled = [p if p.shape[-2:] == size else F.interpolate(p, size=size, mode="bilinear", align_corners=False)
                  for p in pooled]
        out[m] = torch.cat(pooled, dim=1)
    return out


def fpfh_patches(fpfh: torch.Tensor, stride: int, pool: int) -> torch.Tensor:
    """(B, 33, H, W) FPFH maps -> (B, 33, H / stride, W / stride) patch features: each patch's mean FPFH,
    averaged over its ``pool`` x ``pool`` neighbourhood as the CNN stages' are (pooled_patch_features)."""
    patches = F.avg_pool2d(fpfh.float(), stride)
    return F.avg_pool2d(patches, pool, stride=1, padding=pool // 2, count_include_pad=False)


class MemoryBank(nn.Module):
    """Per-modality banks of normal patch features, the image each bank row came from, and the standardisation
    statistics measured on held-out normals. Used by :class:`PatchKNN` (the baseline) and by MambaAlign (its
    normality signal). Buffers per modality m: ``bank_m`` (n, C), ``owner_m`` (n,) the index of the train image
    each row came from (-1: unknown), ``stats_m`` = pixel mean, pixel std, image-score mean, image-score std.
    Bank sizes come from the data: loading a state dict resizes the buffers to the stored ones."""

    def __init__(self, modalities: Tuple[str, ...], feature_dim: int, coreset_size: int, projection_dim: int,
                 sigma: float):
        super().__init__()
        self.modalities, self.coreset_size, self.projection_dim, self.sigma = (tuple(modalities), coreset_size,
                                                                               projection_dim, sigma)
        for m in self.modalities:
            self.register_buffer(f"bank_{m}", torch.zeros(0, feature_dim))
            self.register_buffer(f"owner_{m}", torch.zeros(0, dtype=torch.long))
            self.register_buffer(f"stats_{m}", torch.tensor([0.0, 1.0, 0.0, 1.0]))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for m in self.modalities:
            bank = state_dict.get(f"{prefix}bank_{m}")
            if bank is not None:
                setattr(self, f"bank_{m}", torch.zeros_like(bank))
                key = f"{prefix}owner_{m}"
                # knn checkpoints written before owners were stored: every row's image is unknown
                state_dict.setdefault(key, torch.full((bank.shape[0],), -1, dtype=torch.long))
                setattr(self, f"owner_{m}", torch.zeros_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def build(self, features: Dict[str, torch.Tensor], owners: torch.Tensor, seed: int = 0) -> Dict[str, int]:
        """features: {m: (N, c, h, w)} of normal images, owners: (N,) their image indices. Keeps a greedy coreset
        of at most ``coreset_size`` patches per modality. Returns the bank size per modality."""
        sizes = {}
        for m in self.modalities:
            if m not in features or features[m].shape[0] == 0:
                raise ValueError(f"no {m} features to build the memory bank from")
            f = features[m]
            rows = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).float()
            row_owner = owners.view(-1, 1).expand(-1, f.shape[2] * f.shape[3]).reshape(-1)
            idx = greedy_coreset(rows, self.coreset_size, self.projection_dim, seed)
            device = getattr(self, f"bank_{m}").device
            setattr(self, f"bank_{m}", rows[idx].contiguous().to(device))
            setattr(self, f"owner_{m}", row_owner[idx].contiguous().to(device))
            sizes[m] = len(idx)
            logger.info("%s bank: %d of %d patches", m, len(idx), rows.shape[0])
        return sizes

    def raw_maps(self, features: Dict[str, torch.Tensor], size: Tuple[int, int],
                 exclude: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """{m: (B, 1, H, W)} smoothed nearest-neighbour distance maps at ``size``. ``exclude`` (B,): image indices
        whose own bank rows are skipped (leave-one-out distances for images that helped build the bank)."""
        maps = {}
        for m, f in features.items():
            bank = getattr(self, f"bank_{m}")
            if bank.shape[0] == 0:
                raise RuntimeError("the memory bank is empty: fit it first (train.py builds it)")
            B, C, h, w = f.shape
            q = f.permute(0, 2, 3, 1).flatten(1, 2).to(bank.dtype)                # (B, h*w, C)
            if exclude is None:
                d = nearest_distance(q.reshape(-1, C), bank)
            else:   # one prepared bank; each image's own rows skipped in its search
                owner, search = getattr(self, f"owner_{m}"), BankSearch(bank)
                d = torch.cat([search(q[b], skip=owner == exclude[b]) for b in range(B)])
            d = F.interpolate(d.view(-1, 1, h, w), size=size, mode="bilinear", align_corners=False)
            maps[m] = gaussian_blur(d, self.sigma)
        return maps

    @torch.no_grad()
    def set_stats(self, maps: Dict[str, list]) -> Dict[str, dict]:
        """Standardisation statistics from the raw maps of held-out normal images ({m: [(B, 1, H, W), ...]})."""
        stats = {}
        for m in self.modalities:
            if not maps.get(m):
                raise ValueError("no held-out normal images to standardise the scores on (need at least 2)")
            d = torch.cat([x.float().cpu() for x in maps[m]])
            p, s = d.flatten(), d.flatten(1).amax(1)
            if s.numel() < 2:
                raise ValueError("standardising needs at least 2 held-out normal images")
            vals = torch.stack([p.mean(), p.std().clamp_min(1e-6), s.mean(), s.std().clamp_min(1e-6)])
            getattr(self, f"stats_{m}").copy_(vals)
            stats[m] = dict(zip(("pixel_mean", "pixel_std", "image_mean", "image_std"), vals.tolist()))
        return stats

    @torch.no_grad()
    def fit(self, patch_features, bank_batches: Iterable[dict], holdout_batches: Iterable[dict], device=None,
            seed: int = 0, progress=None, loo_images: Optional[Iterable[int]] = None) -> Dict[str, object]:
        """Build the banks from ``bank_batches`` and the standardisation statistics from ``holdout_batches``:
        batches of sample dicts with ``rgb``, ``aux`` where the model has it, and optionally ``index`` (the image
        indices the bank remembers for leave-one-out; default: their order). ``patch_features(rgb, aux)`` gives
        {m: (B, C, h, w)}; ``progress`` wraps an iterable (tqdm). Returns {"stats": the statistics per modality,
        "normal_scores": {"holdout": (n_held,), "bank_loo": (n_bank,)}}: the bank's image score (standardised,
        summed over modalities) of every held-out normal and, leave-one-out, of every normal in the bank (or of
        those whose image index is in ``loo_images``; none for ``()``): scores of good parts the bank has not
        seen, for a decision threshold from the train normals."""
        device = device or torch.device("cpu")
        wrap = progress or (lambda it, **k: it)

        def inputs(batch):
            aux = batch.get("aux")
            return batch["rgb"].to(device), (aux.to(device) if aux is not None else None)

        collected, owners, n, size = {m: [] for m in self.modalities}, [], 0, None
        for batch in wrap(bank_batches, desc="memory bank: features"):
            rgb, aux = inputs(batch)
            size = rgb.shape[-2:]
            for m, f in patch_features(rgb, aux).items():
                collected[m].append(f.cpu())
            owners.append(torch.as_tensor(batch["index"]) if "index" in batch
                          else torch.arange(n, n + rgb.shape[0]))
            n += rgb.shape[0]
        features = {m: torch.cat(v) for m, v in collected.items() if v}
        owners = torch.cat(owners) if owners else torch.zeros(0, dtype=torch.long)
        self.build(features, owners, seed)
        held = {m: [] for m in self.modalities}
        for batch in wrap(holdout_batches, desc="memory bank: held-out normals"):
            rgb, aux = inputs(batch)
            for m, d in self.raw_maps(patch_features(rgb, aux), rgb.shape[-2:]).items():
                held[m].append(d)
        stats = self.set_stats(held)
        holdout = self._image_scores({m: torch.cat(v) for m, v in held.items()})
        loo = [torch.zeros(0)]
        if loo_images is None:
            scored = torch.arange(n)
        else:
            scored = torch.nonzero(torch.isin(owners, torch.as_tensor(list(loo_images), dtype=owners.dtype)))[:, 0]
        for s in wrap(range(0, len(scored), LOO_BLOCK), desc="memory bank: leave-one-out scores"):
            rows = scored[s:s + LOO_BLOCK]
            part = {m: f[rows].to(device) for m, f in features.items()}
            loo.append(self._image_scores(self.raw_maps(part, size, exclude=owners[rows].to(device))))
        return {"stats": stats, "normal_scores": {"holdout": holdout, "bank_loo": torch.cat(loo)}}

    def _image_scores(self, raw: Dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) the standardised image scores of raw maps, summed over modalities (the knn baseline's score)."""
        return sum(v["score"] for v in self.standardised(raw).values()).float().cpu()

    def standardised(self, raw: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
        """{m: {"map": (B, 1, H, W), "score": (B,)}}: raw maps and their maxima standardised per modality."""
        out = {}
        for m, d in raw.items():
            s = getattr(self, f"stats_{m}")
            out[m] = {"map": (d - s[0]) / s[1], "score": (d.flatten(1).amax(1) - s[2]) / s[3]}
        return out


class PatchKNN(MemoryBank):
    """The memory-bank baseline as a module. Build with a config, ``fit`` on normal images, then call it like
    MambaAlign: ``forward(rgb, aux=None)`` -> dict (see the module docstring)."""

    model_type = MODEL_TYPE
    score_description = ("sum over modalities of the max of each nearest-neighbour distance map, each "
                         "standardised on held-out train normals")

    def __init__(self, cfg: KNNConfig, pretrained: bool = True, weights_path: Optional[str] = None):
        # With FPFH the geometry is its own feature (BTF): the backbone sees RGB only.
        backbone = RGBXBackbone(cfg.backbone, 0 if cfg.aux_feature == "fpfh" else cfg.aux_ch, pretrained=pretrained,
                                weights_path=weights_path, stages=cfg.stages)
        feature_dim = sum(backbone.out_channels[s] for s in cfg.stages)
        super().__init__(("rgb", "aux") if cfg.aux_ch else ("rgb",), feature_dim, cfg.coreset_size,
                         cfg.projection_dim, cfg.sigma)
        self.config, self.feature_dim, self.backbone = cfg, feature_dim, backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        # The decision threshold on score_logit (NaN until fitted): see ``fit``.
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self.eval()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # knn checkpoints written before the baseline had a decision: no threshold
        state_dict.setdefault(f"{prefix}threshold", torch.tensor(float("nan")))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def train(self, mode: bool = True):
        # Frozen features: the backbone's norms always use their pretrained statistics.
        super().train(mode)
        self.backbone.eval()
        return self

    # ------------------------------------------------------------------------------------------------
    def patch_features(self, rgb: torch.Tensor, aux: Optional[torch.Tensor] = None
                       ) -> Dict[str, torch.Tensor]:
        """{modality: (B, C, h, w)} locally averaged, concatenated stage features on the first stage's grid; with
        aux_feature="fpfh" the aux modality's patches are the FPFH map averaged over each patch and its pool."""
        if self.config.aux_feature == "fpfh":
            out = pooled_patch_features(self.backbone(rgb, None), self.config.pool, ("rgb",))
            if aux is not None:
                out["aux"] = fpfh_patches(aux, self.backbone.strides[self.config.stages[0]], self.config.pool)
            return out
        if self.config.aux_ch and aux is None:
            feats = self._rgb_only(rgb)
        else:
            feats = self.backbone(rgb, aux if self.config.aux_ch else None)
        return pooled_patch_features(feats, self.config.pool, self.modalities)

    def _rgb_only(self, rgb):
        """Features of the RGB branch of a two-branch backbone when no aux is given (a zero aux fills the aux
        half; the branches only share convolutions, so the RGB half is unaffected by it)."""
        feats = self.backbone(rgb, rgb.new_zeros(rgb.shape[0], self.config.aux_ch, *rgb.shape[-2:]))
        return [(r, None) for r, _ in feats]

    @torch.no_grad()
    def forward(self, rgb: torch.Tensor, aux: Optional[torch.Tensor] = None) -> Dict[str, object]:
        """rgb: (B, 3, H, W); aux: (B, aux_ch, H, W) or None -> the MambaAlign output dict + per_modality."""
        per = self.standardised(self.raw_maps(self.patch_features(rgb, aux), rgb.shape[-2:]))
        seg = sum(v["map"] for v in per.values())
        score = sum(v["score"] for v in per.values())
        return {"seg_logits": seg, "anomaly_map": torch.sigmoid(seg), "score_logit": score,
                "score": torch.sigmoid(score), "per_modality": per}

    # ------------------------------------------------------------------------------------------------
    def fit(self, bank_batches: Iterable[dict], holdout_batches: Iterable[dict], device=None, seed: int = 0,
            progress=None, target_fpr: float = 0.05, loo_images: Optional[Iterable[int]] = None
            ) -> Dict[str, object]:
        """Build the banks from ``bank_batches``, standardise on ``holdout_batches`` (see MemoryBank.fit) and set
        the decision threshold: the score_logit that ``target_fpr`` of the train normals exceed: the held-out
        ones and, leave-one-out, every one in the bank, or those whose image index is in ``loo_images``
        (train.py: the same up to 64 bank images MambaAlign's threshold takes, train.CALIBRATION_IMAGES).
        Returns MemoryBank.fit's dict plus "calibration"."""
        res = super().fit(self.patch_features, bank_batches, holdout_batches, device, seed, progress,
                          loo_images=loo_images)
        scores = torch.cat([res["normal_scores"]["holdout"], res["normal_scores"]["bank_loo"]])
        self.threshold.fill_(threshold_at_fpr(scores.numpy(), target_fpr))
        res["calibration"] = {"threshold": float(self.threshold), "target_fpr": target_fpr,
                              "normals": int(scores.numel()), "source": "held-out + leave-one-out bank normals"}
        return res

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_loaded(cls, ckpt: dict, source: str = "checkpoint") -> "PatchKNN":
        """Rebuild a fitted model from a loaded knn checkpoint (weights and banks from the file alone)."""
        model = cls(KNNConfig.from_dict(ckpt["config"]), pretrained=False)
        missing = [f"bank_{m}" for m in model.modalities if f"bank_{m}" not in ckpt["model"]]
        if missing:
            raise ValueError(f"{source}: knn checkpoint without {missing}")
        model.load_state_dict(ckpt["model"], strict=True)
        return model.eval()
