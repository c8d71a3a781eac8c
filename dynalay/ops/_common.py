"""Argument validation, solver configuration and convergence reporting shared by the ops.

Everything here runs before any kernel: bad input gets a ``TypeError``/``ValueError`` that
names the argument.  Data-dependent checks (non-finite values) need one host read of a flag
and are skipped while ``torch.compile`` traces (and when ``check="none"``).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _ext, backends

SOLVERS = ("picard", "anderson")
BACKWARD_ONLY_SOLVERS = ("gmres",)  # Krylov, for the linear adjoint of the implicit backward
BACKWARDS = ("implicit", "phantom")
CHECKS = ("warn", "raise", "none")
EPS_MIN = torch.finfo(torch.float32).tiny
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ConvergenceWarning(RuntimeWarning):
    """A fixed-point solve (forward or adjoint) left rows unconverged at ``max_iter``."""


class NotConvergedError(RuntimeError):
    """Raised instead of ``ConvergenceWarning`` when ``check="raise"``."""


@dataclass(frozen=True)
class SolverConfig:
    """One solve's settings (the forward and the backward each get one)."""

    tol: float = 1e-4
    max_iter: int = 50
    solver: str = "picard"
    damping: float = 1.0
    anderson_m: int = 5
    anderson_lam: float = 1e-6
    eps: float = 1e-12

    def validate(self, prefix: str = "") -> "SolverConfig":
        # Comparisons only (no math.isfinite, no float()): under torch.compile a float argument
        # may be a SymFloat (dynamic=True, or a value that changed between calls), and these
        # compare it without forcing a graph break.
        p = prefix
        if not is_real(self.tol) or not (EPS_MIN <= self.tol < math.inf):
            # as eps: a float32 solve would compare its residuals with a tol rounded to 0 (never
            # converged) where cpp, which compares in double, converges
            raise ValueError(f"{p}tol must be a finite float >= {EPS_MIN:.4g} (float32's smallest normal) "
                             f"(got {self.tol!r})")
        if not isinstance(self.max_iter, int) or isinstance(self.max_iter, bool) or not (1 <= self.max_iter < 2**31):
            # iters are int32
            raise ValueError(f"{p}max_iter must be an int in [1, 2**31 - 1] (got {self.max_iter!r})")
        allowed = SOLVERS + (BACKWARD_ONLY_SOLVERS if p == "backward_" else ())
        if self.solver not in allowed:
            hint = (" (gmres solves the backward's linear adjoint only: backward_solver='gmres')"
                    if self.solver in BACKWARD_ONLY_SOLVERS else "")
            raise ValueError(f"{p}solver must be one of {allowed} (got {self.solver!r}){hint}")
        if not is_real(self.damping) or not (0.0 < self.damping <= 1.0):
            raise ValueError(f"{p}damping must be in (0, 1] (got {self.damping!r})")
        m = self.anderson_m
        if not isinstance(m, int) or isinstance(m, bool) or not (1 <= m <= 32):
            raise ValueError(f"{p}anderson_m must be an int in [1, 32] (got {self.anderson_m!r})")
        if not is_real(self.anderson_lam) or not (0 <= self.anderson_lam < math.inf):
            raise ValueError(f"{p}anderson_lam must be a finite float >= 0 (got {self.anderson_lam!r})")
        if not is_real(self.eps) or not (EPS_MIN <= self.eps < math.inf):
            # below float32's smallest normal, eps would round to 0 (or a denormal) in a float32
            # solve and the backends would disagree on rows with f(z) = 0
            raise ValueError(f"{p}eps must be a finite float >= {EPS_MIN:.4g} (float32's smallest normal) "
                             f"(got {self.eps!r})")
        return self

    def op_args(self) -> Tuple:
        return (as_op_float(self.tol), int(self.max_iter), self.solver, as_op_float(self.damping), int(self.anderson_m),
                as_op_float(self.anderson_lam), as_op_float(self.eps))


def is_real(v) -> bool:
    """An int or float (a SymFloat/SymInt while compiling), not a bool."""
    return isinstance(v, (int, float, torch.SymFloat, torch.SymInt)) and not isinstance(v, bool)


def as_op_float(v):
    """``float(v)`` for a Python number; a SymFloat stays symbolic (the op takes it as is)."""
    return v if isinstance(v, torch.SymFloat) else float(v)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Iterate and accumulate in float32 unless the input is float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """``t.to(dtype)``, skipping the call (a dispatcher round trip, ~1.5 us) when ``t`` already
    has that dtype; None stays None."""
    return t if (t is None or t.dtype == dtype) else t.to(dtype)


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda") if torch.amp.is_autocast_available(d)))


