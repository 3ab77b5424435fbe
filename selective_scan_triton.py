"""The selective scan as two Triton kernels: a fast scan on any CUDA GPU without mamba-ssm.

Dispatched from :func:`selective_scan.selective_scan_fn` as backend ``"triton"`` (and by ``"auto"`` on CUDA where
mamba-ssm does not import). Same recurrence and semantics as the other backends (see ``selective_scan.py``)::

    delta <- softplus(delta + delta_bias);  h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t
    y_t = C_t . h_t + D u_t;  out = y * silu(z)

Forward: ONE kernel launch over the whole length. The grid is (batch, groups, blocks of BLOCK_D channels of a
group); each program keeps its (BLOCK_D, dstate) state in registers, loads B_t and C_t once per step for all its
channels (they belong to one group), and fuses delta_bias, softplus, D and the z gate. Every CHUNK steps it
writes the state it starts the chunk with (``(batch, dim, L / CHUNK, dstate)``: never a (batch, dim, L, dstate)
tensor).

Backward: one launch, the same grid, chunks in reverse. A program reloads a chunk's starting state, recomputes the
chunk's states into a private scratch of (CHUNK + 1, BLOCK_D, dstate), then walks the chunk backwards. dB and dC
are summed over the program's channels and written per channel block; the blocks of a group are added
afterwards by one ``sum`` (no atomics: no race, and deterministic). dA, dD and d(delta_bias) are written per batch
element and summed the same way.

Everything is computed in float32 whatever the input dtype (fp32, fp16, bf16); the output comes back in u's
dtype and each gradient in its input's dtype. Decays exp(delta A) <= 1 are only ever multiplied, so
delta*A of -20 per step (and far beyond) stays finite.

With ``TRITON_INTERPRET=1`` (set before Triton is imported) the same kernels run on CPU tensors through
Triton's interpreter: slow, but that is how they are tested on machines without a GPU.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as exc:      # Triton ships with PyTorch's CUDA wheels; CPU-only wheels have none
    triton = tl = None
    _IMPORT_ERROR = exc

__all__ = ["available", "interpreting", "unavailable_reason", "selective_scan_triton", "CHUNK"]

# Steps between saved states: the backward recomputes at most this many states per chunk from one checkpoint.
# Shorter sequences use the next power of two >= L (fewer padded steps; one compiled kernel per value).
CHUNK = 64


def _chunk(L: int) -> int:
    return min(CHUNK, triton.next_power_of_2(max(L, 1)))


def interpreting() -> bool:
    """True when Triton runs its kernels through the interpreter (CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors on ``device``."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def unavailable_reason(device: torch.device) -> str:
    if triton is None:
        return (f"Triton is not importable ({_IMPORT_ERROR!r}); it ships with PyTorch's CUDA wheels "
                f"(pip install torch from the CUDA index), or pip install triton")
    return (f"the Triton kernels need CUDA tensors (got tensors on {device}); on CPU they run only through "
            f"Triton's interpreter: set TRITON_INTERPRET=1 before starting Python")


if triton is not None:
    @triton.jit
    def _softplus(x):
        # log1p(exp(x)) without losing the small values (Kahan's log1p: log(w) * e / (w - 1)); x itself above 20.
        e = tl.exp(tl.minimum(x, 20.0))
        w = 1.0 + e
        lp = tl.where(w == 1.0, e, tl.log(w) * e / (w - 1.0))
        return tl.where(x > 20.0, x, lp)

    @triton.jit
    def _step_inputs(u_ptr, dl_ptr, bias, t, L, su_b, su_d, su_l, sd_b, sd_d, sd_l, pid_b, d, mask_d,
                     SOFTPLUS: tl.constexpr):
        """u_t, the raw (delta + bias) and the step dt_t of one time step for the program's channels, float32.
        Past the end (t >= L) u = dt = 0: the state carries through unchanged."""
        ok = mask_d & (t < L)
        u = tl.load(u_ptr + pid_b * su_b + d * su_d + t * su_l, mask=ok, other=0.0).to(tl.float32)
        raw = tl.load(dl_ptr + pid_b * sd_b + d * sd_d + t * sd_l, mask=ok, other=0.0).to(tl.float32) + bias
        if SOFTPLUS:
            dt = _softplus(raw)
        else:
            dt = raw
        dt = tl.where(ok, dt, 0.0)
        return u, raw, dt

    @triton.jit
    def _program_channels(A_ptr, bias_ptr, D_ptr, pid_g, pid_j, Dg, N, HAS_BIAS: tl.constexpr,
                          HAS_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        """A program's channels (local index jl, global d) of group pid_g, its state lanes n, their masks, and
        its rows of A, delta_bias and D in float32 (zeros where absent)."""
        jl = tl.arange(0, BLOCK_D)
        j = pid_j * BLOCK_D + jl
        mask_d = j < Dg
        d = pid_g * Dg + j
        n = tl.arange(0, BLOCK_N)
        mask_n = n < N
        mask_dn = mask_d[:, None] & mask_n[None, :]
        A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
        Dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
        if HAS_D:
            Dv = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
        return jl, d, mask_d, n, mask_n, mask_dn, A, bias, Dv

    @triton.jit
    def _fwd_kernel(u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr, ckpt_ptr,
                    L, Dg, N, n_chunks,
                    su_b, su_d, su_l, sd_b, sd_d, sd_l, sz_b, sz_d, sz_l, so_b, so_d, so_l,
                    sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                    CHUNK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_b, pid_g, pid_j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n_groups = tl.num_programs(1)
        jl, d, mask_d, n, mask_n, mask_dn, A, bias, Dv = _program_channels(
            A_ptr, bias_ptr, D_ptr, pid_g, pid_j, Dg, N, HAS_BIAS, HAS_D, BLOCK_D, BLOCK_N)
        dim = n_groups * Dg
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        # ckpt: (batch, dim, n_chunks, N) float32, contiguous
        ck = ckpt_ptr + ((pid_b * dim + d[:, None]) * n_chunks) * N + n[None, :]
        for c in range(0, n_chunks):
            tl.store(ck + c * N, h, mask=mask_dn)
            for tt in range(0, CHUNK_T):
                t = c * CHUNK_T + tt
                u, raw, dt = _step_inputs(u_ptr, dl_ptr, bias, t, L, su_b, su_d, su_l, sd_b, sd_d, sd_l, pid_b,
                                          d, mask_d, SOFTPLUS)
                ok_n = mask_n & (t < L)
                Bt = tl.load(B_ptr + pid_b * sB_b + pid_g * sB_g + n * sB_n + t * sB_l, mask=ok_n,
                             other=0.0).to(tl.float32)
                Ct = tl.load(C_ptr + pid_b * sC_b + pid_g * sC_g + n * sC_n + t * sC_l, mask=ok_n,
                             other=0.0).to(tl.float32)
                h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
                y = tl.sum(h * Ct[None, :], axis=1)
                if HAS_D:
                    y += Dv * u
                if HAS_Z:
                    zt = tl.load(z_ptr + pid_b * sz_b + d * sz_d + t * sz_l, mask=mask_d & (t < L),
                                 other=0.0).to(tl.float32)
                    y = y * zt * tl.sigmoid(zt)
                tl.store(out_ptr + pid_b * so_b + d * so_d + t * so_l, y, mask=mask_d & (t < L))
        tl.store(last_ptr + (pid_b * dim + d[:, None]) * N + n[None, :], h, mask=mask_dn)

    @triton.jit
    def _bwd_kernel(u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr, dout_ptr, dlast_ptr,
                    scratch_ptr, du_ptr, ddl_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr,
                    L, Dg, N, n_chunks, n_blocks,
                    su_b, su_d, su_l, sd_b, sd_d, sd_l, sz_b, sz_d, sz_l, so_b, so_d, so_l,
                    sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                    HAS_DLAST: tl.constexpr, CHUNK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_N: tl.constexpr):
        pid_b, pid_g, pid_j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n_groups = tl.num_programs(1)
        jl, d, mask_d, n, mask_n, mask_dn, A, bias, Dv = _program_channels(
            A_ptr, bias_ptr, D_ptr, pid_g, pid_j, Dg, N, HAS_BIAS, HAS_D, BLOCK_D, BLOCK_N)
        dim = n_groups * Dg
        dh = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        if HAS_DLAST:
            dh = tl.load(dlast_ptr + (pid_b * dim + d[:, None]) * N + n[None, :], mask=mask_dn,
                         other=0.0).to(tl.float32)
        dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        ck = ckpt_ptr + ((pid_b * dim + d[:, None]) * n_chunks) * N + n[None, :]
        # This program's private scratch: (CHUNK_T + 1, BLOCK_D, BLOCK_N); slot 0 holds the chunk's start state,
        # slot k the state after its k-th step. Indexed by the LOCAL channel index: the same layout for the
        # stores and the loads.
        prog = (pid_b * n_groups + pid_g) * n_blocks + pid_j
        sc = scratch_ptr + prog * (CHUNK_T + 1) * BLOCK_D * BLOCK_N + jl[:, None] * BLOCK_N + n[None, :]
        # dB, dC partials: (batch, groups, n_blocks, N, L) float32
        pB = dB_ptr + ((pid_b * n_groups + pid_g) * n_blocks + pid_j) * N * L + n * L
        pC = dC_ptr + ((pid_b * n_groups + pid_g) * n_blocks + pid_j) * N * L + n * L
        for ci in range(0, n_chunks):
            c = n_chunks - 1 - ci
            tl.debug_barrier()            # the previous chunk's reads of the scratch are done
            h = tl.load(ck + c * N, mask=mask_dn, other=0.0)
            tl.store(sc, h)
            for tt in range(0, CHUNK_T):
                t = c * CHUNK_T + tt
                u, raw, dt = _step_inputs(u_ptr, dl_ptr, bias, t, L, su_b, su_d, su_l, sd_b, sd_d, sd_l, pid_b,
                                          d, mask_d, SOFTPLUS)
                Bt = tl.load(B_ptr + pid_b * sB_b + pid_g * sB_g + n * sB_n + t * sB_l, mask=mask_n & (t < L),
                             other=0.0).to(tl.float32)
                h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
                tl.store(sc + (tt + 1) * BLOCK_D * BLOCK_N, h)
            tl.debug_barrier()            # the recomputed states are visible to every thread of the program
            for ti in range(0, CHUNK_T):
                tt = CHUNK_T - 1 - ti
                t = c * CHUNK_T + tt
                ok = mask_d & (t < L)
                ok_n = mask_n & (t < L)
                u, raw, dt = _step_inputs(u_ptr, dl_ptr, bias, t, L, su_b, su_d, su_l, sd_b, sd_d, sd_l, pid_b,
                                          d, mask_d, SOFTPLUS)
                Bt = tl.load(B_ptr + pid_b * sB_b + pid_g * sB_g + n * sB_n + t * sB_l, mask=ok_n,
                             other=0.0).to(tl.float32)
                Ct = tl.load(C_ptr + pid_b * sC_b + pid_g * sC_g + n * sC_n + t * sC_l, mask=ok_n,
                             other=0.0).to(tl.float32)
                h_t = tl.load(sc + (tt + 1) * BLOCK_D * BLOCK_N)
                h_prev = tl.load(sc + tt * BLOCK_D * BLOCK_N)
                g = tl.load(dout_ptr + pid_b * so_b + d * so_d + t * so_l, mask=ok, other=0.0).to(tl.float32)
                if HAS_Z:
                    zt = tl.load(z_ptr + pid_b * sz_b + d * sz_d + t * sz_l, mask=ok, other=0.0).to(tl.float32)
                    y = tl.sum(h_t * Ct[None, :], axis=1)
                    if HAS_D:
                        y += Dv * u
                    sig = tl.sigmoid(zt)
                    tl.store(dz_ptr + (pid_b * dim + d) * L + t, g * y * sig * (1.0 + zt * (1.0 - sig)), mask=ok)
                    g = g * zt * sig                      # gradient of y
                if HAS_D:
                    dD_acc += g * u
                tl.store(pC + t, tl.sum(g[:, None] * h_t, axis=0), mask=ok_n)
                dh += g[:, None] * Ct[None, :]            # now the adjoint of h_t
                decay = tl.exp(dt[:, None] * A)
                tl.store(pB + t, tl.sum(dh * (dt * u)[:, None], axis=0), mask=ok_n)
                g_in = tl.sum(dh * Bt[None, :], axis=1)   # d/d(dt * u)
                g_dA = dh * h_prev * decay                # d/d(dt * A)
                ddt = g_in * u + tl.sum(g_dA * A, axis=1)
                du = g_in * dt
                if HAS_D:
                    du += g * Dv
                dA_acc += g_dA * dt[:, None]
                if SOFTPLUS:
                    ddt = ddt * tl.sigmoid(raw)
                ddt = tl.where(ok, ddt, 0.0)
                dbias_acc += ddt
                tl.store(du_ptr + (pid_b * dim + d) * L + t, du, mask=ok)
                tl.store(ddl_ptr + (pid_b * dim + d) * L + t, ddt, mask=ok)
                dh = dh * decay
        tl.store(dA_ptr + (pid_b * dim + d[:, None]) * N + n[None, :], dA_acc, mask=mask_dn)
        tl.store(dD_ptr + pid_b * dim + d, dD_acc, mask=mask_d)
        tl.store(dbias_ptr + pid_b * dim + d, dbias_acc, mask=mask_d)


def _blocks(Dg: int, N: int):
    block_n = triton.next_power_of_2(N)
    # Keep the (BLOCK_D, BLOCK_N) state tile near 2K floats: registers on a GPU, speed in the interpreter.
    block_d = max(1, min(triton.next_power_of_2(Dg), max(1, 2048 // block_n), 64))
    return block_d, block_n


def _on_device(x):
    """Launch on x's GPU (Triton launches on the current device); nothing to select for interpreted CPU tensors."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _strides3(x):
    return x.stride(0), x.stride(1), x.stride(2)


class _TritonScan(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        batch, dim, L = u.shape
        G, N = B.shape[1], A.shape[1]
        Dg = dim // G
        BLOCK_D, BLOCK_N = _blocks(Dg, N)
        chunk = _chunk(L)
        n_chunks = -(-L // chunk)
        n_blocks = -(-Dg // BLOCK_D)
        A32 = A.float().contiguous()
        out = torch.empty_like(u)
        last = u.new_empty(batch, dim, N, dtype=torch.float32)
        ckpt = u.new_empty(batch, dim, n_chunks, N, dtype=torch.float32)
        dummy = A32
        zz = z if z is not None else u
        grid = (batch, G, n_blocks)
        with _on_device(u):
            _fwd_kernel[grid](u, delta, A32, B, C, D if D is not None else dummy, zz,
                              delta_bias if delta_bias is not None else dummy, out, last, ckpt,
                              L, Dg, N, n_chunks,
                              *_strides3(u), *_strides3(delta), *_strides3(zz), *_strides3(out),
                              *B.stride(), *C.stride(),
                              HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                              SOFTPLUS=bool(delta_softplus), CHUNK_T=chunk, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N)
        ctx.save_for_backward(u, delta, A32, B, C, D, z, delta_bias, ckpt)
        ctx.meta = (bool(delta_softplus), A.dtype, BLOCK_D, BLOCK_N, chunk, n_chunks, n_blocks)
        ctx.mark_non_differentiable(ckpt)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A32, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        softplus, A_dtype, BLOCK_D, BLOCK_N, chunk, n_chunks, n_blocks = ctx.meta
        batch, dim, L = u.shape
        G, N = B.shape[1], A32.shape[1]
        Dg = dim // G
        f32 = dict(device=u.device, dtype=torch.float32)
        dout = torch.zeros_like(u) if dout is None else dout
        du, ddelta = torch.empty(batch, dim, L, **f32), torch.empty(batch, dim, L, **f32)
        dz = torch.empty(batch, dim, L, **f32) if z is not None else du
        dA = torch.empty(batch, dim, N, **f32)
        dD, dbias = torch.empty(batch, dim, **f32), torch.empty(batch, dim, **f32)
        dB = torch.empty(batch, G, n_blocks, N, L, **f32)
        dC = torch.empty(batch, G, n_blocks, N, L, **f32)
        scratch = torch.empty(batch * G * n_blocks * (chunk + 1) * BLOCK_D * BLOCK_N, **f32)
        zz = z if z is not None else u
        dummy = A32
        with _on_device(u):
            _bwd_kernel[(batch, G, n_blocks)](
                u, delta, A32, B, C, D if D is not None else dummy, zz,
                delta_bias if delta_bias is not None else dummy, ckpt, dout,
                dlast.float().contiguous() if dlast is not None else dummy, scratch,
                du, ddelta, dz, dA, dD, dbias, dB, dC,
                L, Dg, N, n_chunks, n_blocks,
                *_strides3(u), *_strides3(delta), *_strides3(zz), *_strides3(dout),
                *B.stride(), *C.stride(),
                HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
                HAS_DLAST=dlast is not None, CHUNK_T=chunk, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N)
        grads = [du.to(u.dtype), ddelta.to(delta.dtype), dA.sum(0).to(A_dtype),
                 dB.sum(2).to(B.dtype), dC.sum(2).to(C.dtype),
                 dD.sum(0).to(D.dtype) if D is not None else None,
                 dz.to(z.dtype) if z is not None else None,
                 dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None, None, None]
        return tuple(grads)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
    """The scan on the Triton kernels. u, delta, z: (batch, dim, L); A: (dim, dstate); B, C: (batch, groups,
    dstate, L) (callers canonicalise (batch, dstate, L) to one group); D, delta_bias: (dim,). Returns out in u's
    dtype, and with ``return_last_state`` the last state (batch, dim, dstate) in float32."""
    if triton is None or not available(u.device):
        raise RuntimeError(unavailable_reason(u.device))
    if B.dim() != 4 or C.dim() != 4:
        raise ValueError("the Triton scan takes variable B and C as (batch, groups, dstate, L); constant (dim, "
                         "dstate) B/C run on the 'torch' backend")
    if B.shape[1] != C.shape[1]:
        raise ValueError(f"B and C must have the same number of groups, got {B.shape[1]} and {C.shape[1]}")
    # The kernels index A, D and delta_bias densely; the (batch, dim, L) tensors and B, C go by their strides.
    D = D.contiguous() if D is not None else None
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    out, last = _TritonScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return (out, last) if return_last_state else out
