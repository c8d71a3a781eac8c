"""The DynaLay step as a module: L fixed-point layers + NOP, one batched op per step."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.dispatch import DynamicStepResult, dynamic_step
from ..ops._common import check_int, recording_allowed
from .fpi import SpectralBound, check_spectral_bound, validate_solve_kwargs


class DynamicFPIStep(nn.Module):
    """Owns ``U, W (L, H, H)`` and ``b (L, H)``; ``forward(h, actions)`` advances each row through
    the layer its action names (``L`` = NOP) with ``dynalay.dynamic_step``.

    ``W[l]`` is kept at ``||W[l]||_2 <= spectral_bound`` (a contraction; batched power iteration).
    ``solve_kwargs``: any solver/backward/check/backend argument of ``dynalay.fixed_point``.
    ``last_result`` holds the last step's ``DynamicStepResult`` (detached)."""

    def __init__(self, num_layers: int, hidden: int, *, spectral_bound: Optional[float] = 0.9, device=None,
                 dtype=None, **solve_kwargs):
        super().__init__()
        check_int("num_layers", num_layers, 1)
        check_int("hidden", hidden, 1)
        spectral_bound = check_spectral_bound(spectral_bound)
        self.solve_kwargs = validate_solve_kwargs(solve_kwargs)
        self.num_layers, self.hidden = num_layers, hidden
        kw = dict(device=device, dtype=dtype)
        self.U = nn.Parameter(torch.randn(num_layers, hidden, hidden, **kw) / math.sqrt(hidden))
        self.W = nn.Parameter(torch.randn(num_layers, hidden, hidden, **kw) / math.sqrt(hidden))
        self.b = nn.Parameter(torch.zeros(num_layers, hidden, **kw))
        self.spectral = (SpectralBound((num_layers,), hidden, spectral_bound, dtype=dtype).to(device)
                         if spectral_bound is not None else None)
        if self.spectral is not None:
            self.spectral.reset(self.W)
        self.last_result: Optional[DynamicStepResult] = None

    @property
    def nop(self) -> int:
        return self.num_layers

    def effective_weight(self) -> Tensor:
        return self.spectral(self.W) if self.spectral is not None else self.W

    def forward(self, h: Tensor, actions: Tensor, **overrides) -> DynamicStepResult:
        kw = dict(self.solve_kwargs, **overrides) if overrides else self.solve_kwargs
        r = dynamic_step(h, actions, self.U, self.effective_weight(), self.b, **kw)
        if recording_allowed():
            self.last_result = DynamicStepResult(r.h.detach(), r.iters, r.converged)
        return r

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, hidden={self.hidden}, solve={self.solve_kwargs}"
