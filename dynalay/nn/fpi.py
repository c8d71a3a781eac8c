"""Fixed-point-iterative layers as ``nn.Module``s."""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import backends
from ..ops._common import SolverConfig, check_int, recording_allowed
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


def _unit_or_keep(raw: Tensor, old: Tensor) -> Tensor:
    """``raw`` normalised along the last dim; where its norm is 0 or not finite (``W = 0``, a NaN
    in ``W``) the previous vector is kept.  Normalising a zero vector gives 0, and power iteration
    cannot leave 0: the bound would be off for good, whatever ``W`` becomes."""
    n = torch.linalg.vector_norm(raw, dim=-1, keepdim=True)
    ok = (n > 0) & torch.isfinite(n)
    return torch.where(ok, raw / torch.where(ok, n, torch.ones_like(n)), old)


class SpectralBound(nn.Module):
    """Keeps ``||W||_2 <= bound`` by rescaling ``W * min(1, bound / sigma(W))``, with ``sigma``
    from power iteration (vectors kept as buffers, one step per training forward, gradients
    through ``sigma`` as in ``torch.nn.utils.spectral_norm``).  ``bound < 1`` makes the tanh
    map a contraction, so the fixed point exists, is unique, and Picard converges.

    ``reset(W)`` (at construction; call it after writing new weights by hand) sets the vectors to
    ``W``'s exact top singular pair (an SVD), so the bound holds from the start (``sigma`` is
    inflated by ``H * eps`` of ``W``'s dtype so that rounding cannot cross it).  Training then
    tracks ``W`` by one power step per forward, as ``spectral_norm`` does: between an optimiser
    step and the next forward the estimate lags (power iteration underestimates ``sigma``).
    Eval mode never updates the vectors: the state dict carries them with the weights."""

    def __init__(self, shape_lead: tuple, H: int, bound: float = 0.9, power_iters: int = 1, *, dtype=None):
        super().__init__()
        if not (0.0 < bound):
            raise ValueError(f"spectral_bound must be > 0 (got {bound!r})")
        self.bound, self.power_iters = float(bound), int(power_iters)
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        u = torch.randn(*shape_lead, H)
        self.register_buffer("u", (u / u.norm(dim=-1, keepdim=True)).to(dtype))
        self.register_buffer("v", torch.zeros(*shape_lead, H, dtype=dtype))

    @torch.no_grad()
    def _power(self, W: Tensor, iters: int) -> None:
        u, v = self.u.to(W.dtype), self.v.to(W.dtype)
        for _ in range(iters):
            v = _unit_or_keep((u.unsqueeze(-2) @ W).squeeze(-2), v)
            u = _unit_or_keep((W @ v.unsqueeze(-1)).squeeze(-1), u)
        self.u.copy_(u)
        self.v.copy_(v)

    @torch.no_grad()
    def reset(self, W: Tensor) -> None:
        """Set the vectors to ``W``'s top singular pair (exact, one SVD per matrix)."""
        with _full_precision(W):
            Wd = W.detach().float() if W.dtype in (torch.float16, torch.bfloat16) else W.detach()
            left, _, right_h = torch.linalg.svd(Wd)
            self.u.copy_(left[..., :, 0])
            self.v.copy_(right_h[..., 0, :])

    def sigma(self, W: Tensor) -> Tensor:
        # copies: autograd saves u and v for the backward of sigma, and the next training
        # forward's power step writes the buffers in place (a module called twice before
        # backward, or a regulariser on effective_weight(), would fail with a version error)
        u, v = self.u.to(W.dtype, copy=True), self.v.to(W.dtype, copy=True)
        return (u.unsqueeze(-2) @ W @ v.unsqueeze(-1)).squeeze(-1).squeeze(-1)

    def forward(self, W: Tensor) -> Tensor:
        Wf = W.float() if W.dtype in (torch.float16, torch.bfloat16) else W
        # sigma in W's precision even under torch.autocast: a bf16 estimate is off by ~0.4%,
        # enough to break the bound (the solve casts W to the autocast dtype itself)
        with _full_precision(W):
            if self.training:
                self._power(Wf.detach(), self.power_iters)
            # the estimate inflated by H * eps: the rounding of u^T W v (two length-H reductions)
            # and of W * scale (up to sqrt(H) * eps in norm) cannot push ||W_eff||_2 over the bound
            # (abs: u^T W v >= 0 for the pair of the last power step, but an -Inf in W gave -inf,
            # which clamp_min turned into 1e-12: the scale 1 and the Inf kept in W_eff)
            sigma = self.sigma(Wf).abs().clamp_min(1e-12) * (1.0 + Wf.shape[-1] * torch.finfo(Wf.dtype).eps)
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
        self.spectral = (SpectralBound((), hidden_features, spectral_bound, dtype=dtype).to(device)
                         if spectral_bound is not None else None)
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
        if z0 is not None and isinstance(z0, Tensor) and z0.dim() != 2 and z0.shape[:-1] == lead:
            z0 = z0.reshape(-1, z0.shape[-1])
        res = fixed_point(inj, self.effective_weight(), z0=z0, **self.solve_kwargs)
        if recording_allowed():
            self.last_stats = FixedPointResult(res.z.detach(), res.iters, res.residual, res.converged)
        return res.z.reshape(*lead, self.hidden_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, hidden_features={self.hidden_features}, solve={self.solve_kwargs}"
