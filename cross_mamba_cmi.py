"""Cross Mamba Interaction (CMI): the two modalities steer each other's recurrence.

For each modality m with partner o, the tokens of m are scanned along the four QuadSnake routes, but the
selective parameters of that scan (delta, B, C: per token, not pooled) are projected from o's tokens at the
same route position. So o decides, token by token, how much of m is written into the state (delta, B) and
what is read out (C): where the infrared shows a hot spot, the RGB state is written and read there.
Outputs are added back residually behind a learnable per-channel gate initialised small (``gate_init``),
so CMI starts close to the identity and grows as it proves useful.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from pmm_qsvss import SelectiveParams, cross_merge, cross_scan

__all__ = ["CrossMambaInteraction"]


class _Branch(nn.Module):
    """Per-modality projections of CMI: norm, in_proj to (x, z), depthwise conv, selective params, output."""

    def __init__(self, dim, d_inner, d_state, dt_rank, d_conv, gate_init):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.conv = nn.Conv2d(d_inner, d_inner, d_conv, padding=d_conv // 2, groups=d_inner)
        self.ssm = SelectiveParams(d_inner, d_state, dt_rank)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        self.gate = nn.Parameter(torch.full((dim,), float(gate_init)))

    def tokens(self, x):
        """(B, dim, H, W) -> route sequences xs (B, 4, d_inner, L) and the gate input z (B, H, W, d_inner)."""
        xi, z = self.in_proj(self.norm(x.permute(0, 2, 3, 1))).chunk(2, dim=-1)
        xi = F.silu(self.conv(xi.permute(0, 3, 1, 2).contiguous()))
        return cross_scan(xi), z


class CrossMambaInteraction(nn.Module):
    """(B, C, H, W) x 2 -> (B, C, H, W) x 2. Each modality's (delta, B, C) come from the OTHER modality."""

    def __init__(self, dim: int, d_state: int = 16, ssm_ratio: float = 1.0, dt_rank="auto", d_conv: int = 3,
                 gate_init: float = 0.1, scan_backend: str = "auto"):
        super().__init__()
        d_inner = int(round(ssm_ratio * dim))
        dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.scan_backend = scan_backend
        self.rgb = _Branch(dim, d_inner, d_state, dt_rank, d_conv, gate_init)
        self.aux = _Branch(dim, d_inner, d_state, dt_rank, d_conv, gate_init)

    def _cross(self, branch: _Branch, xs_self, z_self, xs_other, H, W):
        dts, Bs, Cs = branch.ssm.project(xs_other)                      # steered by the partner's tokens
        y = cross_merge(branch.ssm.scan(xs_self, dts, Bs, Cs, backend=self.scan_backend), H, W)
        y = branch.out_norm(y.permute(0, 2, 3, 1)) * F.silu(z_self)      # (B, H, W, d_inner)
        return (branch.out_proj(y) * branch.gate).permute(0, 3, 1, 2)

    def forward(self, f_rgb: torch.Tensor, f_aux: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if f_rgb.shape != f_aux.shape:
            raise ValueError(f"CMI needs equal shapes, got rgb {tuple(f_rgb.shape)} and aux {tuple(f_aux.shape)}")
        H, W = f_rgb.shape[2:]
        xs_r, z_r = self.rgb.tokens(f_rgb)
        xs_a, z_a = self.aux.tokens(f_aux)
        out_rgb = f_rgb + self._cross(self.rgb, xs_r, z_r, xs_a, H, W)
        out_aux = f_aux + self._cross(self.aux, xs_a, z_a, xs_r, H, W)
        return out_rgb, out_aux
