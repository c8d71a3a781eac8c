"""Pure-PyTorch backend: the exact semantics of every dynalay op, and the test oracle.

Every compiled backend (``cpp``, ``triton``, ``cuda``) must reproduce what this file
computes.  The contract, per row ``i`` of a batch (rows are independent):

Forward map    f(z)  = tanh(z @ W[a_i].T + c_i)                 (``adjoint=False``)
Adjoint map    f(u)  = d_i * (c_i + u @ W[a_i])                  (``adjoint=True``)

    z = z0_i (or 0)
    for k = 1 .. max_iter:
        fz = f(z)
        r  = ||fz - z||_2 / (||fz||_2 + eps)        # relative residual of the row
        iters_i = k ; residual_i = r
        if r < tol:  z = z + damping * (fz - z)  ; converged_i = True ; FREEZE the row
        else:        z = solver_step(z, fz)            (Picard: z + damping*(fz - z))
    (damping == 1 means exactly z = fz, not z + (fz - z))

A frozen row is no longer computed: this file compacts the active rows every time
some freeze, so the work of an iteration is proportional to the rows still active.

Grouped form: ``W`` is ``(L, H, H)`` and ``actions`` (``(B,)`` int64 in ``[0, L]``)
names the layer of each row; rows with ``actions == L`` (NOP) are not solved at all:
their output is ``z0`` (or 0), ``iters`` 0, ``residual`` 0, ``converged`` True.

Anderson (type II, per row, history ``m``): the step mixes the last ``m`` pairs
``(x_j, g_j = f(x_j) - x_j)`` with weights ``alpha = y / sum(y)``, where
``(G + lam * trace(G)/n * I) y = 1`` and ``G`` is the Gram matrix of the valid
``g_j``.  The ridge is *relative* to the residual scale (torchdeq's absolute ridge
stalls once ||g||^2 < lam).  Safeguards: a row whose residual norm grew by more than
``ANDERSON_RESTART`` since the previous step restarts its history (plain step), and a
non-finite or degenerate mix falls back to the plain step; with ``lam = 0`` at most ``H``
pairs are mixed (more are linearly dependent).  The small solves run in float64.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

ANDERSON_RESTART = 2.0

Result = Tuple[Tensor, Tensor, Tensor, Tensor]


def _anderson_mix(X: Tensor, G: Tensor, count: Tensor, slot: int, lam: float, damping: float) -> Tuple[Tensor, Tensor]:
    """Mixed iterate for each row from its history; returns (z_next, ok)."""
    n, m, _ = X.shape
    age = (slot - torch.arange(m, device=X.device)) % m
    valid = age[None, :] < count[:, None]  # (n, m)
    vd = valid.to(torch.float64)
    Gd = G.to(torch.float64)
    gram = torch.bmm(Gd, Gd.transpose(1, 2)) * (vd[:, :, None] * vd[:, None, :])
    diag = torch.diagonal(gram, dim1=1, dim2=2)
    scale = diag.sum(1) / count.clamp(min=1).to(torch.float64)
    reg = lam * scale + 1e-300
    eye = torch.eye(m, dtype=torch.float64, device=X.device)
    A = gram + eye * torch.where(valid, reg[:, None], torch.ones_like(reg)[:, None])[:, None, :]
    # solve_ex: a singular system (lam = 0 with collinear residuals) marks the row, never raises
    y, info = torch.linalg.solve_ex(A, vd)
    s = y.sum(1)
    alpha = y / s[:, None]
    ok = torch.isfinite(alpha).all(1) & (s.abs() > 0) & (info == 0)
    alpha = torch.where(ok[:, None], alpha, torch.zeros_like(alpha)).to(X.dtype)
    if damping == 1.0:
        comb = X + G
    else:
        comb = X + damping * G
    z = torch.bmm(alpha[:, None, :], comb).squeeze(1)
    return z, ok


def _solve_rows(c: Tensor, M: Tensor, d: Optional[Tensor], z0: Optional[Tensor], adjoint: bool,
                tol: float, max_iter: int, solver: str, damping: float, m: int, lam: float,
                eps: float) -> Result:
    """Solve one group: the map uses ``z @ M`` (M = W.T forward, W adjoint)."""
    n, H = c.shape
    dev, dt = c.device, c.dtype
    out = torch.empty(n, H, dtype=dt, device=dev)  # contiguous whatever c's strides (the fake kernels' layout)
    iters = torch.zeros(n, dtype=torch.int32, device=dev)
    res = torch.zeros(n, dtype=dt, device=dev)
    conv = torch.zeros(n, dtype=torch.bool, device=dev)
    if n == 0:
        return out, iters, res, conv
    idx = torch.arange(n, device=dev)
    z = torch.zeros(n, H, dtype=dt, device=dev) if z0 is None else z0.clone(memory_format=torch.contiguous_format)
    ca, da = c, d
    anderson = solver == "anderson"
    if anderson:
        X = torch.zeros(n, m, H, dtype=dt, device=dev)
        G = torch.zeros(n, m, H, dtype=dt, device=dev)
        count = torch.zeros(n, dtype=torch.long, device=dev)
        prev_gn = torch.full((n,), float("inf"), dtype=dt, device=dev)
        # more than H residuals are linearly dependent: without a ridge the Gram matrix is singular
        # (the mix would follow rounding noise), with one the minimum-norm mix spreads over stale
        # iterates (slower than Picard): mix at most H pairs
        m_used = min(m, H)
    for k in range(1, max_iter + 1):
        fz = torch.addmm(ca, z, M)
        if adjoint:
            fz.mul_(da)
        else:
            fz.tanh_()
        g = fz - z
        gn = torch.linalg.vector_norm(g, dim=1)
        r = gn / (torch.linalg.vector_norm(fz, dim=1) + eps)
        done = r < tol
        iters[idx] = k
        res[idx] = r
        plain = fz if damping == 1.0 else z + damping * g
        if anderson:
            slot = (k - 1) % m
            count = torch.where(gn > ANDERSON_RESTART * prev_gn, torch.zeros_like(count), count)
            X[:, slot] = z
            G[:, slot] = g
            count = (count + 1).clamp(max=m_used)
            prev_gn = gn
            mixed, ok = _anderson_mix(X, G, count, slot, lam, damping)
            z_next = torch.where((ok & ~done)[:, None], mixed, plain)
        else:
            z_next = plain
        if bool(done.any()):
            di = idx[done]
            out[di] = z_next[done]
            conv[di] = True
            keep = ~done
            idx = idx[keep]
            z_next = z_next[keep]
            ca = ca[keep]
            if da is not None:
                da = da[keep]
            if anderson:
                X, G, count, prev_gn = X[keep], G[keep], count[keep], prev_gn[keep]
        z = z_next
        if idx.numel() == 0:
            break
    if idx.numel():
        out[idx] = z
    return out, iters, res, conv


def fp_solve(c: Tensor, W: Tensor, d: Optional[Tensor], actions: Optional[Tensor], z0: Optional[Tensor],
             adjoint: bool, tol: float, max_iter: int, solver: str, damping: float, m: int, lam: float,
             eps: float) -> Result:
    """Grouped fixed-point solve (see the module docstring).  All float inputs share ``c.dtype``."""
    B, H = c.shape
    L = W.shape[0]
    if actions is None:
        M = W[0] if adjoint else W[0].t()
        return _solve_rows(c, M, d, z0, adjoint, tol, max_iter, solver, damping, m, lam, eps)
    z = (torch.zeros(B, H, dtype=c.dtype, device=c.device) if z0 is None
         else z0.clone(memory_format=torch.contiguous_format))
    iters = torch.zeros(B, dtype=torch.int32, device=c.device)
    res = torch.zeros(B, dtype=c.dtype, device=c.device)
    conv = actions == L
    for layer in range(L):
        rows = (actions == layer).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        M = W[layer] if adjoint else W[layer].t()
        sel_d = None if d is None else d.index_select(0, rows)
        sel_z0 = None if z0 is None else z0.index_select(0, rows)
        zl, il, rl, cl = _solve_rows(c.index_select(0, rows), M, sel_d, sel_z0, adjoint, tol, max_iter,
                                     solver, damping, m, lam, eps)
        z.index_copy_(0, rows, zl)
        iters.index_copy_(0, rows, il)
        res.index_copy_(0, rows, rl)
        conv.index_copy_(0, rows, cl)
    return z, iters, res, conv


def grouped_linear(x: Tensor, U: Tensor, b: Optional[Tensor], actions: Tensor, transpose: bool) -> Tensor:
    """y_i = x_i @ U[a_i].T + b[a_i]  (``transpose``: y_i = x_i @ U[a_i]); NOP rows give 0."""
    L = U.shape[0]
    N = U.shape[2] if transpose else U.shape[1]
    y = x.new_zeros(x.shape[0], N)
    for layer in range(L):
        rows = (actions == layer).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        xr = x.index_select(0, rows)
        Ul = U[layer] if transpose else U[layer].t()
        yr = torch.addmm(b[layer], xr, Ul) if b is not None else xr @ Ul
        y.index_copy_(0, rows, yr)
    return y


def grouped_wgrad(u: Tensor, x: Tensor, actions: Optional[Tensor], num_layers: int) -> Tensor:
    """out[l] = sum over rows i with a_i == l of u_i^T x_i  -> (L, N, K).  No atomics."""
    if actions is None:
        return (u.t() @ x).unsqueeze(0)
    out = u.new_zeros(num_layers, u.shape[1], x.shape[1])
    for layer in range(num_layers):
        rows = (actions == layer).nonzero().squeeze(1)
        if rows.numel():
            out[layer] = u.index_select(0, rows).t() @ x.index_select(0, rows)
    return out


def grouped_bias_grad(u: Tensor, actions: Tensor, num_layers: int) -> Tensor:
    out = u.new_zeros(num_layers, u.shape[1])
    for layer in range(num_layers):
        rows = (actions == layer).nonzero().squeeze(1)
        if rows.numel():
            out[layer] = u.index_select(0, rows).sum(0)
    return out