def autocast_inputs(device: torch.device, *tensors):
    """Under ``torch.autocast`` for ``device``'s type, the floating inputs other than float64 go to
    the autocast dtype, as for a matmul (``torch.library.register_autocast`` does the same for a
    registered op; the eager path skips the op's dispatcher, so the cast is done here).  The
    solve still iterates in float32; the output has the autocast dtype.  Outside autocast the
    inputs are returned unchanged (no dtype promotion: mismatched dtypes stay an error)."""
    dt = device.type
    if not (_any_autocast() and torch.amp.is_autocast_available(dt) and torch.is_autocast_enabled(dt)):
        return tensors
    ac = torch.get_autocast_dtype(dt)
    return tuple(t.to(ac) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype not in (ac, torch.float64)
                 else t for t in tensors)


def no_autocast(fn):
    """Run ``fn`` (an op implementation or backward) with ``torch.autocast`` off.  Autocast passes
    through a custom op (and the eager path skips the dispatcher), so without this the torch ops
    inside a solve (the torch backend's matmuls, the phantom steps) would run in bfloat16/float16:
    the iteration must stay in float32.  Costs one C call (~0.1 us) when autocast is off."""

    @functools.wraps(fn)
    def wrapper(*args):
        if not _any_autocast():
            return fn(*args)
        with contextlib.ExitStack() as stack:
            for d in ("cpu", "cuda", "xpu", "mps"):
                if torch.amp.is_autocast_available(d) and torch.is_autocast_enabled(d):
                    stack.enter_context(torch.autocast(d, enabled=False))
            return fn(*args)

    return wrapper


def shared_routing(backward):
    """Run an op's ``backward(ctx, *grads)`` in ``backends.routing_scope(ctx.backend)``: its
    launches on the saved actions (adjoint solve, transposed projection, weight gradients, the
    steps of a phantom or GMRES backward) route once instead of once each."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with backends.routing_scope(ctx.backend):
            return backward(ctx, *grads)

    return wrapper


def check_tensor(name: str, t, ndim: int, *, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None, floating: bool = True) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (got {type(t).__name__})")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions (got shape {tuple(t.shape)})")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64 (got {t.dtype})")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but must match {dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    return t


def check_finite(check: str, **tensors: Optional[Tensor]) -> None:
    """Reject NaN/Inf inputs (one host read per tensor; skipped when ``checks_off``)."""
    present = [(n, t) for n, t in tensors.items() if t is not None and t.numel()]
    if not present or checks_off(check, *(t for _, t in present)):
        return
    if present[0][1].device.type == "cpu" and not _ext.cpp_error():
        # one C++ pass per tensor (vectorised, parallel, stops at the first bad chunk)
        k = torch.ops.dynalay_C.first_non_finite([t for _, t in present])
        if k >= 0:
            raise ValueError(f"{present[k][0]} contains NaN or Inf values")
        return
    # Elsewhere: one vectorised sum per tensor and one host read for all of them.  A NaN or an
    # Inf anywhere makes the sum non-finite, so a finite sum proves the tensor finite
    # (torch.isfinite(t).all() costs far more).  A non-finite sum can also be an overflow of
    # finite values: only then the exact check runs.
    sums = torch.stack([t.sum(dtype=compute_dtype(t.dtype)).to(torch.float64) for _, t in present])
    if bool(torch.isfinite(sums).all()):
        return
    for name, t in present:
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf values")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices} (got {value!r})")


def check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum} (got {value!r})")


_LIBRARY_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                      for m in (sys.modules[__name__.split(".")[0]], torch))


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the caller that names the first frame outside
    dynalay and torch: the user's line (a forward through an ``nn.Module``, or ``loss.backward()``
    for a backward solve), not a line of the library."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def report(where: str, converged: Tensor, residual: Tensor, max_iter: int, check: str,
           cause: Optional[dict] = None) -> None:
    """Warn (or raise) when rows did not converge.  One host read; skipped when ``checks_off``.
    ``cause``: tensors (by name) that the data checks could not see before the solve, such as
    the incoming gradient of a backward: when rows did not converge and one of them holds a NaN
    or an Inf, a ValueError names it instead of a convergence message about W."""
    if converged.numel() == 0 or checks_off(check, converged, residual) or bool(converged.all()):
        return
    if cause:
        check_finite(check, **cause)
    bad = int((~converged).sum())
    worst = float(residual.detach().float().max())
    msg = (f"dynalay: the {where} fixed-point solve did not converge for {bad}/{converged.numel()} rows "
           f"within max_iter={max_iter} (largest relative residual {worst:.3g}); the result of those rows "
           f"is the last iterate. Is W contractive (||W||_2 < 1)? Raise max_iter, damp, or use solver='anderson'.")
    if check == "raise":
        raise NotConvergedError(msg)
    warnings.warn(msg, ConvergenceWarning, stacklevel=user_stacklevel())


def run_solve(backend: str, c: Tensor, W: Tensor, d: Optional[Tensor], actions: Optional[Tensor],
              z0: Optional[Tensor], adjoint: bool, cfg: Tuple) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Call one backend's grouped solve.  torch/cpp compute in the compute dtype (inputs are cast
    here); triton/cuda take the native dtype and cast inside their kernels."""
    be = backends.get(backend)
    if backend in ("torch", "cpp"):
        cd = compute_dtype(c.dtype)
        c, W, d, z0 = cast(c, cd), cast(W, cd), cast(d, cd), cast(z0, cd)
    return be.fp_solve(c, W, d, actions, z0, adjoint, *cfg)


