"""GMRES for the implicit backward's linear adjoint (``backward_solver="gmres"``).

The adjoint fixed point ``u = d * (c + u W[a])`` (``d = 1 - z*^2`` per row) is linear: it is
``A u = b`` with ``A u = u - d * (u W[a])`` and ``b = d * c``.  Picard iteration converges at the
rate of the spectral radius of ``d W``, slowly when ``||W||`` is near 1; GMRES builds a Krylov
basis per row and converges in far fewer products with ``W`` on such problems (each row has its
own operator, through ``d``, so every row runs its own Arnoldi process, batched).

Semantics, per row (the contract of the other solvers, with GMRES steps):

* the stopping rule is the solvers' relative residual, ``||f(u) - u|| / (||f(u)|| + eps) < tol``
  with ``f(u) = d * (c + u W[a])``; ``f(u) - u`` is exactly GMRES's residual ``b - A u``;
* ``iters`` counts f-evaluations as for Picard from ``u = 0``: 1 for the residual at ``u = 0``
  (free: it is ``b``), then one per product with ``W`` (Arnoldi steps, and the residual that
  starts each restart cycle);
* a row that meets the rule is frozen at that iterate and no longer computed (the active rows
  are compacted); rows with ``actions == L`` (NOP) are not solved: 0, 0 iterations, converged;
* restarted every ``RESTART`` steps (GMRES(20)), with at most ``max_iter`` f-evaluations.

The Arnoldi process orthogonalises by classical Gram-Schmidt applied twice (CGS2: batched
products) in the compute dtype; the Hessenberg matrix, the
Givens rotations and the small triangular solves run in float64.  At every step the stopping rule
is evaluated in the basis' coordinates (GMRES's residual norm, and ``||f(u)||`` from the
coordinates of ``u0``); the rows that pass have their iterate and residual formed from the basis
and the rule checked again on those vectors, so a row stops on the same quantities as with Picard.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

RESTART = 20


def gmres_adjoint(c: Tensor, d: Tensor, matvec: Callable[[Tensor, Optional[Tensor]], Tensor],
                  actions: Optional[Tensor], num_layers: int, tol: float, max_iter: int,
                  eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Solve ``u = d * (c + matvec(u))`` per row (``matvec(v, acts) = v W[acts]``, rows of ``v``
    with the layers ``acts``).  ``c``, ``d``: ``(B, H)`` in the compute dtype.  Returns
    ``(u, iters int32, residual, converged)``."""
    B, H = c.shape
    dt, dev = c.dtype, c.device
    u_out = torch.zeros_like(c)
    iters = torch.zeros(B, dtype=torch.int32, device=dev)
    res_out = torch.zeros(B, dtype=dt, device=dev)
    conv = torch.zeros(B, dtype=torch.bool, device=dev)
    idx = torch.arange(B, device=dev)
    if actions is not None:
        solved = (actions >= 0) & (actions < num_layers)
        conv[~solved] = True  # NOP rows: not solved
        idx = idx[solved]
    if idx.numel() == 0:
        return u_out, iters, res_out, conv
    acts = None if actions is None else actions[idx]
    b = d[idx] * c[idx]
    dd = d[idx]
    u0 = torch.zeros_like(b)

    def A(v: Tensor) -> Tensor:
        return v - dd * matvec(v, acts)

    def store(g: Tensor, u: Tensor, k: int, res: Tensor, ok: Tensor) -> None:  # rows g of the batch
        u_out[g] = u
        iters[g] = k
        res_out[g] = res.to(dt)
        conv[g] = ok

    def finish(rows: Tensor, u: Tensor, k: int, res: Tensor, ok: Tensor) -> None:  # the active rows in mask `rows`
        store(idx[rows], u[rows], k, res[rows], ok[rows])

    def keep(mask: Tensor, *ts):
        return [None if t is None else t[mask] for t in ts]

    # k = 1: the residual at u = 0 is b (no product with W)
    k = 1
    r = b
    tiny = torch.finfo(dt).tiny
    while True:
        num = r.norm(dim=1)
        res = num / ((u0 + r).norm(dim=1) + eps)
        done = res < tol
        if k >= max_iter or bool(done.all()):
            finish(torch.ones_like(done), u0, k, res, done)
            return u_out, iters, res_out, conv
        if bool(done.any()):
            finish(done, u0, k, res, done)
            idx, acts, b, dd, u0, r, num = keep(~done, idx, acts, b, dd, u0, r, num)
        # one restart cycle of GMRES from u0 with residual r
        n = b.shape[0]
        m = min(RESTART, max_iter - k)
        V = torch.empty(n, m + 1, H, dtype=dt, device=dev)
        V[:, 0] = r / num.clamp_min(tiny)[:, None]
        Hh = torch.zeros(n, m + 1, m, dtype=torch.float64, device=dev)  # R of the Hessenberg's QR
        Q = torch.eye(m + 1, dtype=torch.float64, device=dev).repeat(n, 1, 1)  # the Givens rotations so far
        beta = num.double()
        # u0's coordinates on the basis and its squared norm: the stopping rule's denominator
        # ||f(u)|| = ||u + r|| = ||u0 + V q|| is then computed in the basis' coordinates
        p = torch.zeros(n, m + 1, dtype=torch.float64, device=dev)
        p[:, 0] = (u0 * V[:, 0]).sum(1).double()
        u0n = (u0 * u0).sum(1).double()
        live = torch.ones(n, dtype=torch.bool, device=dev)  # rows not yet frozen in this cycle
        j = 0
        while j < m:
            w = A(V[:, j])
            k += 1
            Vj = V[:, : j + 1]
            h = torch.bmm(Vj, w[:, :, None])  # classical Gram-Schmidt, twice (CGS2): batched products
            w = w - torch.bmm(h.transpose(1, 2), Vj)[:, 0]
            h2 = torch.bmm(Vj, w[:, :, None])
            w = w - torch.bmm(h2.transpose(1, 2), Vj)[:, 0]
            hn = w.norm(dim=1)
            col = torch.cat([(h + h2)[:, :, 0].double(), hn.double()[:, None]], 1)  # (n, j + 2)
            V[:, j + 1] = w / hn.clamp_min(tiny)[:, None]
            p[:, j + 1] = (u0 * V[:, j + 1]).sum(1).double()
            col = torch.bmm(Q[:, : j + 2, : j + 2], col[:, :, None])[:, :, 0]  # the previous rotations
            a_, b_ = col[:, j], col[:, j + 1]
            den = torch.hypot(a_, b_)
            safe = torch.where(den == 0, torch.ones_like(den), den)
            cj = torch.where(den == 0, torch.ones_like(den), a_ / safe)[:, None]
            sj = torch.where(den == 0, torch.zeros_like(den), b_ / safe)[:, None]
            qa, qb = Q[:, j, : j + 2], Q[:, j + 1, : j + 2]
            Q[:, j, : j + 2], Q[:, j + 1, : j + 2] = cj * qa + sj * qb, cj * qb - sj * qa
            col[:, j], col[:, j + 1] = den, 0.0
            Hh[:, : j + 2, j] = col
            # this step's iterate u = u0 + V y and residual r = V t, in coordinates:
            # Q (beta e1) = (g, s_{j+1}); y = R^-1 g; t = Q^T (0, ..., 0, s_{j+1})
            sj1 = beta * Q[:, j + 1, 0]
            R = Hh[:, : j + 1, : j + 1]
            diag = torch.diagonal(R, dim1=1, dim2=2)
            R = R + torch.diag_embed((diag == 0).double())
            y = torch.linalg.solve_triangular(R, (beta[:, None] * Q[:, : j + 1, 0])[:, :, None], upper=True)[..., 0]
            t = sj1[:, None] * Q[:, j + 1, : j + 2]
            q = t.clone()
            q[:, : j + 1] += y
            fn2 = (u0n + 2 * (p[:, : j + 2] * q).sum(1) + (q * q).sum(1)).clamp_min(0)
            est = sj1.abs() / (fn2.sqrt() + eps)
            j += 1
            last = k >= max_iter
            cand = live if last else live & (est < tol)
            if bool(cand.any()):  # form the candidates' iterates and residuals: the rule on the vectors
                rows = cand.nonzero()[:, 0]
                Vc = V[rows, : j + 1]
                u_c = u0[rows] + torch.bmm(y[rows].to(dt)[:, None, :], Vc[:, :j])[:, 0]
                r_c = torch.bmm(t[rows].to(dt)[:, None, :], Vc)[:, 0]
                res_c = r_c.norm(dim=1) / ((u_c + r_c).norm(dim=1) + eps)
                ok = res_c < tol
                fin = rows if last else rows[ok]
                sel = slice(None) if last else ok
                store(idx[fin], u_c[sel], k, res_c[sel], ok[sel])
                live[fin] = False
            if not bool(live.any()):
                return u_out, iters, res_out, conv
            if int(live.sum()) * 4 <= 3 * n:  # compact once a quarter of the rows froze
                idx, acts, b, dd, u0, V, Hh, Q, beta, p, u0n, live, y = keep(live, idx, acts, b, dd, u0, V, Hh, Q, beta,
                                                                              p, u0n, live, y)
                n = b.shape[0]
        # restart from this cycle's iterate: its true residual costs one product with W
        idx, acts, b, dd, u0, V, y = keep(live, idx, acts, b, dd, u0, V, y)
        u0 = u0 + torch.bmm(y.to(dt)[:, None, :], V[:, :m])[:, 0]
        r = b - A(u0)
        k += 1
