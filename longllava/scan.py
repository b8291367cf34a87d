"""Selective scan (the Mamba SSM recurrence) for Jamba's Mamba layers, fast on machines without mamba-ssm.

The recurrence, per batch row ``b``, channel ``d`` and state index ``n`` (mamba-ssm's conventions)::

    dt[t]   = softplus(delta[t] + delta_bias)        (softplus and bias optional)
    h[t]    = exp(dt[t] * A[d, n]) * h[t-1] + dt[t] * B[n, t] * u[t]
    y[t]    = sum_n C[n, t] * h[t] + D[d] * u[t]
    out[t]  = y[t] * silu(z[t])                      (gate optional)

Shapes: ``u, delta, z``: (batch, d_inner, length); ``A``: (d_inner, d_state); ``B, C``: (batch, d_state,
length) or (batch, groups, d_state, length); ``D, delta_bias``: (d_inner,); ``initial_state`` and the
returned last state: (batch, d_inner, d_state), float32.

Three implementations, one signature:

* :func:`selective_scan_ref` -- plain PyTorch, one time step at a time; readable, autograd-differentiable,
  the reference every test compares against.
* the CPU kernel behind :func:`selective_scan` -- numba, parallel over channels, a vectorised exp, and
  a forward+backward pair wrapped in a ``torch.autograd.Function``. Memory is O(batch * d_inner * d_state)
  for the state, plus the (batch, d_inner, length) outputs; the backward keeps one state every
  ``CHECKPOINT_STEPS`` steps and recomputes the states inside each chunk while it scans backwards.
* mamba-ssm's CUDA kernel when the tensors are on CUDA and ``mamba_ssm`` is installed; an initial state
  is added exactly through the linearity of the recurrence (mamba-ssm's kernel has no initial state).

:func:`install_fast_scan` plugs the scan into transformers' Jamba (version-checked, idempotent,
reversible). It also makes Jamba's Mamba mixer start a multi-token chunk from the cached SSM state:
transformers 5.23 restarts the scan from zero for every chunk after the first, so chunked prefill
diverged from a one-shot forward there.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
import threading
import warnings

import numpy as np
import torch
import torch.nn.functional as F

try:  # numba is a hard dependency, but keep the module importable (the reference path) without it
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised only on broken installs
    numba = None

__all__ = [
    "CHECKPOINT_STEPS",
    "TESTED_TRANSFORMERS_VERSIONS",
    "fast_scan_installed",
    "install_fast_scan",
    "mamba_ssm_available",
    "selective_scan",
    "selective_scan_ref",
    "uninstall_fast_scan",
]

CHECKPOINT_STEPS = 512  # the backward's per-thread buffers: ~100 KB, in L2
TESTED_TRANSFORMERS_VERSIONS: tuple[str, ...] = ("5.23",)
_LOG2E = 1.4426950408889634
# numba's default threading layer is not safe for concurrent calls from several Python threads (apps).
_KERNEL_LOCK = threading.Lock()
# Fast-math without nnan/ninf: reductions may be reordered (vectorised), NaN/inf still propagate.
_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


# ----------------------------------------------------------------------------------------------------
# Input checks and preparation shared by every path
# ----------------------------------------------------------------------------------------------------


def _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state) -> tuple[int, int, int, int, int]:
    """Validate the mamba-ssm shapes; return (batch, d_inner, length, d_state, groups)."""
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, d_inner, length), got shape {tuple(u.shape)}")
    batch, d_inner, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta shape {tuple(delta.shape)} must equal u shape {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != d_inner or A.is_complex():
        raise ValueError(f"selective_scan: A must be real (d_inner={d_inner}, d_state), got {tuple(A.shape)}")
    d_state = A.shape[1]
    groups = _check_bc("B", B, batch, d_state, length)
    if _check_bc("C", C, batch, d_state, length) != groups:
        raise ValueError(f"selective_scan: B and C must have the same groups, got {tuple(B.shape)} and {tuple(C.shape)}")
    if d_inner % groups:
        raise ValueError(f"selective_scan: d_inner={d_inner} is not a multiple of the {groups} B/C groups")
    for name, tensor, shape in (
        ("D", D, (d_inner,)),
        ("delta_bias", delta_bias, (d_inner,)),
        ("z", z, (batch, d_inner, length)),
        ("initial_state", initial_state, (batch, d_inner, d_state)),
    ):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"selective_scan: {name} must have shape {shape}, got {tuple(tensor.shape)}")
    return batch, d_inner, length, d_state, groups


def _check_bc(name: str, tensor: torch.Tensor, batch: int, d_state: int, length: int) -> int:
    if tensor.dim() == 3 and tuple(tensor.shape) == (batch, d_state, length):
        return 1
    if tensor.dim() == 4 and tensor.shape[0] == batch and tuple(tensor.shape[2:]) == (d_state, length):
        return tensor.shape[1]
    raise ValueError(
        f"selective_scan: {name} must be (batch={batch}, d_state={d_state}, length={length}) or "
        f"(batch, groups, d_state, length); got {tuple(tensor.shape)} (input-independent B/C is not supported)"
    )


def _discretised_dt(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool) -> torch.Tensor:
    """dt = softplus(delta + bias) in float32, (batch, d_inner, length)."""
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    return dt


def _grouped(tensor: torch.Tensor) -> torch.Tensor:
    """B or C as (batch, groups, d_state, length)."""
    return tensor.unsqueeze(1) if tensor.dim() == 3 else tensor


# ----------------------------------------------------------------------------------------------------
# Reference: plain PyTorch, one step at a time
# ----------------------------------------------------------------------------------------------------


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The selective scan written step by step in PyTorch (float32), differentiable by autograd."""
    batch, d_inner, length, d_state, groups = _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    channels_per_group = d_inner // groups
    dt = _discretised_dt(delta, delta_bias, delta_softplus)
    x = u.float()
    A = A.float()
    B_groups, C_groups = _grouped(B).float(), _grouped(C).float()  # (batch, groups, d_state, length)
    if initial_state is None:
        state = x.new_zeros(batch, d_inner, d_state)
    else:
        state = initial_state.float()
    outputs = []
    # unbind (not x[..., t]): its backward is one stack, where per-step indexing would be quadratic
    steps = zip(dt.unbind(-1), x.unbind(-1), B_groups.unbind(-1), C_groups.unbind(-1))
    for dt_t, x_t, B_t, C_t in steps:  # dt_t, x_t: (batch, d_inner); B_t, C_t: (batch, groups, d_state)
        B_t = B_t.repeat_interleave(channels_per_group, dim=1)  # (batch, d_inner, d_state)
        C_t = C_t.repeat_interleave(channels_per_group, dim=1)
        decay = torch.exp(dt_t[..., None] * A)  # (batch, d_inner, d_state)
        state = decay * state + (dt_t * x_t)[..., None] * B_t
        outputs.append((state * C_t).sum(-1))
    y = torch.stack(outputs, dim=-1) if outputs else x.new_zeros(batch, d_inner, 0)
    if D is not None:
        y = y + x * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    out = y.to(u.dtype)
    return (out, state) if return_last_state else out


