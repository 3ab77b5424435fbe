"""Alignment-Aware Fusion (AAF): offset-aware, gated, top-down fusion over stages 5 -> 4 -> 3.

At each stage s (coarse to fine):
  1. project RGB and aux features to ``out_channels``;
  2. predict an offset field (B, 2, H, W) in pixels of that stage from [rgb, aux, upsampled coarser fused map],
     as a residual on the upsampled coarser offsets (x2, because pixels halve in size), so a shift found at
     stride 32 is refined at 16 and 8. The last offset conv starts near zero: AAF starts as an identity warp;
  3. warp the aux features onto the RGB grid with ``grid_sample`` (bilinear, border padding);
  4. fuse with a learned per-pixel gate g (sigmoid): g * rgb + (1 - g) * aux_warped, refine with a 3x3 conv,
     add the upsampled coarser fused map.

Modes: ``align=False`` (the ablation without AAF) fuses rgb + aux with no offsets and no gate; without aux
(RGB-only models) a stage is just the refined RGB projection plus the coarser map.

Global alignment (:func:`global_align`, MambaAlign's ``global_align="shift"``) comes first, on the input
images: two cameras that are not registered see the object at different places (MulSen-AD's RGB and infrared:
up to about 25 pixels apart at 256 px, differently per image), more than AAF's local offsets should have to
absorb. Per image, the aux image is translated by the shift that best overlays its outlines on the RGB image's
(the peak of the cross-correlation of their gradient magnitudes: outlines show in both cameras whatever the
sign of their contrast, where intensities do not). Only the translation is estimated: scale and rotation
between these camera pairs are small, and thresholding either modality into a silhouette to measure them was
unreliable (infrared backgrounds have texture and vignetting). Everything downstream (backbone, memory bank,
stage-2 skip, PMM, CMI, AAF) sees the aligned aux, so nothing bypasses it.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from knn import separable_filter

__all__ = ["AlignmentAwareFusion", "warp", "conv_norm_act", "estimate_shift", "global_align"]


def conv_norm_act(cin: int, cout: int, k: int = 1) -> nn.Sequential:
    """Conv + GroupNorm + GELU (GroupNorm: batch-size independent, so small training batches are fine)."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
                         nn.GroupNorm(min(8, cout), cout), nn.GELU())


