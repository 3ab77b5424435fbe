"""Cross Mamba Interaction (CMI): the two modalities steer each other's recurrence.

For each modality m with partner o, the tokens of m are scanned along the four QuadSnake routes, but the
selective parameters of that scan (delta, B, C: per token, not pooled) are projected from o's tokens at the
same route position. So o decides, token by token, how much of m is written into the state (delta, B) and
what is read out (C): where the infrared shows a hot spot, the RGB state is written and read there.
Outputs are added back residually behind a learnable per-channel gate initialised small (``gate_init``),
so CMI starts close to the identity and grows as it proves useful.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn

from pmm_qsvss import QuadSnakeMixer, mixer_sizes

__all__ = ["CrossMambaInteraction"]


class _Branch(nn.Module):
    """One modality's side of CMI: a norm, the QuadSnake mixer QSVSS uses, and the residual gate."""

    def __init__(self, dim, d_inner, d_state, dt_rank, d_conv, gate_init, scan_backend):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mixer = QuadSnakeMixer(dim, d_inner, d_state, dt_rank, d_conv, scan_backend=scan_backend)
        self.gate = nn.Parameter(torch.full((dim,), float(gate_init)))


class CrossMambaInteraction(nn.Module):
    """(B, C, H, W) x 2 -> (B, C, H, W) x 2. Each modality's (delta, B, C) come from the OTHER modality: a QSVSS
    mixer whose steering tokens are the partner's."""

    def __init__(self, dim: int, d_state: int = 16, ssm_ratio: float = 1.0, dt_rank="auto", d_conv: int = 3,
                 gate_init: float = 0.1, scan_backend: str = "auto"):
        super().__init__()
        d_inner, dt_rank = mixer_sizes(dim, ssm_ratio, dt_rank)
        self.rgb = _Branch(dim, d_inner, d_state, dt_rank, d_conv, gate_init, scan_backend)
        self.aux = _Branch(dim, d_inner, d_state, dt_rank, d_conv, gate_init, scan_backend)

    def forward(self, f_rgb: torch.Tensor, f_aux: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if f_rgb.shape != f_aux.shape:
            raise ValueError(f"CMI needs equal shapes, got rgb {tuple(f_rgb.shape)} and aux {tuple(f_aux.shape)}")
        x_r, z_r = self.rgb.mixer.tokens(self.rgb.norm(f_rgb.permute(0, 2, 3, 1)))
        x_a, z_a = self.aux.mixer.tokens(self.aux.norm(f_aux.permute(0, 2, 3, 1)))
        out_rgb = f_rgb + (self.rgb.mixer(x_r, z_r, steer=x_a) * self.rgb.gate).permute(0, 3, 1, 2)
        out_aux = f_aux + (self.aux.mixer(x_a, z_a, steer=x_r) * self.aux.gate).permute(0, 3, 1, 2)
        return out_rgb, out_aux