# ----------------------------------------------------------------------------------------------------
# numba kernels (CPU)
# ----------------------------------------------------------------------------------------------------

if numba is not None:

    @njit(inline="always", fastmath=_FASTMATH)
    def _decay_row(dt_value, A_row, decay, exponent_bits, exponent_scale):  # pragma: no cover - jitted
        """decay[k] = exp(dt_value * A_row[k]) with a vectorisable exp (relative error ~2e-7).

        exp(x) = 2**m * exp(r), m = round(x / ln 2), r = x - m ln 2 (Cody-Waite, two-part ln 2), |r| <= ln2/2:
        m goes straight into the float exponent bits (exponent_bits is an int32 view of exponent_scale),
        exp(r) through its degree-6 Taylor polynomial (truncation error < 1.2e-7).
        """
        for k in range(decay.shape[0]):
            x = dt_value * A_row[k]
            if x < -87.0:  # below float32's normal range: the decay is 0 to float precision
                x = np.float32(-87.0)
            if x > 88.0:
                x = np.float32(88.0)
            m = np.floor(x * np.float32(_LOG2E) + np.float32(0.5))
            r = (x - m * np.float32(0.693145751953125)) - m * np.float32(1.428606765330187e-06)
            p = np.float32(1.0 / 720.0)
            p = p * r + np.float32(1.0 / 120.0)
            p = p * r + np.float32(1.0 / 24.0)
            p = p * r + np.float32(1.0 / 6.0)
            p = p * r + np.float32(0.5)
            p = p * r + np.float32(1.0)
            p = p * r + np.float32(1.0)
            decay[k] = p
            exponent_bits[k] = (np.int32(m) + np.int32(127)) << np.int32(23)
        for k in range(decay.shape[0]):
            decay[k] = decay[k] * exponent_scale[k]

    @njit(fastmath=_FASTMATH, cache=True)
    def _exp_kernel(x, out):  # pragma: no cover - jitted; exposed for the accuracy test
        bits = np.empty(x.shape[0], np.int32)
        scale = bits.view(np.float32)
        _decay_row(np.float32(1.0), x, out, bits, scale)

    @njit(parallel=True, fastmath=_FASTMATH, cache=True)
    def _forward_kernel(
        u, dt, A, B, C, D, z, has_z, state, out, checkpoints, save_checkpoints, chunk, block_starts
    ):  # pragma: no cover - jitted
        """Scan all channels; `state` (batch*d_inner, d_state) is read as h0 and left as the last state.

        u, dt, z, out: (batch, d_inner, length); B, C: (batch, groups, length, d_state) (time-major);
        checkpoints: (batch*d_inner, n_chunks, d_state), the state *before* each chunk of `chunk` steps.
        Blocks of channels run in parallel; inside a block, chunks of time are the outer loop so the
        chunk of B/C stays in cache while the block's channels go over it.
        """
        batch, d_inner, length = u.shape
        d_state = A.shape[1]
        per_group = d_inner // B.shape[1]
        n_chunks = (length + chunk - 1) // chunk
        for block in prange(block_starts.shape[0] - 1):
            first, last = block_starts[block], block_starts[block + 1]
            decay = np.empty(d_state, np.float32)
            bits = np.empty(d_state, np.int32)
            scale = bits.view(np.float32)
            for c in range(n_chunks):
                t0 = c * chunk
                t1 = min(length, t0 + chunk)
                for idx in range(first, last):
                    b = idx // d_inner
                    d = idx % d_inner
                    g = d // per_group
                    h = state[idx]
                    if save_checkpoints:
                        checkpoints[idx, c, :] = h
                    for t in range(t0, t1):
                        dt_t = dt[b, d, t]
                        x_t = dt_t * u[b, d, t]
                        _decay_row(dt_t, A[d], decay, bits, scale)
                        y = np.float32(0.0)
                        for k in range(d_state):
                            h[k] = decay[k] * h[k] + x_t * B[b, g, t, k]
                            y += h[k] * C[b, g, t, k]
                        y += D[d] * u[b, d, t]
                        if has_z:
                            gate = z[b, d, t]
                            y = y * gate / (np.float32(1.0) + math.exp(-gate))
                        out[b, d, t] = y

    @njit(parallel=True, fastmath=_FASTMATH, cache=True)
    def _backward_kernel(
        u, dt, A, B, C, D, z, has_z, dout, checkpoints, chunk, block_starts, grad_state,
        du, ddt, dz, dA, dD, dB, dC,
    ):  # pragma: no cover - jitted
        """Reverse scan. grad_state (batch*d_inner, d_state) enters as dL/d(last state), leaves as dL/dh0.

        dB, dC: (blocks, batch, groups, length, d_state) partial sums, one slice per block (no races);
        dA: (batch*d_inner, d_state) float64 (each chunk's part summed in float32 first, so the innermost loop
        stays in float32), dD: (batch*d_inner,) float64, summed over batch by the caller.
        Per chunk (last first) and channel, four passes over its steps: the states, recomputed forwards
        from the chunk's checkpoint; dL/dy and the gate's gradient; dL/dh, backwards through the decays;
        then the gradients of u, dt, A, B, C, D. Only the first and third carry a value from step to step;
        split this way the backward runs about 1.25x faster than one fused reverse loop (demo-sized layer).
        """
        batch, d_inner, length = u.shape
        d_state = A.shape[1]
        per_group = d_inner // B.shape[1]
        n_chunks = (length + chunk - 1) // chunk
        for block in prange(block_starts.shape[0] - 1):
            first, last = block_starts[block], block_starts[block + 1]
            states = np.empty((chunk + 1, d_state), np.float32)  # states[j] = h before step t0 + j
            decays = np.empty((chunk, d_state), np.float32)
            grad_hs = np.empty((chunk, d_state), np.float32)  # dL/dh after step t0 + j, all paths
            grad_ys = np.empty(chunk, np.float32)  # dL/dy before the gate at step t0 + j
            grad_h = np.empty(d_state, np.float32)
            dA_chunk = np.empty(d_state, np.float32)
            bits = np.empty(d_state, np.int32)
            scale = bits.view(np.float32)
            for c in range(n_chunks - 1, -1, -1):
                t0 = c * chunk
                steps = min(length, t0 + chunk) - t0
                for idx in range(first, last):
                    b = idx // d_inner
                    d = idx % d_inner
                    g = d // per_group
                    A_row, D_d = A[d], D[d]
                    u_row, dt_row = u[b, d], dt[b, d]
                    states[0, :] = checkpoints[idx, c, :]
                    for j in range(steps):
                        dt_t = dt_row[t0 + j]
                        x_t = dt_t * u_row[t0 + j]
                        _decay_row(dt_t, A_row, decays[j], bits, scale)
                        B_t = B[b, g, t0 + j]
                        for k in range(d_state):
                            states[j + 1, k] = decays[j, k] * states[j, k] + x_t * B_t[k]
                    for j in range(steps):
                        t = t0 + j
                        grad_y = dout[b, d, t]
                        if has_z:
                            C_t = C[b, g, t]
                            y = np.float32(0.0)
                            for k in range(d_state):
                                y += C_t[k] * states[j + 1, k]
                            y += D_d * u_row[t]
                            gate = z[b, d, t]
                            sig = np.float32(1.0) / (np.float32(1.0) + math.exp(-gate))
                            dz[b, d, t] = grad_y * y * sig * (np.float32(1.0) + gate * (np.float32(1.0) - sig))
                            grad_y = grad_y * gate * sig
                        grad_ys[j] = grad_y
                        dD[idx] += grad_y * u_row[t]
                    grad_h[:] = grad_state[idx]
                    for j in range(steps - 1, -1, -1):
                        C_t = C[b, g, t0 + j]
                        for k in range(d_state):
                            grad_hs[j, k] = grad_h[k] + grad_ys[j] * C_t[k]
                            grad_h[k] = grad_hs[j, k] * decays[j, k]
                    grad_state[idx, :] = grad_h
                    dA_chunk[:] = 0.0
                    for j in range(steps):
                        t = t0 + j
                        dt_t = dt_row[t]
                        u_t = u_row[t]
                        x_t = dt_t * u_t
                        grad_y = grad_ys[j]
                        B_t, dB_t, dC_t = B[b, g, t], dB[block, b, g, t], dC[block, b, g, t]
                        for k in range(d_state):
                            dC_t[k] += grad_y * states[j + 1, k]
                            dB_t[k] += grad_hs[j, k] * x_t
                        grad_B = np.float32(0.0)  # sum_k dL/dh[k] * B[k]
                        through_A = np.float32(0.0)  # sum_k dL/d(decay[k]) * decay[k] * A[k]
                        for k in range(d_state):
                            grad_B += grad_hs[j, k] * B_t[k]
                            through_decay = grad_hs[j, k] * states[j, k] * decays[j, k]
                            through_A += through_decay * A_row[k]
                            dA_chunk[k] += through_decay * dt_t
                        du[b, d, t] = grad_y * D_d + dt_t * grad_B
                        ddt[b, d, t] = u_t * grad_B + through_A
                    for k in range(d_state):
                        dA[idx, k] += dA_chunk[k]