try:  # the innermost active TorchDispatchMode (fake/proxy tracing: opcheck, make_fx, AOTAutograd)
    from torch.utils._python_dispatch import _get_current_dispatch_mode
except ImportError:  # pragma: no cover - a torch without it: always take the registered ops
    def _get_current_dispatch_mode():
        return True


try:
    from torch._C._functorch import TransformType as _TransformType
    from torch._C._functorch import peek_interpreter_stack as _functorch_transform
except ImportError:  # pragma: no cover - older torch
    _TransformType = None

    def _functorch_transform():
        return None


def _under(kind) -> bool:
    """Whether a torch.func transform of ``kind`` (a ``TransformType``) is active at any level."""
    if _TransformType is None or _functorch_transform() is None:
        return False
    return any(i.key() == kind for i in torch._C._functorch.get_interpreter_stack())


def recording_allowed() -> bool:
    """Whether a module may keep its last call's results (``last_stats``, ``last_result``): not
    while torch.compile traces, nor under a torch.func transform (vmap, grad: the tensors there
    are wrappers that die with the transform, and reading them later fails)."""
    return not torch.compiler.is_compiling() and _functorch_transform() is None


def check_func_transforms(name: str) -> None:
    """torch.func.grad and jacrev work (the eager autograd.Function has a ``setup_context``), and
    so does grad inside vmap (per-sample gradients: every op and backward helper has a batching
    rule); jvp/jacfwd (no forward-mode rule) cannot, and say so instead of a message about an
    autograd.Function the user never wrote."""
    if torch.compiler.is_compiling():  # dynamo handles the transforms itself
        return
    level = _functorch_transform()
    if level is None:
        return
    if _under(_TransformType.Jvp):
        raise RuntimeError(f"dynalay.{name} does not support forward-mode AD (torch.func.jvp/jacfwd, "
                           f"torch.autograd.forward_ad): its implicit gradient has a backward rule only; "
                           f"use torch.func.jacrev, torch.func.grad or torch.autograd.grad")


_PLAIN = (Tensor, torch.nn.Parameter)  # what the eager path takes; any other subclass takes the op


def under_vmap() -> bool:
    """Whether a torch.func.vmap is active at any level (also below a grad: per-sample gradients)."""
    return _under(_TransformType.Vmap) if _TransformType is not None else False


def _batched(t: Tensor) -> bool:
    """Whether ``t`` is a vmap-batched tensor, also inside grad wrappers (``vmap(grad(f))``)."""
    F = torch._C._functorch
    while F.is_functorch_wrapped_tensor(t):
        if F.is_batchedtensor(t):
            return True
        t = F.get_unwrapped(t)
    return False


