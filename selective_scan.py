"""The S6 selective scan (Mamba) with one public entry point and three backends.

``selective_scan_fn`` has mamba-ssm's signature, layouts and semantics::

    u, delta, z : (batch, dim, L)
    A           : (dim, dstate)                        real, negative for a stable scan
    B, C        : (batch, groups, dstate, L)           variable, one per group of dim/groups channels
                  (batch, dstate, L)                   variable, one group
                  (dim, dstate)                        constant over time and batch
    D, delta_bias : (dim,)

    delta  <- softplus(delta + delta_bias)      (bias and softplus optional)
    h_t    =  exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t       h: (batch, dim, dstate), h_{-1} = 0
    y_t    =  sum_n C_t[n] * h_t[n]  +  D * u_t
    out    =  y * silu(z)                        (when z is given)

It returns ``out`` (batch, dim, L), or ``(out, last_state)`` with ``last_state = h_{L-1}`` (batch, dim, dstate).

Backends, chosen in one place (:func:`resolve_backend`):

``"cuda"``  mamba-ssm's fused kernel, for CUDA tensors when ``mamba_ssm`` imports.
``"torch"`` our pure-PyTorch scan (:class:`_ChunkedScan`): the same recurrence, evaluated time-major in
            chunks of ``CHUNK`` steps by a function that ``torch.compile`` fuses into one kernel per chunk.
            It only ever multiplies decays ``exp(delta*A) <= 1`` (never divides by a cumulative product,
            never exponentiates a positive cumulative sum), so it is exact and stays finite for
            delta*A down to -20 per step and beyond.  It saves its inputs and one state per chunk for
            backward (never a (batch, dim, L, dstate) tensor) and recomputes the states of one chunk at a
            time in a reverse chunk scan.  Scans that would run eagerly (shorter than COMPILE_MIN_CHUNKS chunks,
            or no C++ compiler for ``torch.compile``) and whose states fit in STEP_SCAN_MAX_BYTES run as
            :class:`_StepScan` instead: all states in memory, one multiply-add per step (same numbers).
``"triton"`` our Triton kernels (``selective_scan_triton.py``): one launch for the forward, one for the backward,
            on any CUDA GPU without mamba-ssm (Triton ships with PyTorch's CUDA wheels); on CPU tensors only
            through Triton's interpreter (``TRITON_INTERPRET=1``), which is how it is tested. Variable B/C only.
``"ref"``   :func:`selective_scan_ref`, a plain sequential loop, the test oracle.
``"auto"``  on CUDA: ``cuda`` (mamba-ssm) where it imports, else ``triton``, else ``torch``; mamba-ssm's kernel
            drops the last state's gradient, so calls that need it go to ``triton`` (or ``torch``). On CPU:
            ``torch``. Constant (dim, dstate) B/C never go to ``triton``.

Everything is computed in float32; fp16/bf16 inputs come back in their own dtype.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Optional

import torch
import torch.nn.functional as F


__all__ = ["selective_scan_fn", "selective_scan_ref", "dt_bias_init", "resolve_backend", "cuda_backend_available",
           "BACKENDS", "CHUNK"]

BACKENDS = ("auto", "cuda", "triton", "torch", "ref")
# Time steps per compiled chunk: long enough that the per-call overhead is amortised, short enough
# that the unrolled graph compiles in well under a minute.
CHUNK = 16
# "0" runs the chunk functions eagerly (no compiler needed; tests use this to avoid compile time).
COMPILE_ENV = "MAMBAALIGN_COMPILE"
# Scans shorter than this many chunks run eagerly even where compilation is on: compiling costs 12-30 s per
# process even with PyTorch's cache warm (minutes cold), and saves about 18 ms per forward+backward of a 64-step
# scan (the tiny preset's CMI at 256 px, batch 8; 2 CPU cores): less than it costs for any run under ~1000 steps.
# A 1024-step scan (PMM at stride 8) saves 130 ms per call, so long scans are compiled.
COMPILE_MIN_CHUNKS = 16
# The eager path keeps every state of a scan in memory (``_StepScan``) up to this many bytes of them (it saves
# the decays too, and backward holds about five such tensors); larger scans run in chunks.
STEP_SCAN_MAX_BYTES = 64 * 2 ** 20

_MAMBA_INSTALL_HINT = (
    "pip install mamba-ssm --no-build-isolation  (needs a CUDA toolkit matching your PyTorch build; "
    "see https://github.com/state-spaces/mamba)")

_cuda_fn = None
_cuda_import_error: Optional[BaseException] = None
_cuda_import_tried = False
_warned_auto_fallback = False
_warned_last_state = False


def dt_bias_init(shape, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Mamba's initialisation of the step bias: the inverse softplus of dt ~ logU[dt_min, dt_max] (at least
    ``floor``), so softplus(delta + bias) starts in [dt_min, dt_max]."""
    u = torch.rand(shape, generator=generator)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


