"""QuadSnake routes, the QSVSS visual state-space block and the Per-Modal Mamba (PMM) stack.

QuadSnake reads an H x W map along four serpentine routes, so that consecutive tokens are always spatial
neighbours (a raster scan jumps from the end of one row to the start of the next; a snake never does):

    0  row snake:            row 0 left->right, row 1 right->left, ...
    1  reverse of route 0
    2  anti-diagonal snake:  diagonals s = i + j for s = 0 .. H+W-2, points by increasing i on even s
                             and by decreasing i on odd s
    3  reverse of route 2

``cross_scan`` gathers a (B, C, H, W) map into the four sequences (B, 4, C, L) and ``cross_merge`` scatters
four sequences back to their pixels and sums them, so ``cross_merge(cross_scan(x)) == 4 * x`` exactly.
The QSVSS block scans the four routes as the four groups of ONE selective-scan call.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from selective_scan import dt_bias_init, selective_scan_fn

__all__ = ["quadsnake_routes", "cross_scan", "cross_merge", "QSVSSBlock", "QuadSnakeMixer", "PerModalMamba",
           "DropPath", "SelectiveParams", "mixer_sizes", "NUM_ROUTES"]

NUM_ROUTES = 4
_ROUTE_CACHE: Dict[Tuple[int, int, str], Tuple[torch.Tensor, torch.Tensor]] = {}


def _build_routes(H: int, W: int) -> torch.Tensor:
    idx = torch.arange(H * W).view(H, W)
    row_snake = idx.clone()
    row_snake[1::2] = row_snake[1::2].flip(1)
    row_snake = row_snake.flatten()
    i = torch.arange(H).view(H, 1).expand(H, W)
    j = torch.arange(W).view(1, W).expand(H, W)
    s = i + j
    # Sort key: diagonal first, then i ascending on even diagonals and descending on odd ones.
    within = torch.where(s % 2 == 0, i, H - 1 - i)
    diag_snake = idx.flatten()[torch.argsort((s * H + within).flatten())]
    return torch.stack([row_snake, row_snake.flip(0), diag_snake, diag_snake.flip(0)])


def _routes_and_inverse(H: int, W: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    if H < 1 or W < 1:
        raise ValueError(f"QuadSnake needs H, W >= 1, got H={H}, W={W}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    key = (H, W, str(device))
    if key not in _ROUTE_CACHE:
        routes = _build_routes(H, W)                                     # (4, L)
        inverse = torch.argsort(routes, dim=1)                           # position of each pixel on a route
        L = H * W
        offsets = torch.arange(NUM_ROUTES).view(NUM_ROUTES, 1) * L
        _ROUTE_CACHE[key] = (routes.to(device), (inverse + offsets).flatten().to(device))
    return _ROUTE_CACHE[key]


def quadsnake_routes(H: int, W: int, device=None) -> torch.Tensor:
    """LongTensor (4, H*W): route k lists the flat pixel indices i*W + j in visiting order. Cached."""
    return _routes_and_inverse(H, W, device)[0]


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4, C, H*W): the map read along the four QuadSnake routes."""
    H, W = x.shape[-2:]
    routes = quadsnake_routes(H, W, x.device)
    # Shapes are written without the batch size (flatten/unflatten): an exported graph keeps a dynamic batch.
    seq = x.flatten(2).index_select(2, routes.flatten())                 # (B, C, 4*L)
    return seq.unflatten(2, (NUM_ROUTES, H * W)).transpose(1, 2)         # (B, 4, C, L)


