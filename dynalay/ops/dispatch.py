"""Batched dynamic layer dispatch: group a batch by each row's action and advance every row
through the fixed-point layer it chose (or nothing, for NOP) in one op.

Ops (namespace ``dynalay``):

``route``         grouping metadata with static shapes (no host sync).
``dynamic_step``  h_new_i = z_i  with  z_i = tanh(W[a_i] z_i + U[a_i] h_i + b[a_i])  for a_i < L,
                  h_new_i = h_i  for a_i == L (NOP: no compute).  Implicit (or phantom) gradients
                  for h, U, W, b; per-layer weight gradients without atomics.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import backends
from ._common import (CHECKS, autocast_inputs, cast, check_choice, check_finite, check_func_transforms, check_int,
                      checks_off, check_tensor, compute_dtype, eager_function, no_autocast, report, run_solve,
                      shared_routing, tracing)
from .fixed_point import (REST_CHECK, REST_MAX_ITER, _grouped_linear, _grouped_wgrad, fold_for_vmap,
                          fused_implicit_grads, has_fused_backward, implicit_grads, phantom_grads, prepare_solve_args)


class Routing(NamedTuple):
    counts: Tensor          # (L+1,) int64 rows per layer, NOP last
    offsets: Tensor         # (L+2,) int64 start of each group in `perm` (offsets[l+1] = end)
    perm: Tensor            # (B,) int64 stable order of the rows by action, NOP rows last
    tile_layer: Tensor      # (T,) int32 layer of each tile, -1 for spare tiles; T = cdiv(B, block_m) + L
    tile_row_start: Tensor  # (T,) int32 first position (in `perm`) of each tile
    num_tiles: Tensor       # (1,) int32 tiles in use (a device scalar: spare programs exit)


class DynamicStepResult(NamedTuple):
    h: Tensor          # (B, H) new state: the fixed point for rows with a layer, h for NOP rows
    iters: Tensor      # (B,) int32 f-evaluations spent on the row (0 for NOP)
    converged: Tensor  # (B,) bool (True for NOP)


def num_tiles_bound(B: int, num_layers: int, block_m: int) -> int:
    return (B + block_m - 1) // block_m + num_layers


def route_impl(actions: Tensor, num_layers: int, block_m: int) -> Tuple[Tensor, ...]:
    """Torch implementation (any device, no host sync: group boundaries come from a binary search
    in the stably sorted actions; ``torch.bincount`` would read the maximum back to the host)."""
    L, B = num_layers, actions.shape[0]
    dev = actions.device
    sa, perm = torch.sort(actions, stable=True)
    offsets = torch.searchsorted(sa, torch.arange(L + 2, device=dev, dtype=sa.dtype))  # rows with a < l
    counts = offsets[1:] - offsets[:-1]
    T = num_tiles_bound(B, L, block_m)
    tiles_per = (counts[:L] + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles_per, 0)
    t = torch.arange(T, device=dev)
    layer = torch.searchsorted(tile_end, t, right=True)
    valid = layer < L
    lc = layer.clamp(max=L - 1)
    row_start = offsets[lc] + (t - (tile_end - tiles_per)[lc]) * block_m
    tile_layer = torch.where(valid, layer, torch.full_like(layer, -1)).to(torch.int32)
    tile_row_start = torch.where(valid, row_start, torch.zeros_like(row_start)).to(torch.int32)
    return counts, offsets, perm, tile_layer, tile_row_start, tile_end[L - 1:].to(torch.int32)


@torch.library.custom_op("dynalay::route", mutates_args=())
def route_op(actions: Tensor, num_layers: int, block_m: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return route_impl(actions, num_layers, block_m)


@route_op.register_fake
def _(actions, num_layers, block_m):
    B = actions.shape[0]
    T = (B + block_m - 1) // block_m + num_layers
    i64, i32 = torch.int64, torch.int32
    return (actions.new_empty(num_layers + 1, dtype=i64), actions.new_empty(num_layers + 2, dtype=i64),
            actions.new_empty(B, dtype=i64), actions.new_empty(T, dtype=i32), actions.new_empty(T, dtype=i32),
            actions.new_empty(1, dtype=i32))


def _check_actions(actions, B: int, L: int, device, check: str) -> None:
    if not isinstance(actions, Tensor):
        raise TypeError(f"actions must be a torch.Tensor (got {type(actions).__name__})")
    if actions.dtype != torch.int64:
        raise TypeError(f"actions must be int64 (got {actions.dtype})")
    if actions.dim() != 1 or actions.shape[0] != B:
        raise ValueError(f"actions must have shape ({B},) (got {tuple(actions.shape)})")
    if actions.device != device:
        raise ValueError(f"actions is on {actions.device} but the other inputs are on {device}")
    if actions.numel() and not checks_off(check, actions):
        lo, hi = torch.stack(torch.aminmax(actions)).tolist()  # one pass, one host read
        if lo < 0 or hi > L:
            raise ValueError(f"actions must lie in [0, {L}] (layer index, {L} = NOP); got values in [{lo}, {hi}]")


def _keeps_h(actions: Tensor, L: int) -> Tensor:
    """Rows whose state passes through a step unchanged: NOP (``L``), and any action outside
    ``[0, L)`` that ``check="none"`` let through."""
    return (actions >= L) | (actions < 0)


def route(actions: Tensor, num_layers: int, block_m: int = 32, *, check: str = "warn") -> Routing:
    """Grouping metadata for ``actions`` (``(B,)`` int64 in ``[0, num_layers]``, ``num_layers``
    meaning NOP): per-layer counts and offsets, a stable permutation (NOP rows last) and per-tile
    ``(layer, row_start)`` tables for ``block_m``-row tiles.  All sizes are static upper bounds."""
    check_choice("check", check, CHECKS)
    check_int("num_layers", num_layers, 1)
    check_int("block_m", block_m, 1)
    if not isinstance(actions, Tensor):
        raise TypeError(f"actions must be a torch.Tensor (got {type(actions).__name__})")
    if actions.dim() != 1:
        raise ValueError(f"actions must be one-dimensional, (B,) (got shape {tuple(actions.shape)})")
    _check_actions(actions, actions.shape[0], num_layers, actions.device, check)
    return Routing(*route_op(actions, num_layers, block_m))


# --------------------------------------------------------------------------------------------
# dynalay::dynamic_step
# --------------------------------------------------------------------------------------------
def _step_forward(backend: str, h: Tensor, actions: Tensor, U: Tensor, W: Tensor, b: Tensor, cfg: Tuple):
    be = backends.get(backend)
    if hasattr(be, "dynamic_step"):  # fused: projection + solve on the same tiles
        return be.dynamic_step(h, actions, U, W, b, *cfg)
    L = U.shape[0]
    # already below autograd: call the backend directly.  inj is an intermediate: float32 on every
    # backend (a 16-bit inj would be rounded before the solve)
    hc, Uc, bc = (cast(t, compute_dtype(h.dtype)) for t in (h, U, b))
    inj = be.grouped_linear(hc, Uc, bc, actions, False)
    z, it, res, conv = run_solve(backend, inj, W, None, actions, None, False, cfg)
    # rows outside [0, L) keep h: NOP rows, and out-of-range actions passed with check="none"
    # (as the GPU kernels treat them; their `converged` is False)
    h_new = torch.where(_keeps_h(actions, L).unsqueeze(1), h.to(z.dtype), z).contiguous()
    return h_new, it, conv, res


@no_autocast
def _dynamic_step_impl(h: Tensor, actions: Tensor, U: Tensor, W: Tensor, b: Tensor, tol: float, max_iter: int,
                       solver: str, damping: float, anderson_m: int, anderson_lam: float, eps: float, backward: str,
                       b_tol: float, b_max_iter: int, b_solver: str, b_damping: float, b_anderson_m: int,
                       b_anderson_lam: float, b_eps: float, phantom_steps: int, phantom_damping: float, check: str,
                       backend: str, b_backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    cfg = (tol, max_iter, solver, damping, anderson_m, anderson_lam, eps)
    h_new, it, conv, res = _step_forward(backend, h, actions, U, W, b, cfg)
    return cast(h_new, h.dtype), it, conv, cast(res, compute_dtype(h.dtype))


dynamic_step_op = torch.library.custom_op("dynalay::dynamic_step", mutates_args=())(_dynamic_step_impl)


@dynamic_step_op.register_fake
def _(h, actions, U, W, b, *args):
    torch._check(h.dim() == 2)
    B, H = h.shape
    return (h.new_empty(B, H), h.new_empty(B, dtype=torch.int32), h.new_empty(B, dtype=torch.bool),
            h.new_empty(B, dtype=compute_dtype(h.dtype)))


def _step_setup(ctx, inputs, output):
    (h, actions, U, W, b, tol, max_iter, solver, damping, m, lam, eps, backward, b_tol, b_max_iter, b_solver,
     b_damping, b_m, b_lam, b_eps, phantom_steps, phantom_damping, check, backend, b_backend) = inputs
    ctx.mark_non_differentiable(output[1], output[2], output[3])
    ctx.save_for_backward(h, output[0], actions, U, W, b)
    ctx.backward, ctx.check, ctx.backend = backward, check, b_backend
    ctx.bcfg = (b_tol, b_max_iter, b_solver, b_damping, b_m, b_lam, b_eps)
    ctx.phantom = (phantom_steps, phantom_damping)
    ctx.dtypes = (h.dtype, U.dtype, W.dtype, b.dtype)


@no_autocast
@shared_routing
def _step_backward(ctx, g, g_it, g_conv, g_res):
    nones = (None,) * 20
    if g is None:
        return (None,) * 25
    h, h_new, actions, U, W, b = ctx.saved_tensors
    L, H = U.shape[0], h.shape[1]
    cd = compute_dtype(h.dtype)
    need_h, need_U, need_W, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3], \
        ctx.needs_input_grad[4]
    if ctx.backward == "implicit" and has_fused_backward(ctx.backend, ctx.bcfg[2]):  # one C++ call
        dh, dW, dU, db = fused_implicit_grads(h_new, g, W, actions, h, U, (need_h, need_W, need_U, need_b),
                                              ctx.bcfg, ctx.check, ctx.backend)
        dt = ctx.dtypes  # (h, U, W, b)
        return (cast(dh, dt[0]), None, cast(dU, dt[1]), cast(dW, dt[2]), cast(db, dt[3])) + nones
    nop = _keeps_h(actions, L).unsqueeze(1)
    gc = cast(g, cd)
    gz = torch.where(nop, torch.zeros_like(gc), gc)
    if ctx.backward == "phantom":
        # U h + b in the compute dtype, as the forward built it (a 16-bit inj would be rounded)
        inj = _grouped_linear(cast(h, cd), cast(U, cd), cast(b, cd), actions, False, ctx.backend)
        u, dW = phantom_grads(h_new, inj, gz, W, actions, ctx.phantom[0], ctx.phantom[1], ctx.backend, need_W)
    else:
        u, dW = implicit_grads(h_new, gz, W, actions, ctx.bcfg, ctx.check, ctx.backend, need_W)
    dh = dU = db = None
    if need_h:
        dh = _grouped_linear(u, cast(U, cd), None, actions, True, ctx.backend)
        dh = cast(torch.where(nop, gc, dh), ctx.dtypes[0])
    if need_U or need_b:  # one grouped reduction for both: x = [h, 1]
        x = torch.cat([cast(h, cd), h.new_ones(h.shape[0], 1, dtype=cd)], 1)
        dUb = _grouped_wgrad(u, x, actions, L, ctx.backend)
        dU = cast(dUb[..., :H], ctx.dtypes[1]) if need_U else None
        db = cast(dUb[..., H], ctx.dtypes[3]) if need_b else None
    dW = cast(dW, ctx.dtypes[2]) if need_W else None
    return (dh, None, dU, dW, db) + nones


dynamic_step_op.register_autograd(_step_backward, setup_context=_step_setup)


def _step_vmap(info, in_dims, h, actions, U, W, b, *rest):
    """torch.func.vmap rule (``fold_for_vmap``): one step over the N*B folded rows; mapped layers
    (any of U, W, b) become a stack of N*L layers indexed by the shifted actions."""
    N = info.batch_size
    # the values exist here: the data checks and the report the public call had to skip
    check = rest[REST_CHECK]
    L = (U if in_dims[2] is None else U.select(in_dims[2], 0)).shape[0]  # per slice, wherever the mapped dim is
    a_all = actions.reshape(-1)  # every slice's actions: the per-slice range [0, L]
    _check_actions(a_all, a_all.shape[0], L, a_all.device, check)
    check_finite(check, h=h, U=U, W=W, b=b)
    (h_f,), (U_f, W_f, b_f), a_f, B = fold_for_vmap(N, [(h, in_dims[0])], [(U, in_dims[2]), (W, in_dims[3]),
                                                                        (b, in_dims[4])], actions, in_dims[1])
    h_new, it, conv, res = dynamic_step_op(h_f, a_f, U_f, W_f, b_f, *rest)
    report("forward", conv, res, rest[REST_MAX_ITER], check)
    return (h_new.unflatten(0, (N, B)), it.view(N, B), conv.view(N, B), res.view(N, B)), (0, 0, 0, 0)


dynamic_step_op.register_vmap(_step_vmap)
_DynamicStepFn = eager_function(_dynamic_step_impl, _step_setup, _step_backward, "_DynamicStepFn", 5, _step_vmap)


def dynamic_step(h: Tensor, actions: Tensor, U: Tensor, W: Tensor, b: Tensor, *, tol: float = 1e-4,
                 max_iter: int = 50, solver: str = "picard", backward: str = "implicit", damping: float = 1.0,
                 anderson_m: int = 5, anderson_lam: float = 1e-6, eps: float = 1e-12,
                 backward_tol: Optional[float] = None, backward_max_iter: Optional[int] = None,
                 backward_solver: Optional[str] = None, phantom_steps: int = 5, phantom_damping: float = 0.5,
                 check: str = "warn", backend: Optional[str] = None) -> DynamicStepResult:
    """One DynaLay step for a whole batch.

    Row ``i`` with ``a_i < L`` becomes the fixed point ``z = tanh(W[a_i] z + U[a_i] h_i + b[a_i])``
    (solved from ``z = 0`` with the per-row freeze rule of ``dynalay.fixed_point``); a row with
    ``a_i == L`` (NOP) keeps ``h_i`` and costs nothing.  ``h``: ``(B, H)``, ``actions``: ``(B,)``
    int64, ``U``, ``W``: ``(L, H, H)``, ``b``: ``(L, H)``.  Solver, backward and check arguments:
    as in ``dynalay.fixed_point``.
    """
    check_func_transforms("dynamic_step")
    check_tensor("h", h, 2)
    h, U, W, b = autocast_inputs(h.device, h, U, W, b)
    B, H = h.shape
    if H == 0:
        raise ValueError("h must have at least one feature (got H=0)")
    check_tensor("U", U, 3, dtype=h.dtype, device=h.device)
    L = U.shape[0]
    if L < 1 or tuple(U.shape) != (L, H, H):
        raise ValueError(f"U must have shape (L, {H}, {H}) with L >= 1 (got {tuple(U.shape)})")
    check_tensor("W", W, 3, dtype=h.dtype, device=h.device)
    if tuple(W.shape) != (L, H, H):
        raise ValueError(f"W must have shape ({L}, {H}, {H}) like U (got {tuple(W.shape)})")
    check_tensor("b", b, 2, dtype=h.dtype, device=h.device)
    if tuple(b.shape) != (L, H):
        raise ValueError(f"b must have shape ({L}, {H}) (got {tuple(b.shape)})")
    solve_args = prepare_solve_args(tol, max_iter, solver, damping, anderson_m, anderson_lam, eps, backward,
                                    backward_tol, backward_max_iter, backward_solver, phantom_steps, phantom_damping,
                                    check)
    traced = tracing(h, actions, U, W, b)
    data_check = "none" if traced else check  # the data-dependent checks need values
    _check_actions(actions, B, L, h.device, data_check)
    check_finite(data_check, h=h, U=U, W=W, b=b)
    be = backends.select(h.device, h.dtype, (solver,), backend, "dynamic_step")
    b_solver = solve_args[10]
    b_be = be if b_solver == solver else backends.select(h.device, h.dtype, (b_solver,), backend, "dynamic_step")
    if B == 0:  # nothing to solve: the torch backend gives the empty result and zero weight
        be = b_be = "torch"  # gradients on any device (no kernel launch over an empty grid)
    op = dynamic_step_op if traced else _DynamicStepFn
    h_new, it, conv, res = op(h, actions, U, W, b, *solve_args, be, b_be)
    report("forward", conv, res, max_iter, data_check)
    return DynamicStepResult(h_new, it, conv)


# --------------------------------------------------------------------------------------------
# the grouped building blocks, checked (the backward formulas call the ops unchecked)
# --------------------------------------------------------------------------------------------
def _check_grouped_rows(x_name: str, x: Tensor, actions: Tensor, num_layers: int, check: str):
    check_tensor(x_name, x, 2)
    _check_actions(actions, x.shape[0], num_layers, x.device, "none" if tracing(x, actions) else check)


def grouped_linear(x: Tensor, U: Tensor, b: Optional[Tensor], actions: Tensor, transpose: bool = False,
                   backend: Optional[str] = None, *, check: str = "warn") -> Tensor:
    """Grouped GEMM by action: ``y_i = x_i U[a_i]^T + b[a_i]`` (``transpose=True``: ``x_i U[a_i]``),
    ``0`` for rows with ``a_i == L`` (NOP).  ``x``: ``(B, K)``; ``U``: ``(L, N, K)`` (transposed:
    ``(L, K, N)``); ``b``: ``(L, N)`` or None; ``actions``: ``(B,)`` int64 in ``[0, L]``.
    Differentiable in ``x``, ``U`` and ``b``; accumulates in float32 (float64 for float64).  Shapes,
    dtypes and devices are checked, and the actions' range unless ``check="none"``."""
    check_choice("check", check, CHECKS)
    if not isinstance(transpose, bool):
        raise TypeError(f"transpose must be a bool (got {type(transpose).__name__})")
    check_tensor("U", U, 3)
    _check_grouped_rows("x", x, actions, U.shape[0], check)
    check_tensor("U", U, 3, dtype=x.dtype, device=x.device)
    L, (n_out, k_in) = U.shape[0], ((U.shape[2], U.shape[1]) if transpose else (U.shape[1], U.shape[2]))
    if L < 1 or x.shape[1] != k_in:
        raise ValueError(f"U must have shape (L >= 1, {'K, N' if transpose else 'N, K'}) with K = x.shape[1] = "
                         f"{x.shape[1]} (got {tuple(U.shape)}, transpose={transpose})")
    if b is not None:
        check_tensor("b", b, 2, dtype=x.dtype, device=x.device)
        if tuple(b.shape) != (L, n_out):
            raise ValueError(f"b must have shape ({L}, {n_out}) (got {tuple(b.shape)})")
    be = backends.select(x.device, x.dtype, ("picard",), backend, "dynamic_step")
    return _grouped_linear(x, U, b, actions, transpose, be)


