"""torch.func over the ops: the batching rules (one folded call) against a Python loop per slice.

  per_sample_grad  ``torch.func.vmap(torch.func.grad(f))`` over N samples of a ``fixed_point``
                   layer with shared weights (f: the squared norm of the sample's fixed point):
                   the per-sample gradients of ``inj`` and ``W``.  Baseline: a loop of
                   ``torch.func.grad`` over the samples (what a user had to write before the
                   batching rules: the same numbers, tested in tests/test_contracts.py), and the
                   cheapest loop, ``torch.autograd.grad`` per sample.
  ensemble_step    ``torch.func.vmap`` of ``dynamic_step`` over an ensemble of E sets of layers
                   (U, W, b mapped, as with ``stack_module_state``), each on its own batch of B
                   rows, forward and forward+backward.  Baseline: a loop over the members.

H = 64, ||W||_2 = 0.9, tol 1e-4, float32, 2 threads; dynalay's cpp backend (and torch for the
per-sample gradients).
"""
from __future__ import annotations

import pytest
import torch

import dynalay
from benchlib import DEVICE, DTYPE, dispatch_problem, make_actions, record_env, timed
from dynalay import backends

H, L = 64, 4
TOL = 1e-4


def _skip(backend):
    why = backends.not_supported_reasons(backend, DEVICE.type, DTYPE)
    if why:
        pytest.skip(f"backend {backend} cannot run here: {why}")


@pytest.mark.parametrize("N", [64, 256])
@pytest.mark.parametrize("provider", ["vmap", "loop", "loop_autograd"])
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_per_sample_grad(benchmark, backend, provider, N):
    _skip(backend)
    h, _, W, _, _ = dispatch_problem(N, H, 1)
    W = W[0]

    def f(w, x):
        return dynalay.fixed_point(x[None], w, tol=TOL, backend=backend).z.square().sum()

    g = torch.func.grad(f, argnums=(0, 1))
    if provider == "vmap":
        run = lambda: torch.func.vmap(g, in_dims=(None, 0))(W, h)  # noqa: E731
    elif provider == "loop":
        run = lambda: [g(W, x) for x in h]  # noqa: E731
    else:  # the cheapest loop: plain torch.autograd.grad per sample
        Wg = W.clone().requires_grad_()

        def run():
            out = []
            for x in h:
                xg = x.clone().requires_grad_()
                out.append(torch.autograd.grad(f(Wg, xg), (Wg, xg)))
            return out
    record_env(benchmark, suite="func", case="per_sample_grad", provider=provider, backend=backend, N=N, H=H)
    benchmark.group = f"per-sample grad N={N} H={H} {backend}"
    timed(benchmark, run)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("provider", ["vmap", "loop"])
def test_ensemble_step(benchmark, provider, mode):
    _skip("cpp")
    E, B = 8, 128
    probs = [dispatch_problem(B, H, L, seed=e) for e in range(E)]
    hs, Us, Ws, bs = (torch.stack([p[k] for p in probs]) for k in range(4))
    acts = torch.stack([make_actions(B, L, 0.25, "uniform", seed=e) for e in range(E)])
    grad = mode == "fwdbwd"
    params = [t.clone().requires_grad_(grad) for t in (Us, Ws, bs)]

    def step(h, a, U, W, b):
        return dynalay.dynamic_step(h, a, U, W, b, tol=TOL, backend="cpp").h

    def run():
        with torch.set_grad_enabled(grad):
            if provider == "vmap":
                out = torch.func.vmap(step)(hs, acts, *params)
            else:
                out = torch.stack([step(hs[e], acts[e], *(p[e] for p in params)) for e in range(E)])
            return torch.autograd.grad(out.square().sum(), params) if grad else out
    record_env(benchmark, suite="func", case="ensemble_step", provider=provider, backend="cpp", E=E, B=B, H=H,
               L=L, mode=mode)
    benchmark.group = f"ensemble dynamic_step E={E} B={B} H={H} {mode}"
    timed(benchmark, run)