def cross_merge(y: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(B, 4, C, H*W) -> (B, C, H, W): each route's sequence put back on its pixels, the four summed."""
    _, K, _, L = y.shape
    if K != NUM_ROUTES or L != H * W:
        raise ValueError(f"cross_merge expects (B, 4, C, {H * W}) for H={H}, W={W}; got {tuple(y.shape)}")
    _, inverse = _routes_and_inverse(H, W, y.device)
    flat = y.transpose(1, 2).flatten(2)                                  # (B, C, 4*L)
    per_route = flat.index_select(2, inverse).unflatten(2, (NUM_ROUTES, L))
    # Pairwise sum: (a + b) + (c + d) is exact for four equal terms (2x + 2x), a running sum is not.
    merged = (per_route[:, :, 0] + per_route[:, :, 1]) + (per_route[:, :, 2] + per_route[:, :, 3])
    return merged.unflatten(2, (H, W))


class DropPath(nn.Module):
    """Stochastic depth per sample (drops the residual branch with probability p during training)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self):
        return f"p={self.p}"


class _ChannelsLastBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d for (B, H, W, C) tensors."""

    def forward(self, x):
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def _norm(kind: str, dim: int) -> nn.Module:
    if kind == "ln":
        return nn.LayerNorm(dim)
    if kind == "bn":
        return _ChannelsLastBatchNorm(dim)
    raise ValueError(f"norm must be 'ln' or 'bn', got {kind!r}")


class SelectiveParams(nn.Module):
    """Per-route selective parameters of Mamba (x_proj -> (dt, B, C), dt_proj, A_log, D) for K routes.

    Initialised as in Mamba: A_log = log(1..N); D = 1; dt_proj weight ~ U(+-dt_rank^-0.5); dt bias the
    inverse softplus of dt ~ logU[dt_min, dt_max], so softplus(dt_proj(.) + bias) starts in [1e-3, 1e-1].
    """

    def __init__(self, d_inner: int, d_state: int, dt_rank: int, routes: int = NUM_ROUTES,
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        self.d_inner, self.d_state, self.dt_rank, self.routes = d_inner, d_state, dt_rank, routes
        self.x_proj_weight = nn.Parameter(torch.empty(routes, dt_rank + 2 * d_state, d_inner))
        self.dt_proj_weight = nn.Parameter(torch.empty(routes, d_inner, dt_rank))
        self.dt_proj_bias = nn.Parameter(torch.empty(routes, d_inner))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32))
                                  .repeat(routes * d_inner, 1))
        self.D = nn.Parameter(torch.ones(routes * d_inner))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        bound = d_inner ** -0.5
        nn.init.uniform_(self.x_proj_weight, -bound, bound)
        nn.init.uniform_(self.dt_proj_weight, -dt_rank ** -0.5, dt_rank ** -0.5)
        with torch.no_grad():
            self.dt_proj_bias.copy_(dt_bias_init((routes, d_inner), dt_min, dt_max, dt_init_floor))

    def project(self, xs: torch.Tensor, routes=slice(None)):
        """xs: (B, K, d_inner, L) -> delta (B, K, d_inner, L), B and C (B, K, N, L) for routes[routes]."""
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight[routes])
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_proj_weight[routes])
        return dts, Bs, Cs

    def scan(self, xs, dts, Bs, Cs, routes=slice(None), backend="auto"):
        """Run the K routes as the K groups of one selective scan. xs, dts: (B, K, d, L) -> (B, K, d, L)."""
        K, d = xs.shape[1:3]
        A = -torch.exp(self.A_log.float()).view(self.routes, d, -1)[routes].reshape(K * d, -1)
        y = selective_scan_fn(xs.flatten(1, 2), dts.flatten(1, 2), A,
                              Bs.contiguous(), Cs.contiguous(),
                              D=self.D.view(self.routes, d)[routes].reshape(-1),
                              delta_bias=self.dt_proj_bias[routes].reshape(-1),
                              delta_softplus=True, backend=backend)
        return y.unflatten(1, (K, d))