def _edge_strength(x: torch.Tensor, sigma: float = 2.0) -> torch.Tensor:
    """(B, H, W) gradient magnitude of the Gaussian-smoothed image (summed over channels), standardised per image:
    outlines that both cameras see, whatever the sign of their contrast."""
    B, C, H, W = x.shape
    r = max(1, int(round(2 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = separable_filter(x.float(), k, "replicate")
    gx = F.pad(y[..., :, 2:] - y[..., :, :-2], (1, 1, 0, 0))
    gy = F.pad(y[..., 2:, :] - y[..., :-2, :], (0, 0, 1, 1))
    g = (gx ** 2 + gy ** 2).sum(1).sqrt()
    g = g - g.mean(dim=(1, 2), keepdim=True)
    return g / g.flatten(1).std(1).view(B, 1, 1).clamp_min(1e-6)


def estimate_shift(rgb: torch.Tensor, aux: torch.Tensor, max_shift: float = 0.25) -> torch.Tensor:
    """(B, 2) the translation (dx, dy) in pixels that moves ``aux`` onto ``rgb``: the peak of the cross-correlation
    of their edge strengths (:func:`_edge_strength`, computed with zero-padded FFTs, so no wrap-around), searched
    within ``max_shift`` of the image size, refined to sub-pixel by a parabola through the peak and its
    neighbours."""
    a, b = _edge_strength(rgb), _edge_strength(aux)
    B, H, W = a.shape
    xc = torch.fft.irfft2(torch.fft.rfft2(a, s=(2 * H, 2 * W)) * torch.fft.rfft2(b, s=(2 * H, 2 * W)).conj(),
                          s=(2 * H, 2 * W))                       # xc[d] = sum_p a[p + d] * b[p]
    my, mx = max(1, int(max_shift * H)), max(1, int(max_shift * W))
    win = torch.roll(xc, shifts=(my, mx), dims=(1, 2))[:, :2 * my + 1, :2 * mx + 1]   # shifts -m..m
    k = win.flatten(1).argmax(1)
    iy, ix = k // win.shape[2], k % win.shape[2]

    def refine(centre, left, right):
        den = left - 2 * centre + right
        return torch.where(den < 0, 0.5 * (left - right) / den.clamp_max(-1e-12), torch.zeros_like(den))

    rows = torch.arange(B, device=a.device)
    c = win[rows, iy, ix]
    fy = refine(c, win[rows, (iy - 1).clamp_min(0), ix], win[rows, (iy + 1).clamp_max(2 * my), ix])
    fx = refine(c, win[rows, iy, (ix - 1).clamp_min(0)], win[rows, iy, (ix + 1).clamp_max(2 * mx)])
    return torch.stack([ix - mx + fx.clamp(-0.5, 0.5), iy - my + fy.clamp(-0.5, 0.5)], dim=1).float()


def global_align(rgb: torch.Tensor, aux: torch.Tensor, max_shift: float = 0.25,
                 estimate_channels: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(aux moved onto rgb, (B, 2) the shift dx, dy in pixels) with the per-image shift of :func:`estimate_shift`
    (bilinear, border padding), estimated from aux's first ``estimate_channels`` channels where given (the
    normals of normals + FPFH: FPFH histograms are no image to find outlines in)."""
    shift = estimate_shift(rgb, aux[:, :estimate_channels] if estimate_channels else aux, max_shift)
    B, _, H, W = aux.shape
    offset = -shift.to(aux.dtype).view(B, 2, 1, 1).expand(B, 2, H, W)
    return warp(aux, offset), shift


def warp(x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Sample x at (pixel + offset). x: (B, C, H, W); offset: (B, 2, H, W) as (dx, dy) in pixels."""
    B, _, H, W = x.shape
    ys = torch.arange(H, device=x.device, dtype=x.dtype)
    xs = torch.arange(W, device=x.device, dtype=x.dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    px = gx.unsqueeze(0) + offset[:, 0].to(x.dtype)
    py = gy.unsqueeze(0) + offset[:, 1].to(x.dtype)
    # Pixel centres -> normalised coordinates for align_corners=False.
    grid = torch.stack([(2 * px + 1) / W - 1, (2 * py + 1) / H - 1], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class _Stage(nn.Module):
    def __init__(self, c_in: int, out: int, has_aux: bool, align: bool, coarser: bool):
        super().__init__()
        self.has_aux, self.align = has_aux, align and has_aux
        self.proj_rgb = conv_norm_act(c_in, out)
        self.proj_aux = conv_norm_act(c_in, out) if has_aux else None
        if self.align:
            ctx = 3 * out if coarser else 2 * out
            self.offset = nn.Sequential(nn.Conv2d(ctx, out // 2, 3, padding=1), nn.GELU(),
                                        nn.Conv2d(out // 2, 2, 3, padding=1))
            # Near-zero start (identity warp); not exactly zero, so the layer before also learns from step 1.
            nn.init.normal_(self.offset[-1].weight, std=1e-3)
            nn.init.zeros_(self.offset[-1].bias)
            self.gate = nn.Sequential(nn.Conv2d(2 * out, out // 2, 3, padding=1), nn.GELU(),
                                      nn.Conv2d(out // 2, 1, 1))
        self.refine = conv_norm_act(out, out, 3)

    def forward(self, rgb, aux, coarse_fused, coarse_offset):
        r = self.proj_rgb(rgb)
        H, W = r.shape[2:]
        up = None if coarse_fused is None else F.interpolate(coarse_fused, size=(H, W), mode="bilinear",
                                                             align_corners=False)
        offset = None
        if not self.has_aux:
            x = r
        elif not self.align:
            x = r + self.proj_aux(aux)
        else:
            a = self.proj_aux(aux)
            ctx = [r, a] if up is None else [r, a, up]
            offset = self.offset(torch.cat(ctx, dim=1))
            if coarse_offset is not None:
                scale = torch.tensor([W / coarse_offset.shape[3], H / coarse_offset.shape[2]],
                                     device=r.device, dtype=r.dtype).view(1, 2, 1, 1)
                offset = offset + scale * F.interpolate(coarse_offset, size=(H, W), mode="bilinear",
                                                        align_corners=False)
            a = warp(a, offset)
            g = torch.sigmoid(self.gate(torch.cat([r, a], dim=1)))
            x = g * r + (1 - g) * a
        x = self.refine(x)
        return (x if up is None else x + up), offset


class AlignmentAwareFusion(nn.Module):
    """channels: input channels of stages (3, 4, 5) (finest first). forward(rgb_feats, aux_feats) with lists
    finest first returns (fused, offsets): fused (B, out_channels, H_s, W_s) per stage, finest first, and the
    predicted offsets (B, 2, H_s, W_s) per stage in pixels of that stage (None where not predicted)."""

    def __init__(self, channels: Sequence[int], out_channels: int, has_aux: bool = True, align: bool = True):
        super().__init__()
        self.has_aux, self.align = has_aux, align and has_aux
        n = len(channels)
        self.stages = nn.ModuleList(_Stage(c, out_channels, has_aux, align, coarser=i < n - 1)
                                    for i, c in enumerate(channels))

    def forward(self, rgb_feats: List[torch.Tensor], aux_feats: Optional[List[torch.Tensor]] = None
                ) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]]]:
        if self.has_aux and (aux_feats is None or len(aux_feats) != len(rgb_feats)):
            raise ValueError("AAF was built for two modalities: pass one aux feature map per stage")
        fused: List[Optional[torch.Tensor]] = [None] * len(rgb_feats)
        offsets: List[Optional[torch.Tensor]] = [None] * len(rgb_feats)
        coarse_f, coarse_o = None, None
        for i in range(len(rgb_feats) - 1, -1, -1):
            aux = aux_feats[i] if self.has_aux else None
            coarse_f, coarse_o = self.stages[i](rgb_feats[i], aux, coarse_f, coarse_o)
            fused[i], offsets[i] = coarse_f, coarse_o
        return fused, offsets