def _import_cuda_kernel():
    """Import mamba-ssm's selective scan once; remember why it failed (it fails without its extension)."""
    global _cuda_fn, _cuda_import_error, _cuda_import_tried
    if not _cuda_import_tried:
        _cuda_import_tried = True
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as fn
            _cuda_fn = fn
        except (ImportError, OSError) as exc:  # OSError: the extension's shared library fails to load
            _cuda_import_error = exc
    return _cuda_fn


def cuda_backend_available() -> bool:
    """True when mamba-ssm's CUDA kernel imports and a CUDA device is present."""
    return torch.cuda.is_available() and _import_cuda_kernel() is not None


def _triton_module():
    import selective_scan_triton  # imported lazily: it imports Triton, which CPU-only PyTorch wheels lack
    return selective_scan_triton


def resolve_backend(backend: str, device: torch.device, last_state_grad: bool = False,
                    variable_bc: bool = True) -> str:
    """Map a requested backend ("auto", "cuda", "triton", "torch", "ref") to the one that runs on ``device``.

    ``variable_bc``: B and C vary over time (the Triton kernels take only that layout).

    ``last_state_grad``: the caller wants the last state with gradients. mamba-ssm's kernel returns it but
    drops its gradient in backward (checked on an H100: the u, delta, A, B and delta_bias gradients then differ
    from the oracle's), so "auto" picks "torch" for such calls, and an explicit "cuda" returns the last state
    detached."""
    global _warned_auto_fallback, _warned_last_state
    if backend not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {backend!r}; choose one of {BACKENDS}")
    if backend == "cuda":
        if _import_cuda_kernel() is None:
            raise RuntimeError(
                f"selective-scan backend 'cuda' requested but mamba-ssm is not importable "
                f"({_cuda_import_error!r}). Install it with: {_MAMBA_INSTALL_HINT}, "
                f"or use backend='torch' (pure PyTorch, any device).")
        if device.type != "cuda":
            raise RuntimeError(f"selective-scan backend 'cuda' needs CUDA tensors, got tensors on {device}; "
                               f"use backend='torch' or 'auto' for CPU tensors.")
        return "cuda"
    if backend == "triton":
        tri = _triton_module()
        if not tri.available(device):
            raise RuntimeError(f"selective-scan backend 'triton' cannot run here: {tri.unavailable_reason(device)}")
        if not variable_bc:
            raise RuntimeError("selective-scan backend 'triton' takes time-varying B and C only; constant "
                               "(dim, dstate) B/C run on backend='torch'")
        return "triton"
    if backend == "auto":
        if device.type == "cuda":
            triton_ok = variable_bc and _triton_module().available(device)
            if _import_cuda_kernel() is not None:
                if not last_state_grad:
                    return "cuda"
                if not _warned_last_state:
                    _warned_last_state = True
                    warnings.warn("return_last_state with gradients: mamba-ssm's kernel drops the last state's "
                                  f"gradient, so backend 'auto' uses the {'triton' if triton_ok else 'torch'} "
                                  f"scan for these calls", stacklevel=3)
                return "triton" if triton_ok else "torch"
            if not _warned_auto_fallback:
                _warned_auto_fallback = True
                warnings.warn(f"mamba-ssm is not importable ({_cuda_import_error!r}); the selective scan uses our "
                              f"{'Triton kernels' if triton_ok else 'pure-PyTorch backend'} on CUDA. For "
                              f"mamba-ssm's fused kernel: {_MAMBA_INSTALL_HINT}", stacklevel=3)
            return "triton" if triton_ok else "torch"
        return "torch"
    return backend