class QuadSnakeMixer(nn.Module):
    """The state-space mixer that QSVSS and CMI share. (B, H, W, dim) tokens in and out.

    ``tokens``: in_proj to (x, z) -> depthwise conv -> SiLU. ``forward(x, z, steer)``: the per-route selective
    parameters (dt, B, C) are projected from the STEERING tokens (default: x itself, as in a QSVSS block; the
    partner modality's tokens in CMI), x is scanned over the four QuadSnake routes with them, the routes are
    merged -> norm -> * SiLU(z) -> out_proj. ``route_mode="sequential"`` scans one route at a time (lower peak
    memory, same result).
    """

    def __init__(self, dim: int, d_inner: int, d_state: int, dt_rank: int, d_conv: int = 3,
                 route_mode: str = "parallel", scan_backend: str = "auto"):
        super().__init__()
        if route_mode not in ("parallel", "sequential"):
            raise ValueError(f"route_mode must be 'parallel' or 'sequential', got {route_mode!r}")
        self.route_mode, self.scan_backend = route_mode, scan_backend
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.conv = nn.Conv2d(d_inner, d_inner, d_conv, padding=d_conv // 2, groups=d_inner)
        self.ssm = SelectiveParams(d_inner, d_state, dt_rank)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def tokens(self, xl: torch.Tensor):
        """Normalised tokens (B, H, W, dim) -> x (B, d_inner, H, W) after conv + SiLU, and z (B, H, W, d_inner)."""
        xi, z = self.in_proj(xl).chunk(2, dim=-1)
        return F.silu(self.conv(xi.permute(0, 3, 1, 2).contiguous())), z

    def _scan(self, x: torch.Tensor, steer: torch.Tensor) -> torch.Tensor:
        """x, steer: (B, d_inner, H, W) -> (B, d_inner, H, W), the four routes merged."""
        H, W = x.shape[-2:]
        if self.route_mode == "parallel":
            xs = cross_scan(x)                                           # (B, 4, d, L)
            dts, Bs, Cs = self.ssm.project(xs if steer is x else cross_scan(steer))
            return cross_merge(self.ssm.scan(xs, dts, Bs, Cs, backend=self.scan_backend), H, W)
        routes = quadsnake_routes(H, W, x.device)
        flat, flat_steer = x.flatten(2), steer.flatten(2)
        merged = torch.zeros_like(flat)
        for k in range(NUM_ROUTES):
            xs = flat.index_select(2, routes[k]).unsqueeze(1)            # (B, 1, d, L)
            ss = xs if steer is x else flat_steer.index_select(2, routes[k]).unsqueeze(1)
            dts, Bs, Cs = self.ssm.project(ss, routes=slice(k, k + 1))
            y = self.ssm.scan(xs, dts, Bs, Cs, routes=slice(k, k + 1), backend=self.scan_backend)
            merged = merged.index_add(2, routes[k], y[:, 0])
        return merged.unflatten(2, (H, W))

    def forward(self, x: torch.Tensor, z: torch.Tensor, steer: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x, steer: (B, d_inner, H, W); z: (B, H, W, d_inner) -> (B, H, W, dim)."""
        y = self._scan(x, x if steer is None else steer).permute(0, 2, 3, 1)   # (B, H, W, d_inner)
        return self.out_proj(self.out_norm(y) * F.silu(z))


def mixer_sizes(dim: int, ssm_ratio: float, dt_rank="auto"):
    """(d_inner, dt_rank) of a mixer: d_inner = ssm_ratio * dim, dt_rank = ceil(dim / 16) as in Mamba."""
    return int(round(ssm_ratio * dim)), (math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank))


class QSVSSBlock(nn.Module):
    """QuadSnake visual state-space block. (B, dim, H, W) -> (B, dim, H, W).

    norm -> QuadSnakeMixer (in_proj to (x, z) -> depthwise conv -> SiLU -> per-route (dt, B, C) -> selective
    scan over the 4 routes -> merge -> norm -> * SiLU(z) -> out_proj) -> residual (+DropPath);
    norm -> MLP -> residual. ``route_mode="sequential"`` scans one route at a time (lower peak memory).
    """

    def __init__(self, dim: int, d_state: int = 16, ssm_ratio: float = 2.0, dt_rank="auto", d_conv: int = 3,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, norm: str = "ln",
                 route_mode: str = "parallel", scan_backend: str = "auto"):
        super().__init__()
        self.dim = dim
        self.d_inner, self.dt_rank = mixer_sizes(dim, ssm_ratio, dt_rank)
        self.norm1 = _norm(norm, dim)
        self.mixer = QuadSnakeMixer(dim, self.d_inner, d_state, self.dt_rank, d_conv, route_mode, scan_backend)
        self.drop_path = DropPath(drop_path)
        self.norm2 = _norm(norm, dim)
        hidden = int(round(mlp_ratio * dim))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    @property
    def ssm(self) -> SelectiveParams:
        return self.mixer.ssm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xl = x.permute(0, 2, 3, 1)                                       # (B, H, W, C)
        xi, z = self.mixer.tokens(self.norm1(xl))
        xl = xl + self.drop_path(self.mixer(xi, z))
        xl = xl + self.drop_path(self.mlp(self.norm2(xl)))
        return xl.permute(0, 3, 1, 2).contiguous()


class PerModalMamba(nn.Module):
    """A stack of ``depth`` QSVSS blocks for one modality at one stage. (B, dim, H, W) in and out.

    ``drop_path`` may be a float (same for every block) or a sequence of ``depth`` rates.
    """

    def __init__(self, dim: int, depth: int, drop_path=0.0, **block_kwargs):
        super().__init__()
        rates = [float(drop_path)] * depth if isinstance(drop_path, (int, float)) else list(drop_path)
        if len(rates) != depth:
            raise ValueError(f"drop_path has {len(rates)} rates for depth {depth}")
        self.blocks = nn.ModuleList(QSVSSBlock(dim, drop_path=r, **block_kwargs) for r in rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x
