"""C++ CPU backend: thin calls into the ``dynalay_C`` ops of dynalay._C (csrc/cpu)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _ext


def _ops():
    err = _ext.cpp_error()
    if err:
        raise RuntimeError(f"dynalay: the cpp backend is unavailable: {err}")
    return torch.ops.dynalay_C


def fp_solve(c: Tensor, W: Tensor, d: Optional[Tensor], actions: Optional[Tensor], z0: Optional[Tensor],
             adjoint: bool, tol: float, max_iter: int, solver: str, damping: float, m: int, lam: float, eps: float):
    return _ops().fp_solve(c, W, d, actions, z0, adjoint, tol, max_iter, solver, damping, m, lam, eps)


def grouped_linear(x: Tensor, U: Tensor, b: Optional[Tensor], actions: Tensor, transpose: bool) -> Tensor:
    return _ops().grouped_linear(x, U, b, actions, transpose)


def grouped_wgrad(u: Tensor, x: Tensor, actions: Optional[Tensor], num_layers: int) -> Tensor:
    return _ops().grouped_wgrad(u, x, actions, num_layers)