def _block_starts(channels: int) -> np.ndarray:
    """Split batch*d_inner channels into one contiguous block per numba thread."""
    blocks = max(1, min(channels, numba.get_num_threads()))
    return np.linspace(0, channels, blocks + 1).round().astype(np.int64)


def _time_major(tensor: torch.Tensor) -> torch.Tensor:
    """(batch, groups, d_state, length) -> contiguous float32 (batch, groups, length, d_state)."""
    return tensor.float().transpose(2, 3).contiguous()


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().numpy()


class _NumbaSelectiveScan(torch.autograd.Function):
    """Autograd wrapper around the numba forward and backward kernels (CPU, float32 inside)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save_for_backward):
        batch, d_inner, length, d_state, groups = _check_shapes(
            u, delta, A, B, C, D, z, delta_bias, initial_state
        )
        dt = _discretised_dt(delta, delta_bias, delta_softplus).contiguous()
        u32 = u.detach().float().contiguous()
        A32 = A.detach().float().contiguous()
        B_tm, C_tm = _time_major(_grouped(B.detach())), _time_major(_grouped(C.detach()))
        D32 = D.detach().float().contiguous() if D is not None else u32.new_zeros(d_inner)
        z32 = z.detach().float().contiguous() if z is not None else u32.new_zeros(1, 1, 1)
        if initial_state is not None:
            state = initial_state.detach().float().reshape(batch * d_inner, d_state).clone()
        else:
            state = u32.new_zeros(batch * d_inner, d_state)
        n_chunks = max(1, math.ceil(length / CHECKPOINT_STEPS))
        checkpoints = u32.new_empty((batch * d_inner, n_chunks, d_state) if save_for_backward else (1, 1, 1))
        out = u32.new_empty(batch, d_inner, length)
        with _KERNEL_LOCK:
            _forward_kernel(
                _np(u32), _np(dt.detach()), _np(A32), _np(B_tm), _np(C_tm), _np(D32), _np(z32),
                z is not None, _np(state), _np(out), _np(checkpoints), save_for_backward, CHECKPOINT_STEPS,
                _block_starts(batch * d_inner),
            )
        if save_for_backward:
            ctx.save_for_backward(u32, delta, A32, B_tm, C_tm, D32, z32, delta_bias, checkpoints)
            ctx.flags = (z is not None, D is not None, delta_softplus, initial_state is not None, groups, B.dim())
        return out.to(u.dtype), state.view(batch, d_inner, d_state)

    @staticmethod
    def backward(ctx, grad_out, grad_last_state):
        u32, delta, A32, B_tm, C_tm, D32, z32, delta_bias, checkpoints = ctx.saved_tensors
        has_z, has_D, delta_softplus, has_initial_state, groups, bc_dims = ctx.flags
        batch, d_inner, length = u32.shape
        d_state = A32.shape[1]
        dt = _discretised_dt(delta.detach(), delta_bias, delta_softplus).contiguous()
        starts = _block_starts(batch * d_inner)
        blocks = len(starts) - 1
        if grad_last_state is None:
            grad_state = u32.new_zeros(batch * d_inner, d_state)
        else:
            grad_state = grad_last_state.float().reshape(batch * d_inner, d_state).clone()
        grad_out = grad_out.float().contiguous()
        du, ddt = torch.empty_like(u32), torch.empty_like(u32)
        dz = torch.empty_like(u32) if has_z else u32.new_zeros(1, 1, 1)
        dA = torch.zeros(batch * d_inner, d_state, dtype=torch.float64)
        dD = torch.zeros(batch * d_inner, dtype=torch.float64)
        dB = u32.new_zeros(blocks, batch, groups, length, d_state)
        dC = u32.new_zeros(blocks, batch, groups, length, d_state)
        with _KERNEL_LOCK:
            _backward_kernel(
                _np(u32), _np(dt), _np(A32), _np(B_tm), _np(C_tm), _np(D32), _np(z32), has_z,
                _np(grad_out), _np(checkpoints), CHECKPOINT_STEPS, starts, _np(grad_state),
                _np(du), _np(ddt), _np(dz), _np(dA), _np(dD), _np(dB), _np(dC),
            )
        grad_dt_pre = ddt * torch.sigmoid(_discretised_dt(delta.detach(), delta_bias, False)) if delta_softplus else ddt
        grads = {
            "u": du,
            "delta": grad_dt_pre,
            "A": dA.view(batch, d_inner, d_state).sum(0).float(),
            "B": _from_time_major(dB.sum(0), bc_dims),
            "C": _from_time_major(dC.sum(0), bc_dims),
            "D": dD.view(batch, d_inner).sum(0).float() if has_D else None,
            "z": dz if has_z else None,
            "delta_bias": grad_dt_pre.sum((0, 2)) if delta_bias is not None else None,
            "initial_state": grad_state.view(batch, d_inner, d_state) if has_initial_state else None,
        }
        names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
        return (*[_grad_for(grads[name], needs) for name, needs in zip(names, ctx.needs_input_grad)], None, None)


def _from_time_major(grad: torch.Tensor, dims: int) -> torch.Tensor:
    """(batch, groups, length, d_state) -> the caller's (batch, d_state, length) or (batch, groups, d_state, length)."""
    grad = grad.transpose(2, 3)
    return grad[:, 0] if dims == 3 else grad