def grouped_wgrad(u: Tensor, x: Tensor, actions: Tensor, num_layers: int, backend: Optional[str] = None, *,
                  check: str = "warn") -> Tensor:
    """Per-layer weight-gradient reduction: ``out[l] = sum over rows i with a_i == l of u_i^T x_i``,
    ``(num_layers, N, K)`` for ``u (B, N)`` and ``x (B, K)``; NOP rows (``a_i == num_layers``) add
    nothing.  Deterministic (no atomics); float32 accumulation (float64 for float64).  Checked as
    ``grouped_linear``.  Not differentiable (it is a backward formula's reduction)."""
    check_choice("check", check, CHECKS)
    check_int("num_layers", num_layers, 1)
    _check_grouped_rows("u", u, actions, num_layers, check)
    check_tensor("x", x, 2, dtype=u.dtype, device=u.device)
    if x.shape[0] != u.shape[0]:
        raise ValueError(f"x must have {u.shape[0]} rows like u (got shape {tuple(x.shape)})")
    be = backends.select(u.device, u.dtype, ("picard",), backend, "dynamic_step")
    return _grouped_wgrad(u, x, actions, num_layers, be)


# --------------------------------------------------------------------------------------------
# dispatch for arbitrary modules
# --------------------------------------------------------------------------------------------
def dispatch(x: Tensor, actions: Tensor, modules: Sequence[nn.Module]) -> Tensor:
    """Group rows by action, run each group through its module (one call per non-empty group),
    scatter back; rows with ``actions == len(modules)`` (NOP) pass through unchanged.  Each
    module must map ``(n, *F)`` to ``(n, *F)``.  Differentiable (gather/scatter).  Reads the
    group sizes once (one host sync per call: arbitrary modules need concrete shapes)."""
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError("x must be a torch.Tensor with a batch dimension")
    L = len(modules)
    if L < 1:
        raise ValueError("modules must hold at least one module")
    _check_actions(actions, x.shape[0], L, x.device, "warn")
    r = route_op(actions, L, 1)
    counts = r[0].tolist()
    perm = r[2]
    parts: List[Tensor] = []
    start = 0
    for layer, n in enumerate(counts[:L]):
        if n:
            idx = perm[start:start + n]
            y = modules[layer](x.index_select(0, idx))
            if y.shape != (n,) + tuple(x.shape[1:]):
                raise ValueError(f"modules[{layer}] returned shape {tuple(y.shape)}; dispatch needs "
                                 f"{(n,) + tuple(x.shape[1:])} (NOP rows pass through unchanged)")
            parts.append(y.to(x.dtype))
        start += n
    if not parts:
        return x.clone()
    active = perm[: start]
    return x.index_copy(0, active, torch.cat(parts, 0))
