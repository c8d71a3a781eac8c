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


def dynamic_step(h: Tensor, actions: Tensor, U: Tensor, W: Tensor, b: Tensor, tol: float, max_iter: int, solver: str,
                 damping: float, m: int, lam: float, eps: float):
    """Fused DynaLay step (one grouping; projection into the packed constant term; every group's
    blocks on one work list; NOP rows copied from h).  Iterates in the compute dtype."""
    cd = torch.float64 if h.dtype == torch.float64 else torch.float32
    if h.dtype != cd:
        h, U, W, b = (t.to(cd) for t in (h, U, W, b))
    z, it, res, conv = _ops().dynamic_step(h, actions, U, W, b, tol, max_iter, solver, damping, m, lam, eps)
    return z, it, conv, res


def implicit_backward(z: Tensor, g: Tensor, W: Tensor, actions: Optional[Tensor], h: Optional[Tensor],
                      U: Optional[Tensor], want_x: bool, want_W: bool, want_U: bool, want_b: bool, tol: float,
                      max_iter: int, solver: str, damping: float, m: int, lam: float, eps: float):
    """The implicit backward in one call (adjoint solve plus every per-group reduction); see
    csrc/cpu/solver_cpu.cpp.  Returns (dx, dW, dU, db, iters, res, conv) in the compute dtype;
    outputs not asked for are None."""
    cd = torch.float64 if z.dtype == torch.float64 else torch.float32
    z, g, W, h, U = (t if t is None or t.dtype == cd else t.to(cd) for t in (z, g, W, h, U))
    out = _ops().implicit_backward(z, g, W, actions, h, U, want_x, want_W, want_U, want_b, tol, max_iter, solver,
                                   damping, m, lam, eps)
    wants = (want_x, want_W, want_U, want_b)
    return tuple(t if w else None for t, w in zip(out[:4], wants)) + tuple(out[4:])


def _register_fakes() -> None:
    """Shapes of the fused ops for tracing (torch.compile traces the autograd backward that calls
    implicit_backward, and a compiled forward may call dynamic_step)."""
    lib = torch.library

    @lib.register_fake("dynalay_C::dynamic_step")
    def _(h, actions, U, W, b, tol, max_iter, solver, damping, m, lam, eps):
        B, H = h.shape
        return (h.new_empty(B, H), h.new_empty(B, dtype=torch.int32), h.new_empty(B),
                h.new_empty(B, dtype=torch.bool))

    @lib.register_fake("dynalay_C::implicit_backward")
    def _(z, g, W, actions, h, U, want_x, want_W, want_U, want_b, tol, max_iter, solver, damping, m, lam, eps):
        B, H = z.shape
        L = W.shape[0]
        return (z.new_empty(B, H) if want_x else z.new_empty(0), z.new_empty(L, H, H) if want_W else z.new_empty(0),
                z.new_empty(L, H, H) if want_U else z.new_empty(0), z.new_empty(L, H) if want_b else z.new_empty(0),
                z.new_empty(B, dtype=torch.int32), z.new_empty(B), z.new_empty(B, dtype=torch.bool))

    @lib.register_fake("dynalay_C::agent_decide")
    def _(logits, proj, hist, prev_pred, agent, t, nop_bias, conf_mode=0):
        n = logits.shape[0]
        return logits.new_empty(n, dtype=torch.int64), logits.new_empty(n), logits.new_empty(n, dtype=torch.int64)

    @lib.register_fake("dynalay_C::run_model")
    def _(x, enc_w, enc_b, U, W, b, tol, max_iter, solver, damping, m, lam, eps, ln_w, ln_b, ln_eps, head_w, head_b,
          agent, nop_bias, lam_feature, forced, exit_threshold, max_steps, costs, conf_mode=0):
        B, C, T = x.shape[0], head_w.shape[0], max_steps
        i64 = torch.int64
        return (x.new_empty(B, C), x.new_empty(B, dtype=torch.float64), x.new_empty(B, dtype=i64),
                x.new_empty(B, dtype=i64), x.new_empty(B, T, dtype=i64), x.new_empty(B, T, dtype=torch.int32),
                x.new_empty(T, dtype=i64))


if not _ext.cpp_error():
    _register_fakes()


def run_model(x: Tensor, enc_w: Tensor, enc_b: Tensor, U: Tensor, W: Tensor, b: Tensor, solve_args: tuple,
              ln_w: Tensor, ln_b: Tensor, ln_eps: float, head_w: Tensor, head_b: Tensor, agent: list, nop_bias: float,
              lam_feature: float, forced: Optional[Tensor], exit_threshold: Optional[float], max_steps: int,
              costs: list, conf_mode: int = 0):
    """DynaLay.run's inference loop in one call (csrc/cpu/model_cpu.cpp), from the input ``x``:
    greedy agent (``agent`` = [inp_w, inp_b, step_emb, out_w, out_b, step_bias(, proj_w, proj_b)])
    or a ``forced`` action table (``agent`` empty); ``costs`` = CostModel's [encoder, layer_fixed,
    per_iter, head, agent]; ``conf_mode`` the agent's confidence feature (0: max probability, 1:
    log-odds, ``DynaLayConfig.conf_mode``).  Returns (logits, flops, layers, iters, actions, step_iters,
    rows_per_step)."""
    return _ops().run_model(x, enc_w, enc_b, U, W, b, *solve_args, ln_w, ln_b, ln_eps, head_w, head_b, agent,
                            nop_bias, lam_feature, forced, exit_threshold, max_steps, costs, conf_mode)


def grouped_linear(x: Tensor, U: Tensor, b: Optional[Tensor], actions: Tensor, transpose: bool) -> Tensor:
    return _ops().grouped_linear(x, U, b, actions, transpose)


def grouped_wgrad(u: Tensor, x: Tensor, actions: Optional[Tensor], num_layers: int) -> Tensor:
    return _ops().grouped_wgrad(u, x, actions, num_layers)
