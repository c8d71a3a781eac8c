"""Fixed-point-iterative layers as ``nn.Module``s."""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import backends
from ..ops._common import SolverConfig, check_int
from ..ops.fixed_point import FixedPointResult, check_backward_args, fixed_point, resolve_backward_config

SOLVE_KEYS = ("tol", "max_iter", "solver", "backward", "damping", "anderson_m", "anderson_lam", "eps",
              "backward_tol", "backward_max_iter", "backward_solver", "phantom_steps", "phantom_damping", "check",
              "backend")


def validate_solve_kwargs(kw: dict) -> dict:
    """Reject unknown or invalid solver settings at construction time (not at the first forward)."""
    unknown = set(kw) - set(SOLVE_KEYS)
    if unknown:
        raise TypeError(f"unknown solver argument(s) {sorted(unknown)}; valid: {list(SOLVE_KEYS)}")
    cfg = SolverConfig(**{k: kw[k] for k in ("tol", "max_iter", "solver", "damping", "anderson_m", "anderson_lam",
                                              "eps") if k in kw}).validate()
    resolve_backward_config(cfg, kw.get("backward_tol"), kw.get("backward_max_iter"), kw.get("backward_solver"))
    check_backward_args(kw.get("backward", "implicit"), kw.get("phantom_steps", 5), kw.get("phantom_damping", 0.5),
                        kw.get("check", "warn"))
    if kw.get("backend") is not None:
        backends.requested_backend(kw["backend"])  # a name it knows (whether it runs is decided per call)
    return dict(kw)


def check_spectral_bound(bound) -> Optional[float]:
    """``None`` (no constraint) or a finite float > 0; 0 is an error, not "off"."""
    if bound is None:
        return None
    if not isinstance(bound, (int, float)) or isinstance(bound, bool) or not math.isfinite(bound) or bound <= 0:
        raise ValueError(f"spectral_bound must be None or a finite float > 0 (got {bound!r})")
    return float(bound)


def _full_precision(t: Tensor):
    """A context that turns ``torch.autocast`` off for ``t``'s device type (a no-op elsewhere)."""
    dt = t.device.type
    return torch.autocast(dt, enabled=False) if torch.amp.is_autocast_available(dt) else contextlib.nullcontext()


class SpectralBound(nn.Module):
    """Keeps ``||W||_2 <= bound`` by rescaling ``W * min(1, bound / sigma(W))``, with ``sigma``
    from power iteration (vectors kept as buffers, one step per training forward, gradients
    through ``sigma`` as in ``torch.nn.utils.spectral_norm``).  ``bound < 1`` makes the tanh
    map a contraction, so the fixed point exists, is unique, and Picard converges."""

    def __init__(self, shape_lead: tuple, H: int, bound: float = 0.9, power_iters: int = 1):
        super().__init__()
        if not (0.0 < bound):
            raise ValueError(f"spectral_bound must be > 0 (got {bound!r})")
        self.bound, self.power_iters = float(bound), int(power_iters)
        u = torch.randn(*shape_lead, H)
        self.register_buffer("u", u / u.norm(dim=-1, keepdim=True))
        self.register_buffer("v", torch.zeros(*shape_lead, H))

    @torch.no_grad()
    def _power(self, W: Tensor, iters: int) -> None:
        u, v = self.u.to(W.dtype), self.v.to(W.dtype)
        for _ in range(iters):
            v = torch.nn.functional.normalize((u.unsqueeze(-2) @ W).squeeze(-2), dim=-1, eps=1e-12)
            u = torch.nn.functional.normalize((W @ v.unsqueeze(-1)).squeeze(-1), dim=-1, eps=1e-12)
        self.u.copy_(u)
        self.v.copy_(v)

    def reset(self, W: Tensor, iters: int = 30) -> None:
        """Converge the power iteration for ``W`` (at construction, after loading new weights)."""
        with _full_precision(W):
            self._power(W.detach().float() if W.dtype in (torch.float16, torch.bfloat16) else W.detach(), iters)

    def sigma(self, W: Tensor) -> Tensor:
        u, v = self.u.to(W.dtype), self.v.to(W.dtype)
        return (u.unsqueeze(-2) @ W @ v.unsqueeze(-1)).squeeze(-1).squeeze(-1)

    def forward(self, W: Tensor) -> Tensor:
        Wf = W.float() if W.dtype in (torch.float16, torch.bfloat16) else W
        # sigma in W's precision even under torch.autocast: a bf16 estimate is off by ~0.4%,
        # enough to break the bound (the solve casts W to the autocast dtype itself)
        with _full_precision(W):
            if self.training:
                self._power(Wf.detach(), self.power_iters)
            sigma = self.sigma(Wf).clamp_min(1e-12)
            scale = torch.clamp(self.bound / sigma, max=1.0)
            return (Wf * scale.unsqueeze(-1).unsqueeze(-1)).to(W.dtype)


class FPILayer(nn.Module):
    """``z* = tanh(W z* + U x + b)``, solved per sample by ``dynalay.fixed_point``.

    Args:
        in_features, hidden_features: sizes of ``x`` and ``z``.
        bias: bias of ``U x + b``.
        spectral_bound: ``W`` is kept at ``||W||_2 <= spectral_bound`` (default 0.9, a contraction);
            ``None`` leaves ``W`` free (then convergence is not guaranteed: watch ``last_stats``).
        **solve_kwargs: any argument of ``dynalay.fixed_point`` (tol, max_iter, solver, backward, ...),
            validated here.

    ``forward(x, z0=None)`` returns ``z`` (``x``: ``(..., in_features)``, ``z0`` with the same leading
    dimensions).  ``last_stats`` holds the last
    forward solve's ``FixedPointResult`` (detached).
    """

    def __init__(self, in_features: int, hidden_features: int, *, bias: bool = True,
                 spectral_bound: Optional[float] = 0.9, device=None, dtype=None, **solve_kwargs):
        super().__init__()
        check_int("in_features", in_features, 1)
        check_int("hidden_features", hidden_features, 1)
        spectral_bound = check_spectral_bound(spectral_bound)
        self.solve_kwargs = validate_solve_kwargs(solve_kwargs)
        self.in_features, self.hidden_features = in_features, hidden_features
        self.U = nn.Linear(in_features, hidden_features, bias=bias, device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(hidden_features, hidden_features, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(hidden_features))
        self.spectral = SpectralBound((), hidden_features, spectral_bound).to(device) if spectral_bound is not None else None
        if self.spectral is not None:
            self.spectral.reset(self.weight)
        self.last_stats: Optional[FixedPointResult] = None

    def effective_weight(self) -> Tensor:
        return self.spectral(self.weight) if self.spectral is not None else self.weight

    def forward(self, x: Tensor, z0: Optional[Tensor] = None) -> Tensor:
        """``x``: ``(..., in_features)``; ``z0`` (optional start): ``(..., hidden_features)`` with the
        same leading dimensions, or already flattened to ``(N, hidden_features)``."""
        lead = x.shape[:-1]
        inj = self.U(x.reshape(-1, x.shape[-1]))
        if z0 is not None and isinstance(z0, Tensor) and z0.dim() > 2 and z0.shape[:-1] == lead:
            z0 = z0.reshape(-1, z0.shape[-1])
        res = fixed_point(inj, self.effective_weight(), z0=z0, **self.solve_kwargs)
        if not torch.compiler.is_compiling():
            self.last_stats = FixedPointResult(res.z.detach(), res.iters, res.residual, res.converged)
        return res.z.reshape(*lead, self.hidden_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, hidden_features={self.hidden_features}, solve={self.solve_kwargs}"
