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

import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from rgbx_backbone import RGBXBackbone

logger = logging.getLogger(__name__)

__all__ = ["KNNConfig", "PatchKNN", "greedy_coreset", "nearest_distance", "gaussian_blur"]

MODEL_TYPE = "knn"


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

    def __post_init__(self):
        self.stages = tuple(int(s) for s in self.stages)
        if self.aux_ch not in (0, 1, 3):
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


def greedy_coreset(x: torch.Tensor, k: int, projection_dim: int = 64, seed: int = 0) -> torch.Tensor:
    """Indices of k rows of x (n, c) chosen by greedy k-center selection: start from a seeded random row, then
    repeatedly add the row farthest from everything chosen so far. Distances are measured after a seeded
    Gaussian random projection to ``projection_dim`` dimensions (it keeps distances approximately: Johnson-
    Lindenstrauss), which makes each step O(n * projection_dim)."""
    n = x.shape[0]
    if k >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    z = x.float()
    if projection_dim and projection_dim < x.shape[1]:
        proj = torch.randn(x.shape[1], projection_dim, generator=g) / math.sqrt(projection_dim)
        z = z @ proj
    chosen = torch.empty(k, dtype=torch.long)
    chosen[0] = int(torch.randint(n, (1,), generator=g))
    min_d = ((z - z[chosen[0]]) ** 2).sum(1)
    for i in range(1, k):
        j = int(torch.argmax(min_d))
        chosen[i] = j
        min_d = torch.minimum(min_d, ((z - z[j]) ** 2).sum(1))
    return chosen