def _grad_for(grad: torch.Tensor | None, needed: bool) -> torch.Tensor | None:
    return grad if needed else None


# ----------------------------------------------------------------------------------------------------
# mamba-ssm (CUDA) and the initial state by linearity
# ----------------------------------------------------------------------------------------------------


@functools.cache
def _mamba_ssm_scan_fn():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or a CUDA extension that fails to load
        return None
    return selective_scan_fn


def mamba_ssm_available() -> bool:
    """True when mamba-ssm's CUDA selective scan can be imported."""
    return _mamba_ssm_scan_fn() is not None


def _scan_with_initial_state_by_linearity(
    zero_state_scan, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, time_chunk: int = 2048
):
    """Run a scan that only starts from h0 = 0, then add h0's exact contribution.

    The recurrence is linear in h, so h[t] = h_zero[t] + exp(A * sum_{s<=t} dt[s]) * h0: the output gains
    sum_n C[n, t] * exp(A[n] * cumdt[t]) * h0[n] before the gate. Computed in time chunks so the
    (batch, d_inner, d_state, chunk) decay tensor stays bounded.
    """
    y_zero, last_zero = zero_state_scan(
        u, delta, A, B, C, D=D, z=None, delta_bias=delta_bias, delta_softplus=delta_softplus,
        return_last_state=True,
    )
    batch, d_inner, length = u.shape
    dt = _discretised_dt(delta, delta_bias, delta_softplus)
    cumulative_dt = torch.cumsum(dt, dim=-1)  # (batch, d_inner, length)
    C_groups = _grouped(C).float()  # (batch, groups, d_state, length)
    groups = C_groups.shape[1]
    h0 = initial_state.float()
    pieces = []
    for start in range(0, length, time_chunk):
        stop = min(length, start + time_chunk)
        decay = torch.exp(A.float()[None, :, :, None] * cumulative_dt[:, :, None, start:stop])  # (b, d, n, T)
        carried = (decay * h0[..., None]).view(batch, groups, d_inner // groups, -1, stop - start)
        pieces.append((carried * C_groups[:, :, None, :, start:stop]).sum(3).reshape(batch, d_inner, -1))
    y = y_zero.float() + torch.cat(pieces, dim=-1) if pieces else y_zero.float()
    if z is not None:
        y = y * F.silu(z.float())
    last = last_zero.float() + torch.exp(A.float() * cumulative_dt[:, :, -1:]) * h0 if length else h0
    return y.to(u.dtype), last


# ----------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------

_warned_slow_device: set[str] = set()


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_last_state: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan with mamba-ssm's signature plus ``initial_state``; differentiable.

    backend: "auto" (mamba-ssm on CUDA when installed, the numba kernel on CPU, the reference
    elsewhere), or force one of "mamba_ssm", "numba", "ref".
    """
    backend = _pick_backend(u, backend)
    kwargs = {"D": D, "z": z, "delta_bias": delta_bias, "delta_softplus": delta_softplus}
    if backend == "ref":
        return selective_scan_ref(
            u, delta, A, B, C, **kwargs, initial_state=initial_state, return_last_state=return_last_state
        )
    if backend == "mamba_ssm":
        out, last = _mamba_ssm_scan(u, delta, A, B, C, **kwargs, initial_state=initial_state)
        return (out, last) if return_last_state else out
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    out, last = _NumbaSelectiveScan.apply(*tensors, delta_softplus, needs_grad)
    return (out, last) if return_last_state else out


def _pick_backend(u: torch.Tensor, backend: str) -> str:
    if backend not in ("auto", "mamba_ssm", "numba", "ref"):
        raise ValueError(f"selective_scan: unknown backend {backend!r}; use auto, mamba_ssm, numba or ref")
    if backend == "auto":
        if u.is_cuda and mamba_ssm_available():
            return "mamba_ssm"
        if u.device.type == "cpu" and numba is not None:
            return "numba"
        if u.device.type not in _warned_slow_device:
            _warned_slow_device.add(u.device.type)
            warnings.warn(
                f"selective_scan: no fast kernel for device {u.device.type!r} (install mamba-ssm on CUDA); "
                "using the step-by-step PyTorch reference, which is slow for long inputs.",
                stacklevel=3,
            )
        return "ref"
    if backend == "mamba_ssm" and not mamba_ssm_available():
        raise RuntimeError("selective_scan: backend 'mamba_ssm' requested but mamba_ssm is not importable")
    if backend == "numba" and (numba is None or u.device.type != "cpu"):
        raise RuntimeError(f"selective_scan: backend 'numba' needs CPU tensors and numba (got {u.device})")
    return backend


def _mamba_ssm_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    scan_fn = _mamba_ssm_scan_fn()
    if initial_state is None:
        return scan_fn(
            u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
            return_last_state=True,
        )
    return _scan_with_initial_state_by_linearity(
        scan_fn, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state
    )


# ----------------------------------------------------------------------------------------------------
# transformers' Jamba hook
# ----------------------------------------------------------------------------------------------------

# The cached SSM state a Jamba mixer hands to the scan of a multi-token chunk (None: start from zero).
_JAMBA_INITIAL_STATE: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "longllava_jamba_initial_state", default=None
)
_ORIGINALS: dict[str, object] = {}


def _jamba_scan(
    hidden_states: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    **unused_kwargs: object,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for transformers' ``modeling_jamba.mamba_selective_scan`` (same arguments)."""
    return selective_scan(
        hidden_states, dt, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
        initial_state=_JAMBA_INITIAL_STATE.get(), return_last_state=return_last_state,
    )


def _mixer_forward_with_initial_state(original_forward):
    @functools.wraps(original_forward)
    def forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
        initial_state = None
        if cache_params is not None and hidden_states.shape[1] > 1:
            cached = cache_params.get_recurrent_state(self.layer_idx, state_idx=0)
            initial_state = None if cached is None else cached.detach().clone()
        token = _JAMBA_INITIAL_STATE.set(initial_state)
        try:
            return original_forward(self, hidden_states, cache_params, attention_mask, **kwargs)
        finally:
            _JAMBA_INITIAL_STATE.reset(token)

    forward.__longllava_fast_scan__ = True
    return forward


def _check_jamba_compatible(modeling_jamba, force: bool) -> None:
    import transformers

    version = transformers.__version__
    if not any(version == v or version.startswith(v + ".") for v in TESTED_TRANSFORMERS_VERSIONS) and not force:
        raise RuntimeError(
            f"install_fast_scan: tested with transformers {', '.join(TESTED_TRANSFORMERS_VERSIONS)}, found "
            f"{version}; check that JambaMambaMixer.forward still calls mamba_selective_scan and reads "
            "cache_params.get_recurrent_state, then call install_fast_scan(force=True)"
        )
    mixer = getattr(modeling_jamba, "JambaMambaMixer", None)
    if mixer is None or not callable(getattr(modeling_jamba, "mamba_selective_scan", None)):
        raise RuntimeError("install_fast_scan: transformers' modeling_jamba has no JambaMambaMixer/mamba_selective_scan")
    try:
        source = inspect.getsource(mixer.forward)
    except (OSError, TypeError):
        return  # no source shipped: rely on the version check
    for needed in ("mamba_selective_scan(", "get_recurrent_state(", "update_recurrent_state("):
        if needed not in source:
            raise RuntimeError(f"install_fast_scan: JambaMambaMixer.forward no longer calls {needed[:-1]}")


def install_fast_scan(force: bool = False) -> bool:
    """Route transformers' Jamba Mamba layers through :func:`selective_scan`.

    Replaces ``modeling_jamba.mamba_selective_scan`` (the module-level function the mixer calls) and
    wraps ``JambaMambaMixer.forward`` so that a multi-token chunk after a cached one starts from the
    cached SSM state. Returns True if it installed now, False if it was already installed.
    transformers' own paths stay in charge of everything else (conv state, single-token decode).
    """
    from transformers.models.jamba import modeling_jamba

    if _ORIGINALS:
        return False
    _check_jamba_compatible(modeling_jamba, force)
    _ORIGINALS["mamba_selective_scan"] = modeling_jamba.mamba_selective_scan
    _ORIGINALS["forward"] = modeling_jamba.JambaMambaMixer.forward
    modeling_jamba.mamba_selective_scan = _jamba_scan
    modeling_jamba.JambaMambaMixer.forward = _mixer_forward_with_initial_state(_ORIGINALS["forward"])
    return True


def uninstall_fast_scan() -> bool:
    """Undo :func:`install_fast_scan`; returns False if it was not installed."""
    from transformers.models.jamba import modeling_jamba

    if not _ORIGINALS:
        return False
    modeling_jamba.mamba_selective_scan = _ORIGINALS.pop("mamba_selective_scan")
    modeling_jamba.JambaMambaMixer.forward = _ORIGINALS.pop("forward")
    return True


def fast_scan_installed() -> bool:
    return bool(_ORIGINALS)


def original_jamba_scan():
    """transformers' own ``mamba_selective_scan`` (the slow path), whether or not the hook is installed."""
    from transformers.models.jamba import modeling_jamba

    return _ORIGINALS.get("mamba_selective_scan", modeling_jamba.mamba_selective_scan)
