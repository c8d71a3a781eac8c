"""CUDA C++ backend: thin calls into the ``dynalay_C`` ops for CUDA tensors.

The op schemas come from ``dynalay._C`` (csrc/dynalay_ops.cpp); their CUDA kernels from
``dynalay._C_cuda`` (csrc/cuda/ops_cuda.cpp + kernels/*.cu), whose import registers them (and
imports ``dynalay._C`` first).  The kernels take float32/float16/bfloat16 storage and compute in
float32; the solve is Picard only (``solver="anderson"`` is refused: the selector in
``dynalay.backends`` never sends it here).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from . import cpp as _cpp  # noqa: F401  (its import registers the fake kernels of the dynalay_C ops)

MAX_H = 1024  # the CUDA solve keeps the tile's iterate in shared memory (kernels/fixed_point.cu)


def _ops():
    err = _ext.cpp_error()  # dynalay._C defines the op schemas
    if err:
        raise RuntimeError(f"dynalay: the cuda backend is unavailable (it needs dynalay._C for the op schemas): {err}")
    err = _ext.cuda_error()
    if err:
        raise RuntimeError(f"dynalay: the cuda backend is unavailable: {err}")
    return torch.ops.dynalay_C


def _check_cuda(name: str, t: Optional[Tensor]) -> None:
    if t is not None and t.device.type != "cuda":
        raise RuntimeError(f"dynalay: the cuda backend takes CUDA tensors ({name} is on {t.device})")


def _check_picard(solver: str) -> None:
    if solver != "picard":
        raise RuntimeError(f"dynalay: the cuda backend implements solver='picard' only (got {solver!r}); "
                           "use backend='torch' or 'cpp' for Anderson")


def fp_solve(c: Tensor, W: Tensor, d: Optional[Tensor], actions: Optional[Tensor], z0: Optional[Tensor],
             adjoint: bool, tol: float, max_iter: int, solver: str, damping: float, m: int, lam: float, eps: float):
    _check_picard(solver)
    _check_cuda("c", c)
    if c.shape[1] > MAX_H:
        raise RuntimeError(f"dynalay: the cuda backend solves H <= {MAX_H} (got H={c.shape[1]}); "
                           "use backend='triton' (tiled path) or 'torch'")
    return _ops().fp_solve(c, W, d, actions, z0, adjoint, tol, max_iter, solver, damping, m, lam, eps)


def grouped_linear(x: Tensor, U: Tensor, b: Optional[Tensor], actions: Tensor, transpose: bool) -> Tensor:
    _check_cuda("x", x)
    return _ops().grouped_linear(x, U, b, actions, transpose)


def grouped_wgrad(u: Tensor, x: Tensor, actions: Optional[Tensor], num_layers: int) -> Tensor:
    _check_cuda("u", u)
    return _ops().grouped_wgrad(u, x, actions, num_layers)


def dynamic_step(h: Tensor, actions: Tensor, U: Tensor, W: Tensor, b: Tensor, tol: float, max_iter: int, solver: str,
                 damping: float, m: int, lam: float, eps: float):
    """Fused DynaLay step: one routing for the projection (inj = h U[a]^T + b[a]) and the solve
    over the tiles of all layers; NOP rows keep h.  Returns (h_new, iters, converged, residual)."""
    _check_picard(solver)
    _check_cuda("h", h)
    z, it, res, conv = _ops().dynamic_step(h, actions, U, W, b, tol, max_iter, solver, damping, m, lam, eps)
    return z, it, conv, res


def implicit_backward(z: Tensor, g: Tensor, W: Tensor, actions: Optional[Tensor], h: Optional[Tensor],
                      U: Optional[Tensor], want_x: bool, want_W: bool, want_U: bool, want_b: bool, tol: float,
                      max_iter: int, solver: str, damping: float, m: int, lam: float, eps: float):
    """The implicit backward in one call (csrc/cuda/ops_cuda.cpp): the adjoint solve (d = 1 - z*^2
    formed in the kernel) and every per-group reduction on one routing.  Returns (dx, dW, dU, db,
    iters, res, conv) in float32; outputs not asked for are None."""
    _check_picard(solver)
    _check_cuda("z", z)
    out = _ops().implicit_backward(z, g, W, actions, h, U, want_x, want_W, want_U, want_b, tol, max_iter, solver,
                                   damping, m, lam, eps)
    wants = (want_x, want_W, want_U, want_b)
    return tuple(t if w else None for t, w in zip(out[:4], wants)) + tuple(out[4:])


# DYNALAY_CUDA_FUSED=0 (read at import) drops the two fused entry points: dynamic_step then runs as
# grouped_linear + fp_solve and the implicit backward as fp_solve (adjoint) + grouped_wgrad, each
# op routing on its own.  Same results; for A/B timing and as a fallback.
FUSED = os.environ.get("DYNALAY_CUDA_FUSED", "1") != "0"
if not FUSED:
    del dynamic_step, implicit_backward