def nearest_distance(query: torch.Tensor, bank: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """Euclidean distance of each query row (q, c) to its nearest bank row (m, c), in blocks of queries."""
    out = [torch.cdist(q, bank).amin(dim=1) for q in query.split(block)]
    return torch.cat(out) if out else query.new_zeros(0)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W) maps, truncated at 4 sigma, reflect padding."""
    if sigma <= 0:
        return x
    r = max(1, int(math.ceil(4 * sigma)))
    r = min(r, x.shape[-1] - 1, x.shape[-2] - 1)
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))


class PatchKNN(nn.Module):
    """The memory-bank baseline as a module. Build with a config, ``fit`` on normal images, then call it like
    MambaAlign: ``forward(rgb, aux=None)`` -> dict (see the module docstring)."""

    model_type = MODEL_TYPE
    score_description = ("sum over modalities of the max of each nearest-neighbour distance map, each "
                         "standardised on held-out train normals")

    def __init__(self, cfg: KNNConfig, pretrained: bool = True, weights_path: Optional[str] = None):
        super().__init__()
        self.config = cfg
        self.modalities = ("rgb", "aux") if cfg.aux_ch else ("rgb",)
        self.backbone = RGBXBackbone(cfg.backbone, cfg.aux_ch, pretrained=pretrained, weights_path=weights_path,
                                     stages=cfg.stages)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.feature_dim = sum(self.backbone.out_channels[s] for s in cfg.stages)
        for m in self.modalities:
            self.register_buffer(f"bank_{m}", torch.zeros(0, self.feature_dim))
            # pixel mean, pixel std, image-score mean, image-score std, measured on held-out normals
            self.register_buffer(f"stats_{m}", torch.tensor([0.0, 1.0, 0.0, 1.0]))
        self.eval()

    def train(self, mode: bool = True):
        # Frozen features: the backbone's norms always use their pretrained statistics.
        super().train(mode)
        self.backbone.eval()
        return self

    # ------------------------------------------------------------------------------------------------
    def patch_features(self, rgb: torch.Tensor, aux: Optional[torch.Tensor] = None
                       ) -> Dict[str, torch.Tensor]:
        """{modality: (B, C, h, w)} locally averaged, concatenated stage features on the first stage's grid."""
        if self.config.aux_ch and aux is None:
            feats = self._rgb_only(rgb)
        else:
            feats = self.backbone(rgb, aux if self.config.aux_ch else None)
        out = {}
        for i, m in enumerate(self.modalities):
            per_stage = [f[i] for f in feats]
            if per_stage[0] is None:
                continue
            size = per_stage[0].shape[-2:]
            pooled = [F.avg_pool2d(f, self.config.pool, stride=1, padding=self.config.pool // 2,
                                   count_include_pad=False) for f in per_stage]
            pooled = [p if p.shape[-2:] == size else F.interpolate(p, size=size, mode="bilinear",
                                                                   align_corners=False) for p in pooled]
            out[m] = torch.cat(pooled, dim=1)
        return out

    def _rgb_only(self, rgb):
        """Features of the RGB branch of a two-branch backbone when no aux is given (a zero aux fills the aux
        half; the branches only share convolutions, so the RGB half is unaffected by it)."""
        feats = self.backbone(rgb, rgb.new_zeros(rgb.shape[0], self.config.aux_ch, *rgb.shape[-2:]))
        return [(r, None) for r, _ in feats]

    def _raw_maps(self, rgb, aux) -> Dict[str, torch.Tensor]:
        """{modality: (B, 1, H, W)} smoothed nearest-neighbour distance maps at input size."""
        H, W = rgb.shape[-2:]
        maps = {}
        for m, f in self.patch_features(rgb, aux).items():
            bank = getattr(self, f"bank_{m}")
            if bank.shape[0] == 0:
                raise RuntimeError("this knn model has an empty memory bank: fit it first (train.py --model knn)")
            B, C, h, w = f.shape
            d = nearest_distance(f.permute(0, 2, 3, 1).reshape(-1, C), bank).view(B, 1, h, w)
            d = F.interpolate(d, size=(H, W), mode="bilinear", align_corners=False)
            maps[m] = gaussian_blur(d, self.config.sigma)
        return maps

    @torch.no_grad()
    def forward(self, rgb: torch.Tensor, aux: Optional[torch.Tensor] = None) -> Dict[str, object]:
        """rgb: (B, 3, H, W); aux: (B, aux_ch, H, W) or None -> the MambaAlign output dict + per_modality."""
        per = {}
        for m, d in self._raw_maps(rgb, aux).items():
            s = getattr(self, f"stats_{m}")
            z_map = (d - s[0]) / s[1]
            z_score = (d.flatten(1).amax(1) - s[2]) / s[3]
            per[m] = {"map": z_map, "score": z_score}
        seg = sum(v["map"] for v in per.values())
        score = sum(v["score"] for v in per.values())
        return {"seg_logits": seg, "anomaly_map": torch.sigmoid(seg), "score_logit": score,
                "score": torch.sigmoid(score), "per_modality": per}

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, bank_batches: Iterable[dict], holdout_batches: Iterable[dict], device=None, seed: int = 0,
            progress=None) -> Dict[str, dict]:
        """Build the banks from ``bank_batches`` and the standardisation statistics from ``holdout_batches``
        (batches of sample dicts with ``rgb`` and, with aux, ``aux``). ``progress`` wraps an iterable (tqdm).
        Returns the statistics per modality as plain numbers."""
        device = device or torch.device("cpu")
        wrap = progress or (lambda it, **k: it)
        collected = {m: [] for m in self.modalities}
        for batch in wrap(bank_batches, desc="memory bank: features"):
            rgb, aux = batch["rgb"].to(device), batch.get("aux")
            for m, f in self.patch_features(rgb, aux.to(device) if aux is not None else None).items():
                collected[m].append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).cpu())
        for m in self.modalities:
            if not collected[m]:
                raise ValueError(f"no {m} features to build the memory bank from")
            feats = torch.cat(collected[m])
            idx = greedy_coreset(feats, self.config.coreset_size, self.config.projection_dim, seed)
            setattr(self, f"bank_{m}", feats[idx].contiguous().to(device))
            logger.info("%s bank: %d of %d patches", m, len(idx), feats.shape[0])
        pix = {m: [] for m in self.modalities}
        img = {m: [] for m in self.modalities}
        for batch in wrap(holdout_batches, desc="memory bank: held-out normals"):
            rgb, aux = batch["rgb"].to(device), batch.get("aux")
            for m, d in self._raw_maps(rgb, aux.to(device) if aux is not None else None).items():
                pix[m].append(d.flatten().cpu())
                img[m].append(d.flatten(1).amax(1).cpu())
        stats = {}
        for m in self.modalities:
            if not img[m]:
                raise ValueError("no held-out normal images to standardise the scores on (need at least 2)")
            p, s = torch.cat(pix[m]), torch.cat(img[m])
            if s.numel() < 2:
                raise ValueError("standardising needs at least 2 held-out normal images")
            vals = torch.stack([p.mean(), p.std().clamp_min(1e-6), s.mean(), s.std().clamp_min(1e-6)])
            setattr(self, f"stats_{m}", vals.to(device))
            stats[m] = dict(zip(("pixel_mean", "pixel_std", "image_mean", "image_std"), vals.tolist()))
        return stats

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_loaded(cls, ckpt: dict, source: str = "checkpoint") -> "PatchKNN":
        """Rebuild a fitted model from a loaded knn checkpoint (weights and banks from the file alone)."""
        cfg = KNNConfig.from_dict(ckpt["config"])
        model = cls(cfg, pretrained=False)
        state = ckpt["model"]
        for m in model.modalities:
            key = f"bank_{m}"
            if key not in state:
                raise ValueError(f"{source}: knn checkpoint without {key}")
            setattr(model, key, torch.zeros_like(state[key]))
        model.load_state_dict(state, strict=True)
        return model.eval()