# ----------------------------------------------------------------------------------------------------
# Input checks and canonical layouts
# ----------------------------------------------------------------------------------------------------

def _canonical_bc(X: torch.Tensor, name: str, batch: int, dim: int, dstate: int, L: int):
    """Return (X, groups, variable) with variable X as (batch, groups, dstate, L), constant X as (dim, dstate)."""
    if X.is_complex():
        raise TypeError(f"{name} must be real; complex selective scans are not supported")
    if X.dim() == 2:
        if tuple(X.shape) != (dim, dstate):
            raise ValueError(f"constant {name} must be (dim, dstate) = {(dim, dstate)}, got {tuple(X.shape)}")
        return X, 1, False
    if X.dim() == 3:
        X = X.unsqueeze(1)
    if X.dim() != 4 or X.shape[0] != batch or X.shape[2] != dstate or X.shape[3] != L:
        raise ValueError(f"variable {name} must be (batch, groups, dstate, L) or (batch, dstate, L) with "
                         f"batch={batch}, dstate={dstate}, L={L}; got {tuple(X.shape)}")
    groups = X.shape[1]
    if dim % groups != 0:
        raise ValueError(f"dim={dim} is not divisible by the {groups} groups of {name}")
    return X, groups, True


def _check_inputs(u, delta, A, D, z, delta_bias):
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, dim, L), got {tuple(u.shape)}")
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.is_complex():
        raise TypeError("A must be real; complex selective scans are not supported")
    if A.dim() != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(f"A must be (dim, dstate) with dim={u.shape[1]}, got {tuple(A.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (u.shape[1],):
            raise ValueError(f"{name} must be (dim,) = ({u.shape[1]},), got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")


def _prepare_delta(delta, delta_bias, delta_softplus):
    """delta (+ delta_bias) (-> softplus), in float32: softplus of bf16 loses the small steps."""
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _finish(y, u, D, z, dtype_in):
    """out = (y + D * u) * silu(z), cast back to the input dtype. y, u: (batch, dim, L) float32."""
    out = y if D is None else y + u * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(dtype_in)


# ----------------------------------------------------------------------------------------------------
# The reference: a plain sequential loop (the oracle)
# ----------------------------------------------------------------------------------------------------

def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Sequential selective scan; same signature and result as :func:`selective_scan_fn`.

    u, delta, z: (batch, dim, L); A: (dim, dstate); B, C: see the module docstring; D, delta_bias: (dim,).
    Computes in float32 and returns u's dtype. The loop walks lists made by ``unbind`` (indexing a big tensor
    inside the loop would make the backward quadratic in L).
    """
    _check_inputs(u, delta, A, D, z, delta_bias)
    dtype_in = u.dtype
    batch, dim, L = u.shape
    dstate = A.shape[1]
    u, A = u.float(), A.float()
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    B, _, _ = _canonical_bc(B, "B", batch, dim, dstate, L)
    C, _, _ = _canonical_bc(C, "C", batch, dim, dstate, L)

    def per_channel(X):  # -> (batch, dim, dstate, L) or (dim, dstate)
        if X.dim() == 2:
            return X.float()
        g = X.shape[1]
        return X.float().repeat_interleave(dim // g, dim=1)

    B, C = per_channel(B), per_channel(C)
    deltaA = torch.exp(delta.unsqueeze(-1) * A[:, None, :])         # (batch, dim, L, dstate)
    if B.dim() == 2:
        deltaB_u = (delta * u).unsqueeze(-1) * B[:, None, :]         # (batch, dim, L, dstate)
    else:
        deltaB_u = (delta * u).unsqueeze(-1) * B.transpose(2, 3)     # (batch, dim, L, dstate)
    C_steps = [C] * L if C.dim() == 2 else C.unbind(-1)              # L x (batch, dim, dstate) or (dim, dstate)
    x = 0.0                     # h_{-1} = 0, a scalar: no batch size is written into an exported graph
    ys = []
    for a_t, bu_t, c_t in zip(deltaA.unbind(2), deltaB_u.unbind(2), C_steps):
        x = a_t * x + bu_t                                           # (batch, dim, dstate)
        ys.append((x * c_t).sum(-1))                                 # (batch, dim)
    y = torch.stack(ys, dim=-1)                                      # (batch, dim, L)
    out = _finish(y, u, D, z, dtype_in)
    return (out, x) if return_last_state else out


# ----------------------------------------------------------------------------------------------------
# The fast pure-PyTorch scan
# ----------------------------------------------------------------------------------------------------
# Layout inside the fast scan: time-major, channels split into groups, so that a time step is one
# contiguous slice and B/C broadcast over the channels of their group without ever being expanded:
#   dt, u, y      : (Lp, batch, G, Dg)        Lp = L rounded up to a multiple of CHUNK
#   Bt, Ct        : (Lp, batch, G, 1, N)      variable     |  (1, 1, G, Dg, N)  constant
#   A             : (G, Dg, N)
#   h             : (batch, G, Dg, N)
# Padded steps have dt = 0 and u = 0: their decay is exp(0) = 1 and their input 0, so they carry the
# state through unchanged and the last state stays exact.

def _step_slice(X, t):
    return X[t] if X.shape[0] > 1 else X[0]


def _reduce_to(X, like):
    """Sum a (batch, G, Dg, N) step gradient down to the broadcast shape of a (b', G, Dg', N) step operand."""
    if like.shape[0] == 1:
        X = X.sum(0, keepdim=True)
    if like.shape[2] == 1:
        X = X.sum(2, keepdim=True)
    return X


def _scan_chunk_fwd(h, dt, u, A, Bt, Ct):
    """One chunk forward. h: (b, G, Dg, N); dt, u: (T, b, G, Dg); Bt, Ct: (T|1, b', G, Dg', N).
    Returns y: (T, b, G, Dg) and the state after the chunk."""
    ys = []
    for t in range(dt.shape[0]):
        dt_t = dt[t].unsqueeze(-1)                                   # (b, G, Dg, 1)
        h = torch.exp(dt_t * A) * h + (dt_t * u[t].unsqueeze(-1)) * _step_slice(Bt, t)
        ys.append((h * _step_slice(Ct, t)).sum(-1))
    return torch.stack(ys), h


def _scan_chunk_bwd(h0, dh, dt, u, A, Bt, Ct, dy):
    """One chunk backward: recompute the chunk's states from h0, then walk back.

    dh: adjoint of the state after the chunk (b, G, Dg, N); dy: (T, b, G, Dg).
    Returns (ddt, du, dBt, dCt, dA, dh0) with ddt, du: (T, b, G, Dg); dBt, dCt shaped like Bt, Ct
    (summed over the chunk when constant); dA: (G, Dg, N) summed over batch and chunk.
    """
    T = dt.shape[0]
    hs, decays = [h0], []
    h = h0
    for t in range(T):
        dt_t = dt[t].unsqueeze(-1)
        a = torch.exp(dt_t * A)
        h = a * h + (dt_t * u[t].unsqueeze(-1)) * _step_slice(Bt, t)
        hs.append(h)
        decays.append(a)
    # Gradients are appended in reverse time order and flipped at the end: older Dynamo versions (torch 2.11)
    # cannot trace item assignment into a list, and then the whole kernel would fall back to eager.
    ddts, dus, dBs, dCs = [], [], [], []
    dA = torch.zeros_like(A)
    for t in range(T - 1, -1, -1):
        B_t, C_t = _step_slice(Bt, t), _step_slice(Ct, t)
        dy_t = dy[t].unsqueeze(-1)                                   # (b, G, Dg, 1)
        dCs.append(_reduce_to(dy_t * hs[t + 1], C_t))
        dh = dh + dy_t * C_t                                         # adjoint of h_t
        dt_t, u_t = dt[t], u[t]
        dBs.append(_reduce_to(dh * (dt_t * u_t).unsqueeze(-1), B_t))
        g_in = (dh * B_t).sum(-1)                                    # d/d(dt*u)
        g_dA = dh * hs[t] * decays[t]                                # d/d(dt*A), (b, G, Dg, N)
        ddts.append(g_in * u_t + (g_dA * A).sum(-1))
        dus.append(g_in * dt_t)
        dA = dA + (g_dA * dt_t.unsqueeze(-1)).sum(0)
        dh = dh * decays[t]
    dBt = torch.stack(dBs[::-1]) if Bt.shape[0] > 1 else torch.stack(dBs).sum(0, keepdim=True)
    dCt = torch.stack(dCs[::-1]) if Ct.shape[0] > 1 else torch.stack(dCs).sum(0, keepdim=True)
    return torch.stack(ddts[::-1]), torch.stack(dus[::-1]), dBt, dCt, dA, dh


_compiled = {}
_compile_failed: Optional[BaseException] = None


def _compile_enabled() -> bool:
    return os.environ.get(COMPILE_ENV, "1") != "0" and _compile_failed is None


def _run_chunk(name, fn, nchunk, *args):
    """Run a chunk function compiled with torch.compile (for scans of at least COMPILE_MIN_CHUNKS chunks); on a
    compiler failure, warn once and run eagerly."""
    global _compile_failed
    if _compile_enabled() and nchunk >= COMPILE_MIN_CHUNKS:
        if name not in _compiled:
            # dynamic=True: one kernel with symbolic sizes serves every stage and batch size. Static kernels
            # run about 2x faster, but each new shape costs a 20-40 s recompile (and the model has several).
            _compiled[name] = torch.compile(fn, dynamic=True, fullgraph=True)
        try:
            return _compiled[name](*args)
        except Exception as exc:  # the inductor backend raises several types when no C++ compiler works
            _compile_failed = exc
            warnings.warn(f"torch.compile of the selective scan failed ({type(exc).__name__}: {exc}); running "
                          f"the same chunk functions eagerly (identical results, slower). Set "
                          f"{COMPILE_ENV}=0 to skip the attempt.", stacklevel=3)
    return fn(*args)


class _ChunkedScan(torch.autograd.Function):
    """Core recurrence y_t = C_t . h_t, h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t, on float32 inputs.

    u, dt: (batch, dim, L); A: (dim, N); B, C canonical: (batch, G, N, L) or (dim, N).
    Returns y (batch, dim, L) and the last state (batch, dim, N).
    """

    @staticmethod
    def forward(ctx, u, dt, A, B, C):
        batch, dim, L = u.shape
        N = A.shape[1]
        G = _groups(B, C)
        Dg = dim // G
        nchunk = -(-L // CHUNK)
        Lp = nchunk * CHUNK
        dt_t, u_t = _to_time_major(dt, G, Lp), _to_time_major(u, G, Lp)
        A_g = A.reshape(G, Dg, N)
        Bt, Ct = _bc_time_major(B, G, Lp), _bc_time_major(C, G, Lp)
        h = u.new_zeros(batch, G, Dg, N)
        y_t = torch.empty_like(u_t)
        starts = u.new_empty(nchunk, batch, G, Dg, N)             # one state per chunk, kept for backward
        for c in range(nchunk):
            s = slice(c * CHUNK, (c + 1) * CHUNK)
            starts[c] = h
            y_t[s], h = _run_chunk("fwd", _scan_chunk_fwd, nchunk, h, dt_t[s], u_t[s], A_g,
                                   _bc_slice(Bt, s), _bc_slice(Ct, s))
        ctx.save_for_backward(dt_t, u_t, A_g, Bt, Ct, starts)
        ctx.meta = (batch, dim, L, N, G, B.dim() == 2, C.dim() == 2)
        return _from_time_major(y_t, L), h.reshape(batch, dim, N)

    @staticmethod
    def backward(ctx, dy, dlast):
        dt_t, u_t, A_g, Bt, Ct, starts = ctx.saved_tensors
        batch, dim, L, N, G, b_const, c_const = ctx.meta
        Lp = dt_t.shape[0]
        dy_t = _to_time_major(dy.float(), G, Lp) if dy is not None else torch.zeros_like(u_t)
        dh = (dlast.float().reshape(batch, G, dim // G, N) if dlast is not None
              else u_t.new_zeros(starts.shape[1:]))
        ddt_t, du_t = torch.empty_like(dt_t), torch.empty_like(u_t)
        dBt, dCt = torch.zeros_like(Bt), torch.zeros_like(Ct)
        dA = torch.zeros_like(A_g)
        for c in range(starts.shape[0] - 1, -1, -1):
            s = slice(c * CHUNK, (c + 1) * CHUNK)
            ddt_c, du_c, dB_c, dC_c, dA_c, dh = _run_chunk(
                "bwd", _scan_chunk_bwd, starts.shape[0], starts[c], dh, dt_t[s], u_t[s], A_g,
                _bc_slice(Bt, s), _bc_slice(Ct, s), dy_t[s])
            ddt_t[s], du_t[s] = ddt_c, du_c
            _bc_accumulate(dBt, s, dB_c)
            _bc_accumulate(dCt, s, dC_c)
            dA += dA_c
        du, ddt = _from_time_major(du_t, L), _from_time_major(ddt_t, L)
        dB = _bc_from_time_major(dBt, L, b_const, dim, N)
        dC = _bc_from_time_major(dCt, L, c_const, dim, N)
        return du, ddt, dA.reshape(dim, N), dB, dC


def _groups(B, C):
    gb = B.shape[1] if B.dim() == 4 else None
    gc = C.shape[1] if C.dim() == 4 else None
    if gb is not None and gc is not None and gb != gc:
        raise ValueError(f"B and C must have the same number of groups, got {gb} and {gc}")
    return gb or gc or 1


def _to_time_major(x, G, Lp):
    """(batch, dim, L) -> (Lp, batch, G, Dg), zero-padded in time."""
    batch, dim, L = x.shape
    x = x.permute(2, 0, 1).reshape(L, batch, G, dim // G)
    if Lp > L:
        x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, Lp - L))
    return x.contiguous()


def _from_time_major(x, L):
    """(Lp, batch, G, Dg) -> (batch, dim, L)."""
    Lp, batch, G, Dg = x.shape
    return x[:L].reshape(L, batch, G * Dg).permute(1, 2, 0).contiguous()


def _bc_time_major(X, G, Lp):
    """Variable (batch, G, N, L) -> (Lp, batch, G, 1, N); constant (dim, N) -> (1, 1, G, Dg, N)."""
    if X.dim() == 2:
        dim, N = X.shape
        return X.reshape(1, 1, G, dim // G, N).contiguous()
    batch, _, N, L = X.shape
    Xt = X.permute(3, 0, 1, 2).reshape(L, batch, G, 1, N)
    if Lp > L:
        Xt = F.pad(Xt, (0, 0, 0, 0, 0, 0, 0, 0, 0, Lp - L))
    return Xt.contiguous()


def _bc_slice(Xt, s):
    return Xt[s] if Xt.shape[0] > 1 else Xt


def _bc_accumulate(dXt, s, dX_c):
    if dXt.shape[0] > 1:
        dXt[s] = dX_c
    else:
        dXt += dX_c


def _bc_from_time_major(dXt, L, const, dim, N):
    if const:
        return dXt.reshape(dim, N)
    return dXt[:L].squeeze(3).permute(1, 2, 3, 0).contiguous()        # (batch, G, N, L)


class _StepScan(torch.autograd.Function):
    """The same recurrence as :class:`_ChunkedScan`, for scans whose states fit in memory at once (``_step_path``):
    every decay ``exp(dt_t A)`` and input ``dt_t u_t B_t`` is computed for all steps in one batched operation, so
    the sequential part is ONE multiply-add per step forward (``h_t = a_t h_{t-1} + x_t``) and one backward
    (the state adjoint ``dh_t = a_{t+1} dh_{t+1} + dy_t C_t``); the gradients are batched operations over the
    stored states. Run eagerly, a chunk function spends about 6 small operations per step forward and 15
    backward; at the tiny preset's CMI (64 steps) that per-operation overhead was a third of a training step.
    Only decays <= 1 are multiplied, as in the chunked scan: exact and finite for any delta*A <= 0.

    The reductions over the state axis N (the output ``C_t . h_t``, the input gradient ``B_t . dh_t``) and, for
    variable B and C, over a group's channels (their gradients) are batched matrix products: three (L, b, G, Dg,
    N) tensors in backward where there were about eleven, several of them products broadcast along the innermost
    axis (which TensorIterator runs about 4x slower than the same product without the broadcast). A few percent
    of a training step of the tiny preset, more where fresh allocations fault pages in (docs/profile.md).

    Layout: time-major as in the chunked scan, without padding: dt, u (L, b, G, Dg); Bt, Ct (L, b, G, 1, N)
    variable or (1, 1, G, Dg, N) constant; A (G, Dg, N). Saves the states and the decays (L, b, G, Dg, N) for
    backward: recomputing the decays there (a broadcast product and an exp over the whole tensor) took about 1 ms
    of the 11.6-12.5 ms of a forward and backward of the tiny preset's CMI scan at 256 px (batch 8, 64 steps, 2
    cores)."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C):
        batch, dim, L = u.shape
        N = A.shape[1]
        G = _groups(B, C)
        b_const, c_const = B.dim() == 2, C.dim() == 2
        dt_t, u_t = _to_time_major(dt, G, L), _to_time_major(u, G, L)
        A_g = A.reshape(G, dim // G, N)
        Bt, Ct = _bc_time_major(B, G, L), _bc_time_major(C, G, L)
        decay = torch.exp(dt_t.unsqueeze(-1) * A_g)                   # (L, b, G, Dg, N), all <= 1
        states = (dt_t * u_t).unsqueeze(-1) * Bt                      # the inputs x_t, overwritten by h_t
        for t in range(1, L):
            torch.addcmul(states[t], decay[t], states[t - 1], out=states[t])
        ctx.save_for_backward(dt_t, u_t, A_g, Bt, Ct, states, decay)
        ctx.meta = (batch, dim, L, N, G, b_const, c_const)
        return _from_time_major(_state_dot(states, Ct, c_const), L), states[-1].reshape(batch, dim, N).clone()

    @staticmethod
    def backward(ctx, dy, dlast):
        dt_t, u_t, A_g, Bt, Ct, states, decay = ctx.saved_tensors
        batch, dim, L, N, G, b_const, c_const = ctx.meta
        dy_t = _to_time_major(dy.float(), G, L) if dy is not None else torch.zeros_like(u_t)
        adj = dy_t.unsqueeze(-1) * Ct                                 # dy_t C_t, overwritten by the adjoint dh_t
        if dlast is not None:
            adj[-1] += dlast.float().reshape(adj.shape[1:])
        for t in range(L - 2, -1, -1):
            torch.addcmul(adj[t], decay[t + 1], adj[t + 1], out=adj[t])
        g_in = _state_dot(adj, Bt, b_const)                           # d/d(dt*u)
        dBt = _channel_sum(dt_t * u_t, adj, Bt, b_const)
        dCt = _channel_sum(dy_t, states, Ct, c_const)
        # d/d(dt*A) = dh_t h_{t-1} a_t, zero at t = 0 (h_{-1} = 0), from t = 1 (a new buffer: the decays are
        # saved, and a second backward through the graph reads them again)
        g_dA = torch.mul(decay[1:], states[:-1]).mul_(adj[1:])
        prod = torch.mul(g_dA, A_g)
        ddt = g_in * u_t
        ddt[1:] += prod.sum(-1)
        dA = torch.mul(g_dA, dt_t[1:].unsqueeze(-1), out=prod).sum((0, 1))
        du = g_in * dt_t
        return (_from_time_major(du, L), _from_time_major(ddt, L), dA.reshape(dim, N),
                _bc_from_time_major(dBt, L, b_const, dim, N), _bc_from_time_major(dCt, L, c_const, dim, N))


def _state_dot(X, V, const: bool):
    """(L, b, G, Dg): the dot product over the state axis of X (L, b, G, Dg, N) with V, variable (L, b, G, 1, N:
    one batched matrix product) or constant (1, 1, G, Dg, N)."""
    if const:
        return (X * V).sum(-1)
    return torch.matmul(X, V.transpose(-1, -2)).squeeze(-1)


def _channel_sum(w, X, like, const: bool):
    """The gradient of B or C from w (L, b, G, Dg) times X (L, b, G, Dg, N), summed to the shape of ``like``:
    over each group's channels for variable B/C (L, b, G, 1, N: one batched matrix product), over time and
    batch for constant ones (1, 1, G, Dg, N)."""
    if const:
        return _sum_to(w.unsqueeze(-1) * X, like)
    return torch.matmul(w.unsqueeze(-2), X)


def _sum_to(X, like):
    """Sum X down to the broadcast shape of ``like`` (the dimensions where ``like`` has size 1)."""
    dims = tuple(i for i, (a, b) in enumerate(zip(X.shape, like.shape)) if b == 1 and a != 1)
    return X.sum(dims, keepdim=True) if dims else X


def _step_path(batch: int, dim: int, L: int, N: int) -> bool:
    """Whether a scan runs as :class:`_StepScan` (every state in memory, one operation per step) rather than in
    chunks: where the chunk functions would run eagerly (short scans, or no compiler) and its states fit in
    STEP_SCAN_MAX_BYTES. Long scans with torch.compile on keep the compiled chunks (one kernel per chunk)."""
    compiled = _compile_enabled() and -(-L // CHUNK) >= COMPILE_MIN_CHUNKS
    return not compiled and batch * dim * L * N * 4 <= STEP_SCAN_MAX_BYTES


@torch.compiler.disable
def _selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    dtype_in = u.dtype
    batch, dim, L = u.shape
    dstate = A.shape[1]
    u32 = u.float()
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    B, _, _ = _canonical_bc(B, "B", batch, dim, dstate, L)
    C, _, _ = _canonical_bc(C, "C", batch, dim, dstate, L)
    scan = _StepScan if _step_path(batch, dim, L, dstate) else _ChunkedScan
    y, last = scan.apply(u32, delta, A.float(), B.float(), C.float())
    out = _finish(y, u32, D, z, dtype_in)
    return (out, last) if return_last_state else out


# ----------------------------------------------------------------------------------------------------
# The public entry point
# ----------------------------------------------------------------------------------------------------

def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, backend: str = "auto"):
    """Mamba's selective scan (see the module docstring for the definition and layouts).

    u, delta, z: (batch, dim, L); A: (dim, dstate); B, C: (batch, groups, dstate, L), (batch, dstate, L) or
    (dim, dstate); D, delta_bias: (dim,). Returns out (batch, dim, L) in u's dtype, and with
    ``return_last_state`` also the final state (batch, dim, dstate) in float32.
    ``backend``: "auto" | "cuda" | "triton" | "torch" | "ref". mamba-ssm's kernel ("cuda") has no gradient for
    the last state: it comes back detached there, and "auto" avoids it when the last state is asked for with
    grad.
    """
    _check_inputs(u, delta, A, D, z, delta_bias)
    last_state_grad = return_last_state and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias))
    chosen = resolve_backend(backend, u.device, last_state_grad, variable_bc=B.dim() > 2 and C.dim() > 2)
    if chosen == "triton":
        batch, dim, L = u.shape
        B4, _, _ = _canonical_bc(B, "B", batch, dim, A.shape[1], L)
        C4, _, _ = _canonical_bc(C, "C", batch, dim, A.shape[1], L)
        return _triton_module().selective_scan_triton(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus,
                                                      return_last_state)
    if chosen == "cuda":
        res = _cuda_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
        if return_last_state:  # the kernel has no gradient for it: say so by detaching, never a wrong gradient
            return res[0], res[1].detach()
        return res
    if chosen == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return _selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