def _traced(args) -> bool:
    """torch.compile, an active dispatch mode (make_fx, opcheck, AOTAutograd), or tensor
    subclasses (fake, functional) or meta tensors among ``args``: what ``tracing`` and
    ``no_values`` share."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return True
    for a in args:  # a loop, not any(<generator>): this runs several times per op call
        if isinstance(a, Tensor) and (type(a) not in _PLAIN or a.is_meta):
            return True
    return False


def no_values(*tensors) -> bool:
    """Whether the values of ``tensors`` cannot be read on the host: ``_traced``, functionalize,
    and vmap-batched tensors (also under ``vmap(grad(f))``, whose innermost level is grad).
    Inside a batching rule the tensors are plain again and the values can be read (the rules
    run the checks and report convergence), which is why this is not ``tracing``."""
    if _traced(tensors):
        return True
    if _TransformType is None or not torch._C._are_functorch_transforms_active():
        return False
    if _under(_TransformType.Functionalize):
        return True
    for a in tensors:
        if isinstance(a, Tensor) and _batched(a):
            return True
    return False


def checks_off(check: str, *tensors) -> bool:
    """Whether the data-dependent checks (a host read of values) are skipped: ``check="none"``,
    and whenever the values are not there to read (``no_values``): torch.compile, any tracing
    dispatch mode (make_fx, opcheck, AOTAutograd), torch.func.vmap, fake or other subclass
    tensors, meta tensors."""
    return check == "none" or no_values(*tensors)


def tracing(*args) -> bool:
    """Whether a call may be traced: torch.compile, an active dispatch mode (make_fx, opcheck,
    AOTAutograd), torch.func.vmap, or tensor subclasses (fake, functional) or meta tensors among
    ``args``.  Then the registered ops run (their fake kernels make them traceable); otherwise
    their implementations may be called directly (``eager_function``)."""
    if _traced(args):
        return True
    level = _functorch_transform()
    # vmap (the registered ops' batching rules) or functionalize; under grad the eager
    # autograd.Function (with its setup_context) works
    return level is not None and level.key() != _TransformType.Grad


def eager_function(impl, setup, backward, name: str, num_tensor_args: int, vmap_rule=None):
    """A callable with the signature of a custom op that runs the op's implementation,
    setup_context and backward through an ``autograd.Function`` in eager mode.

    ``torch.library.custom_op`` costs ~65 us of Python per call in eager, ~450 us when autograd
    records it (measured on a tiny dynamic_step whose kernel takes 15 us), which is most of a small
    step's time.  The public functions call this in eager and the registered op when ``tracing``:
    same implementation, same saved tensors, same backward, so the two paths
    agree bit for bit (tested).  The op's leading ``num_tensor_args`` arguments (the only ones that
    can need a gradient) go to ``Function.apply`` one by one and the rest as one tuple, since
    ``apply`` costs about 1 us per argument.  When autograd has nothing to record (grad mode off,
    or no input requires grad) the implementation runs alone.

    Two Function classes share the three pieces: under a torch.func transform (grad, jacrev) one
    with a separate ``setup_context``, which functorch requires; otherwise one whose forward
    takes ``ctx`` and calls ``setup`` itself, because ``Function.apply`` binds the arguments
    through ``inspect.signature`` on every call (16 us) when ``setup_context`` is defined."""
    n = num_tensor_args

    def forward(*args):
        return impl(*(args[:n] + args[n]))

    def setup_context(ctx, args, out):  # the separate setup_context makes torch.func.grad work
        setup(ctx, args[:n] + args[n], out)

    def forward_ctx(ctx, *args):
        out = forward(*args)
        setup_context(ctx, args, out)
        return out

    def bwd(ctx, *grads):
        return tuple(backward(ctx, *grads)[:n]) + (None,)

    fn = type(name, (torch.autograd.Function,), {"forward": staticmethod(forward_ctx),
                                                 "backward": staticmethod(bwd)})
    members = {"forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
               "backward": staticmethod(bwd)}
    if vmap_rule is not None:  # vmap below a grad (per-sample gradients): the op's batching rule
        def vmap(info, in_dims, *args):
            return vmap_rule(info, tuple(in_dims[:n]) + (None,) * len(args[n]), *(args[:n] + args[n]))
        members["vmap"] = staticmethod(vmap)
    fn_func = type(name + "Func", (torch.autograd.Function,), members)
    transforms_active = torch._C._are_functorch_transforms_active

    def call(*inputs):
        if torch.is_grad_enabled():
            for t in inputs[:n]:  # a loop, not any(<generator>): once per op call
                if t is not None and t.requires_grad:
                    f = fn_func if transforms_active() else fn
                    return f.apply(*inputs[:n], inputs[n:])
        if vmap_rule is not None and transforms_active():  # batched inputs: the batching rule
            return fn_func.apply(*inputs[:n], inputs[n:])
        # nothing for autograd to record: the implementation alone (Function.apply costs ~10 us)
        return impl(*inputs)

    call.__name__ = name
    return call
