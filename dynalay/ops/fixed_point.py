"""The fixed-point solve as torch custom ops, with implicit (IFT) and phantom gradients.

Ops (namespace ``dynalay``):

``fixed_point_fwd``      z = tanh(z W[a]^T + inj) per row, per-row freeze; differentiable in
                         ``inj`` and ``W`` (``register_autograd``).  ``W`` is ``(L, H, H)``;
                         ``actions`` (optional, ``(B,)`` int64 in ``[0, L]``) picks each row's
                         layer, ``L`` meaning NOP.  Without ``actions`` ``L`` must be 1.
``fixed_point_adjoint``  u = d * (g + u W[a]) with d = 1 - z*^2: the IFT backward's linear
                         fixed point, same freeze rule.  dinj = u and dW[l] = sum u^T z*.
``grouped_wgrad``        out[l] = sum over rows of layer l of u_i^T x_i (no atomics).
``grouped_linear``       y_i = x_i U[a_i]^T + b[a_i] (or x_i U[a_i]); NOP rows give 0.

Memory kept for backward (implicit): z* only (plus ``inj`` for the phantom gradient).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from ._common import (BACKWARDS, CHECKS, SolverConfig, as_op_float, autocast_inputs, cast, check_choice,
                      check_finite, check_int, check_func_transforms, check_tensor, compute_dtype, eager_function,
                      is_real, no_autocast, no_values, report, run_solve, shared_routing, tracing, under_vmap)
from .krylov import gmres_adjoint

# The most recent backward solve's statistics, for inspection (not thread-safe; eager only;
# emptied by a phantom backward, which solves nothing).
last_backward_stats: dict = {}
# how a backward's non-convergence report names a non-finite incoming gradient
GRAD_NAME = "the incoming gradient (of the solve's output)"


class FixedPointResult(NamedTuple):
    z: Tensor          # (B, H), dtype of inj
    iters: Tensor      # (B,) int32: f-evaluations spent on the row
    residual: Tensor   # (B,) final relative residual ||f(z)-z|| / (||f(z)|| + eps) (fp32, fp64 for fp64 input)
    converged: Tensor  # (B,) bool


def _res_dtype(dtype: torch.dtype) -> torch.dtype:
    return compute_dtype(dtype)


# --------------------------------------------------------------------------------------------
# dynalay::fixed_point_adjoint
# --------------------------------------------------------------------------------------------
def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "dynalay: gradients of gradients through fixed_point / dynamic_step are not supported: the adjoint "
        "solve (fixed_point_adjoint) and the per-layer weight-gradient reduction (grouped_wgrad) of their "
        "backward have no derivative of their own. Where they are needed, differentiate an unrolled solve "
        "written with torch ops")


def _no_setup(ctx, inputs, output):
    pass


def _register(name: str, impl, num_tensor_args: int, vmap_rule, backward=_no_double_backward, setup=_no_setup):
    """Register ``impl`` as the custom op ``dynalay::<name>`` with its batching rule and return
    (op, call).  ``call`` runs the registered op (traceable) whenever anything may trace
    (``tracing``), and otherwise the implementation through ``eager_function`` (alone when
    autograd records nothing; the op's Python layer costs ~65 us a call).  These helper ops run
    inside backward formulas; with create_graph=True autograd records them and a second
    differentiation reaches ``backward`` (for the solver helpers: a clear error, not torch's "no
    autograd formula")."""
    op = torch.library.custom_op(f"dynalay::{name}", mutates_args=())(impl)
    op.register_vmap(vmap_rule)
    fn = eager_function(impl, setup, backward, f"_{name}_fn", num_tensor_args, vmap_rule)

    def call(*args):
        return (op if tracing(*args) else fn)(*args)

    call.__name__ = name
    return op, call


# torch.func.vmap: rows are independent, so the mapped dimension folds into the rows
# Positions of max_iter and check among the settings that follow the tensors of fixed_point_fwd and
# dynamic_step (the same order in both), and of check after fixed_point_adjoint's tensors.
REST_MAX_ITER, REST_CHECK, ADJOINT_REST_CHECK = 1, 17, 8


def _slices(t: Tensor, d: Optional[int], N: int) -> Tensor:
    return t.movedim(d, 0) if d is not None else t.expand(N, *t.shape)


def fold_for_vmap(N: int, rows, layers, actions: Optional[Tensor], a_dim: Optional[int],
                  per_slice_groups: Optional[int] = None):
    """The batching rule of every grouped op: N slices of B rows become one call on N*B rows.
    ``rows``/``layers``: lists of (tensor or None, in_dim), per slice (B, ...) and (L, ...).  When
    a layer tensor is mapped, or an output reduced per group must come out per slice (the weight
    gradients: ``per_slice_groups`` = L), the groups of the slices are kept apart: layers stacked
    (N*L), slice k's action a < L becomes k*L + a, NOP (a = L) becomes N*L and an action outside
    [0, L] (passed with check="none") -1, so both keep their meaning.  Returns (rows, layers,
    actions, B)."""
    rows_f, B = [], None
    for t, d in rows:
        if t is not None:
            t = _slices(t, d, N)
            B = t.shape[1]
            t = t.flatten(0, 1)
        rows_f.append(t)
    a_b = None if actions is None else _slices(actions, a_dim, N)
    if per_slice_groups is None and all(d is None for t, d in layers if t is not None):
        return rows_f, [t for t, _ in layers], None if a_b is None else a_b.flatten(), B
    layers_s = [None if t is None else _slices(t, d, N) for t, d in layers]  # (N, L, ...)
    L = per_slice_groups or next(t.shape[1] for t in layers_s if t is not None)
    layers_f = [None if t is None else t.flatten(0, 1) for t in layers_s]
    if a_b is None:  # one layer: each slice's rows take their slice's copy
        a_b = torch.zeros(N, B, dtype=torch.int64, device=rows_f[0].device)
    shift = (torch.arange(N, device=a_b.device) * L).unsqueeze(1)
    a_f = torch.where((a_b >= 0) & (a_b < L), a_b + shift,
                      torch.where(a_b == L, torch.full_like(a_b, N * L), torch.full_like(a_b, -1)))
    return rows_f, layers_f, a_f.flatten(), B


def _adjoint_vmap(info, in_dims, z, g, W, actions, *rest):
    N = info.batch_size
    (z_f, g_f), (W_f,), a_f, B = fold_for_vmap(N, [(z, in_dims[0]), (g, in_dims[1])], [(W, in_dims[2])], actions,
                                               in_dims[3])
    u, it, res, conv = _fixed_point_adjoint_op(z_f, g_f, W_f, a_f, *rest)
    check = rest[ADJOINT_REST_CHECK] if len(rest) > ADJOINT_REST_CHECK else "none"
    report("backward (adjoint)", conv, res, rest[REST_MAX_ITER], check, {GRAD_NAME: g_f})
    return (u.unflatten(0, (N, B)), it.view(N, B), res.view(N, B), conv.view(N, B)), (0, 0, 0, 0)


@no_autocast
def _fixed_point_adjoint_impl(z: Tensor, g: Tensor, W: Tensor, actions: Optional[Tensor], tol: float, max_iter: int,
                        solver: str, damping: float, anderson_m: int, anderson_lam: float, eps: float,
                        backend: str, check: str = "none") -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    # check: read only by the batching rule, which reports convergence where the values exist
    cd = compute_dtype(z.dtype)
    cfg = (tol, max_iter, solver, damping, anderson_m, anderson_lam, eps)
    if solver == "gmres":  # Krylov (dynalay/ops/krylov.py) over the backend's grouped products
        zc, Wc, be = cast(z, cd), cast(W, cd), backends.get(backend)

        def matvec(v: Tensor, acts: Optional[Tensor]) -> Tensor:
            return v @ Wc[0] if acts is None else be.grouped_linear(v, Wc, None, acts, True).to(cd)
        u, it, res, conv = gmres_adjoint(cast(g, cd), 1.0 - zc * zc, matvec, actions, W.shape[0], tol, max_iter, eps)
    elif backend == "triton":  # d = 1 - z*^2 inside the kernel
        u, it, res, conv = backends.get("triton").fp_solve(cast(g, cd), W, z, actions, None, True, *cfg, d_is_z=True)
    else:
        zc = cast(z, cd)
        u, it, res, conv = run_solve(backend, cast(g, cd), W, 1.0 - zc * zc, actions, None, True, cfg)
    return cast(u, cd), it, cast(res, cd), conv


_fixed_point_adjoint_op, fixed_point_adjoint = _register("fixed_point_adjoint", _fixed_point_adjoint_impl, 4,
                                                           _adjoint_vmap)


@_fixed_point_adjoint_op.register_fake
def _(z, g, W, actions, tol, max_iter, solver, damping, anderson_m, anderson_lam, eps, backend, check="none"):
    torch._check(z.dim() == 2 and g.shape == z.shape)
    cd = compute_dtype(z.dtype)
    B, H = z.shape
    return (z.new_empty(B, H, dtype=cd), z.new_empty(B, dtype=torch.int32), z.new_empty(B, dtype=cd),
            z.new_empty(B, dtype=torch.bool))


# The helper ops run only inside backward formulas.  With create_graph=True autograd records them;
# differentiating that graph again reaches this backward (instead of torch's "no autograd formula
# was registered" message).
_fixed_point_adjoint_op.register_autograd(_no_double_backward)


# --------------------------------------------------------------------------------------------
# dynalay::grouped_wgrad
# --------------------------------------------------------------------------------------------
@no_autocast
def _grouped_wgrad_impl(u: Tensor, x: Tensor, actions: Optional[Tensor], num_layers: int, backend: str) -> Tensor:
    cd = compute_dtype(u.dtype)
    out = backends.get(backend).grouped_wgrad(cast(u, cd), cast(x, cd), actions, num_layers)
    return cast(out, cd)


def _wgrad_vmap(info, in_dims, u, x, actions, num_layers, backend):
    N = info.batch_size  # the reduction per group comes out per slice: N*num_layers groups
    (u_f, x_f), _, a_f, _ = fold_for_vmap(N, [(u, in_dims[0]), (x, in_dims[1])], [], actions, in_dims[2],
                                          per_slice_groups=num_layers)
    out = _grouped_wgrad_op(u_f, x_f, a_f, N * num_layers, backend)
    return out.unflatten(0, (N, num_layers)), 0


_grouped_wgrad_op, _grouped_wgrad = _register("grouped_wgrad", _grouped_wgrad_impl, 3, _wgrad_vmap)


@_grouped_wgrad_op.register_fake
def _(u, x, actions, num_layers, backend):
    torch._check(u.dim() == 2 and x.dim() == 2)
    return u.new_empty(num_layers, u.shape[1], x.shape[1], dtype=compute_dtype(u.dtype))


_grouped_wgrad_op.register_autograd(_no_double_backward)


# --------------------------------------------------------------------------------------------
# dynalay::grouped_linear (differentiable)
# --------------------------------------------------------------------------------------------
@no_autocast
def _grouped_linear_impl(x: Tensor, U: Tensor, b: Optional[Tensor], actions: Tensor, transpose: bool,
                   backend: str) -> Tensor:
    be = backends.get(backend)
    if backend in ("torch", "cpp"):
        cd = compute_dtype(x.dtype)
        y = be.grouped_linear(x.to(cd), U.to(cd), None if b is None else b.to(cd), actions, transpose)
    else:
        y = be.grouped_linear(x, U, b, actions, transpose)
    return y.to(x.dtype)


def _gl_setup(ctx, inputs, output):
    x, U, b, actions, transpose, backend = inputs
    ctx.save_for_backward(x, U, actions)
    ctx.transpose, ctx.backend, ctx.has_b = transpose, backend, b is not None
    ctx.dtypes = (x.dtype, U.dtype, None if b is None else b.dtype)


@no_autocast
def _gl_backward(ctx, gy):
    x, U, actions = ctx.saved_tensors
    L = U.shape[0]
    dx = dU = db = None
    if ctx.needs_input_grad[0]:
        dx = _grouped_linear(gy, U, None, actions, not ctx.transpose, ctx.backend).to(ctx.dtypes[0])
    if ctx.needs_input_grad[1]:
        if ctx.transpose:   # y = x U[a]  (U: (L, K, N)) -> dU[l] = sum x^T gy
            dU = _grouped_wgrad(x, gy, actions, L, ctx.backend)
        else:               # y = x U[a]^T (U: (L, N, K)) -> dU[l] = sum gy^T x
            dU = _grouped_wgrad(gy, x, actions, L, ctx.backend)
        dU = dU.to(ctx.dtypes[1])
    if ctx.has_b and ctx.needs_input_grad[2]:
        ones = gy.new_ones(gy.shape[0], 1)
        db = _grouped_wgrad(gy, ones, actions, L, ctx.backend)[..., 0].to(ctx.dtypes[2])
    return dx, dU, db, None, None, None


def _gl_vmap(info, in_dims, x, U, b, actions, transpose, backend):
    N = info.batch_size
    (x_f,), (U_f, b_f), a_f, B = fold_for_vmap(N, [(x, in_dims[0])], [(U, in_dims[1]), (b, in_dims[2])], actions,
                                               in_dims[3])
    return _grouped_linear_op(x_f, U_f, b_f, a_f, transpose, backend).unflatten(0, (N, B)), 0


_grouped_linear_op, _grouped_linear = _register("grouped_linear", _grouped_linear_impl, 4, _gl_vmap, _gl_backward,
                                                 _gl_setup)
_grouped_linear_op.register_autograd(_gl_backward, setup_context=_gl_setup)


@_grouped_linear_op.register_fake
def _(x, U, b, actions, transpose, backend):
    torch._check(x.dim() == 2 and U.dim() == 3)
    N = U.shape[2] if transpose else U.shape[1]
    return x.new_empty(x.shape[0], N)


# --------------------------------------------------------------------------------------------
# Gradients of a solved fixed point (shared with dynamic_step)
# --------------------------------------------------------------------------------------------
def _apply_W(z: Tensor, W: Tensor, actions: Optional[Tensor], transpose: bool, backend: str) -> Tensor:
    """z W[a]^T (transpose=False) or z W[a] (transpose=True), rows of NOP give 0."""
    if actions is None:
        return z @ W[0] if transpose else z @ W[0].t()
    return _grouped_linear(z, W, None, actions, transpose, backend)


def implicit_grads(z: Tensor, gz: Tensor, W: Tensor, actions: Optional[Tensor], bcfg: Tuple, check: str,
                   backend: str, want_W: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """IFT: u = d*(g + u W), dinj = u, dW[l] = sum u^T z.  Returns (u, dW) in the compute dtype."""
    u, it, res, conv = fixed_point_adjoint(z, gz, W, actions, *bcfg, backend, check)
    if not no_values(it):
        last_backward_stats.update(iters=it, residual=res, converged=conv)
    report("backward (adjoint)", conv, res, bcfg[1], check, {GRAD_NAME: gz})
    dW = _grouped_wgrad(u, z, actions, W.shape[0], backend) if want_W else None
    return u, dW


def has_fused_backward(backend: str, solver: str = "picard") -> bool:
    """Whether ``backend`` runs the implicit backward in one call (cpp; cuda unless
    DYNALAY_CUDA_FUSED=0).  Only without ``create_graph``: with it the generic path runs, whose
    ops have no derivative and say so, where the fused call's outputs would silently be
    constants.  Not for ``solver="gmres"`` (the fused calls run Picard/Anderson) nor under vmap
    (the generic path's ops have batching rules)."""
    return (solver != "gmres" and not torch.is_grad_enabled() and not under_vmap()
            and hasattr(backends.get(backend), "implicit_backward"))


def fused_implicit_grads(z: Tensor, g: Tensor, W: Tensor, actions: Optional[Tensor], h: Optional[Tensor],
                         U: Optional[Tensor], wants: Tuple[bool, bool, bool, bool], bcfg: Tuple,
                         check: str, backend: str) -> Tuple[Optional[Tensor], ...]:
    """A backend's one-call implicit backward (``has_fused_backward``): (dx, dW, dU, db) in the
    compute dtype, with the adjoint solve's statistics recorded and reported like
    ``implicit_grads``.  dx is dinj (0 on NOP rows) for fixed_point; with ``h, U``
    (dynamic_step) it is dh (g on NOP rows)."""
    dx, dW, dU, db, it, res, conv = backends.get(backend).implicit_backward(z, g, W, actions, h, U, *wants, *bcfg)
    if not no_values(it):
        last_backward_stats.update(iters=it, residual=res, converged=conv)
    report("backward (adjoint)", conv, res, bcfg[1], check, {GRAD_NAME: g})
    return dx, dW, dU, db


def phantom_grads(z: Tensor, inj: Tensor, gz: Tensor, W: Tensor, actions: Optional[Tensor], steps: int,
                  lam: float, backend: str, want_W: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """k-step phantom gradient: backprop through z_{j+1} = (1-lam) z_j + lam tanh(z_j W^T + inj)
    started at z* (a constant).  steps=1, lam=1 is the Jacobian-free backward (JFB)."""
    last_backward_stats.clear()  # no adjoint solve: no statistics (not the previous call's)
    cd = compute_dtype(z.dtype)
    zj, injc, Wc, a = z.to(cd), inj.to(cd), W.to(cd), gz.to(cd)
    active = None if actions is None else (actions < W.shape[0]).unsqueeze(1)
    zs, ts = [], []
    for _ in range(steps):
        t = torch.tanh(_apply_W(zj, Wc, actions, False, backend) + injc)
        zs.append(zj)
        ts.append(t)
        zn = (1.0 - lam) * zj + lam * t
        zj = zn if active is None else torch.where(active, zn, zj)
    dinj = torch.zeros_like(injc)
    dW = torch.zeros_like(Wc) if want_W else None
    for j in reversed(range(steps)):
        u = lam * a * (1.0 - ts[j] * ts[j])
        if active is not None:
            u = torch.where(active, u, torch.zeros_like(u))
        dinj = dinj + u
        if want_W:
            dW = dW + _grouped_wgrad(u, zs[j], actions, W.shape[0], backend)
        a = (1.0 - lam) * a + _apply_W(u, Wc, actions, True, backend)
    return dinj, dW


# --------------------------------------------------------------------------------------------
# dynalay::fixed_point_fwd (differentiable)
# --------------------------------------------------------------------------------------------
@no_autocast
def _fixed_point_fwd_impl(inj: Tensor, W: Tensor, actions: Optional[Tensor], z0: Optional[Tensor], tol: float,
                    max_iter: int, solver: str, damping: float, anderson_m: int, anderson_lam: float, eps: float,
                    backward: str, b_tol: float, b_max_iter: int, b_solver: str, b_damping: float,
                    b_anderson_m: int, b_anderson_lam: float, b_eps: float, phantom_steps: int,
                    phantom_damping: float, check: str, backend: str,
                    b_backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    cfg = (tol, max_iter, solver, damping, anderson_m, anderson_lam, eps)
    z, it, res, conv = run_solve(backend, inj, W, None, actions, z0, False, cfg)
    return cast(z, inj.dtype), it, cast(res, _res_dtype(inj.dtype)), conv


fixed_point_fwd = torch.library.custom_op("dynalay::fixed_point_fwd", mutates_args=())(_fixed_point_fwd_impl)


@fixed_point_fwd.register_fake
def _(inj, W, actions, z0, *args):
    torch._check(inj.dim() == 2)
    torch._check(W.dim() == 3)
    B, H = inj.shape
    return (inj.new_empty(B, H), inj.new_empty(B, dtype=torch.int32), inj.new_empty(B, dtype=_res_dtype(inj.dtype)),
            inj.new_empty(B, dtype=torch.bool))


def _fp_setup(ctx, inputs, output):
    (inj, W, actions, z0, tol, max_iter, solver, damping, m, lam, eps, backward, b_tol, b_max_iter, b_solver,
     b_damping, b_m, b_lam, b_eps, phantom_steps, phantom_damping, check, backend, b_backend) = inputs
    z = output[0]
    ctx.mark_non_differentiable(output[1], output[2], output[3])
    if backward == "phantom":
        ctx.save_for_backward(z, W, actions, inj)
    else:
        ctx.save_for_backward(z, W, actions)
    ctx.backward, ctx.check, ctx.backend = backward, check, b_backend
    ctx.bcfg = (b_tol, b_max_iter, b_solver, b_damping, b_m, b_lam, b_eps)
    ctx.phantom = (phantom_steps, phantom_damping)
    ctx.dtypes = (inj.dtype, W.dtype)


@no_autocast
@shared_routing
def _fp_backward(ctx, gz, g_it, g_res, g_conv):
    nones = (None,) * 22
    if gz is None:
        return (None, None) + nones
    want_inj, want_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if ctx.backward == "phantom":
        z, W, actions, inj = ctx.saved_tensors
        dinj, dW = phantom_grads(z, inj, gz, W, actions, ctx.phantom[0], ctx.phantom[1], ctx.backend, want_W)
    elif has_fused_backward(ctx.backend, ctx.bcfg[2]):  # adjoint solve + weight reduction, one C++ call
        z, W, actions = ctx.saved_tensors
        dinj, dW, _, _ = fused_implicit_grads(z, gz, W, actions, None, None, (want_inj, want_W, False, False),
                                              ctx.bcfg, ctx.check, ctx.backend)
    else:
        z, W, actions = ctx.saved_tensors
        dinj, dW = implicit_grads(z, gz, W, actions, ctx.bcfg, ctx.check, ctx.backend, want_W)
    dinj = cast(dinj, ctx.dtypes[0]) if want_inj else None
    dW = cast(dW, ctx.dtypes[1]) if want_W else None
    return (dinj, dW) + nones


fixed_point_fwd.register_autograd(_fp_backward, setup_context=_fp_setup)


def _fp_vmap(info, in_dims, inj, W, actions, z0, *rest):
    """torch.func.vmap rule (``fold_for_vmap``): one solve over the folded rows; a mapped W
    becomes a stack of layers that each slice's rows select through ``actions``."""
    N = info.batch_size
    # the values exist here: the data checks and the report the public call had to skip
    check_finite(rest[REST_CHECK], inj=inj, W=W, z0=z0)
    (inj_f, z0_f), (W_f,), a_f, B = fold_for_vmap(N, [(inj, in_dims[0]), (z0, in_dims[3])], [(W, in_dims[1])],
                                                  actions, in_dims[2])
    z, it, res, conv = fixed_point_fwd(inj_f, W_f, a_f, z0_f, *rest)
    report("forward", conv, res, rest[REST_MAX_ITER], rest[REST_CHECK])
    return (z.unflatten(0, (N, B)), it.view(N, B), res.view(N, B), conv.view(N, B)), (0, 0, 0, 0)


fixed_point_fwd.register_vmap(_fp_vmap)
_FixedPointFn = eager_function(_fixed_point_fwd_impl, _fp_setup, _fp_backward, "_FixedPointFn", 4, _fp_vmap)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def resolve_backward_config(cfg: SolverConfig, backward_tol, backward_max_iter, backward_solver) -> SolverConfig:
    return SolverConfig(
        tol=cfg.tol if backward_tol is None else backward_tol,
        max_iter=cfg.max_iter if backward_max_iter is None else backward_max_iter,
        solver="picard" if backward_solver is None else backward_solver,
        damping=cfg.damping, anderson_m=cfg.anderson_m, anderson_lam=cfg.anderson_lam, eps=cfg.eps,
    ).validate("backward_")


def check_backward_args(backward, phantom_steps, phantom_damping, check):
    check_choice("backward", backward, BACKWARDS)
    check_choice("check", check, CHECKS)
    check_int("phantom_steps", phantom_steps, 1)
    if not is_real(phantom_damping) or not (0.0 < phantom_damping <= 1.0):
        raise ValueError(f"phantom_damping must be in (0, 1] (got {phantom_damping!r})")


@functools.lru_cache(maxsize=64, typed=True)
def _prepare(tol, max_iter, solver, damping, anderson_m, anderson_lam, eps, backward, backward_tol, backward_max_iter,
             backward_solver, phantom_steps, phantom_damping, check) -> tuple:
    cfg = SolverConfig(tol, max_iter, solver, damping, anderson_m, anderson_lam, eps).validate()
    check_backward_args(backward, phantom_steps, phantom_damping, check)
    bcfg = resolve_backward_config(cfg, backward_tol, backward_max_iter, backward_solver)
    return cfg.op_args() + (backward,) + bcfg.op_args() + (int(phantom_steps), as_op_float(phantom_damping), check)


def prepare_solve_args(*key) -> tuple:
    """The validated solver arguments of the ops, in op order: the forward's 7 (tol, max_iter,
    solver, damping, anderson_m, anderson_lam, eps), backward, the backward solve's 7,
    phantom_steps, phantom_damping, check.  Memoised (a training loop calls the ops with the same
    settings every step; ``typed``: 1 and True are different keys); validation errors are raised,
    never cached; unhashable arguments are validated without the cache."""
    if torch.compiler.is_compiling():
        return _prepare.__wrapped__(*key)
    try:
        return _prepare(*key)
    except TypeError as e:
        if "unhashable" not in str(e):
            raise
        return _prepare.__wrapped__(*key)


def fixed_point(inj: Tensor, W: Tensor, *, tol: float = 1e-4, max_iter: int = 50, solver: str = "picard",
                backward: str = "implicit", z0: Optional[Tensor] = None, damping: float = 1.0,
                anderson_m: int = 5, anderson_lam: float = 1e-6, eps: float = 1e-12,
                backward_tol: Optional[float] = None, backward_max_iter: Optional[int] = None,
                backward_solver: Optional[str] = None, phantom_steps: int = 5, phantom_damping: float = 0.5,
                check: str = "warn", backend: Optional[str] = None) -> FixedPointResult:
    """Solve ``z = tanh(z @ W.T + inj)`` for every row of ``inj``.

    Args:
        inj: ``(B, H)`` injection (``U x + b``), float16/bfloat16/float32/float64.
        W: ``(H, H)`` weight, same dtype and device as ``inj``; keep ``||W||_2 < 1`` for convergence.
        tol: per-row stopping rule ``||f(z)-z||_2 / (||f(z)||_2 + eps) < tol``; a row that meets it
            is frozen and no longer computed.
        max_iter: at most this many f-evaluations per row.
        solver: ``"picard"`` (``z <- z + damping (f(z) - z)``) or ``"anderson"`` (safeguarded, with a
            ridge relative to the residual scale: ``anderson_m`` history, ``anderson_lam``).
        backward: ``"implicit"`` (IFT: solves ``u = d*(g + u W)`` per row with the same freeze rule;
            memory O(B*H) whatever the iteration count) or ``"phantom"`` (``phantom_steps`` damped
            steps from z*, ``phantom_damping``; 1 step with damping 1 is JFB).
        z0: initial iterate (default zeros); it receives no gradient.
        backward_tol / backward_max_iter / backward_solver: the adjoint solve's settings
            (default: the forward's tol and max_iter, Picard); ``backward_solver`` is
            ``"picard"``, ``"anderson"`` or ``"gmres"`` (restarted GMRES(20) over the backend's
            grouped products: every backend; see ``dynalay/ops/krylov.py``).
        check: ``"warn"`` (default): a ``ConvergenceWarning`` when rows did not converge (forward or
            backward) and a ``ValueError`` on NaN/Inf inputs; ``"raise"``: ``NotConvergedError``
            instead of the warning; ``"none"``: no data-dependent checks (no host read).
        backend: ``"auto"``/``None`` (``DYNALAY_BACKEND``), ``"torch"``, ``"cpp"``, ``"triton"``, ``"cuda"``.

    Returns:
        ``FixedPointResult(z, iters, residual, converged)``.
    """
    check_func_transforms("fixed_point")
    check_tensor("inj", inj, 2)
    inj, W, z0 = autocast_inputs(inj.device, inj, W, z0)
    check_tensor("W", W, 2, dtype=inj.dtype, device=inj.device)
    B, H = inj.shape
    if H == 0:
        raise ValueError("inj must have at least one feature (got H=0)")
    if tuple(W.shape) != (H, H):
        raise ValueError(f"W must have shape ({H}, {H}) to match inj {tuple(inj.shape)} (got {tuple(W.shape)})")
    if z0 is not None:
        check_tensor("z0", z0, 2, dtype=inj.dtype, device=inj.device)
        if z0.shape != inj.shape:
            raise ValueError(f"z0 must have the shape of inj {tuple(inj.shape)} (got {tuple(z0.shape)})")
    args = prepare_solve_args(tol, max_iter, solver, damping, anderson_m, anderson_lam, eps, backward, backward_tol,
                              backward_max_iter, backward_solver, phantom_steps, phantom_damping, check)
    traced = tracing(inj, W, z0)
    data_check = "none" if traced else check  # the data-dependent checks need values
    check_finite(data_check, inj=inj, W=W, z0=z0)
    op_key = backends.fixed_point_op(B, H, inj.dtype)
    be = backends.select(inj.device, inj.dtype, (solver,), backend, op_key)
    b_solver = args[10]
    b_be = be if b_solver == solver else backends.select(inj.device, inj.dtype, (b_solver,), backend, op_key)
    op = fixed_point_fwd if traced else _FixedPointFn
    z, it, res, conv = op(inj, W.unsqueeze(0), None, z0, *args, be, b_be)
    report("forward", conv, res, max_iter, data_check)
    return FixedPointResult(z, it, res, conv)
