"""Issue "The fixed-point solve as a torch custom op": dynalay.fixed_point against an eager loop
and torchdeq 0.1.0, on one problem for every provider.

Problem (ANCHORS.md 2.1/2.2): f(z) = tanh(z W^T + inj), z0 = 0, float32, tol 1e-4 on the
per-sample relative residual, at most 50 f-evaluations; the injection is computed once,
outside the solve.
  gauss  W Gaussian rescaled to ||W||_2 = 0.9, inj ~ N(0, 1)                       (~10 iterations)
  slow   W = 0.9 Q diag(linspace(0, 1, H)) Q^T, inj ~ 0.3 N(0, 1)                   (~30 iterations)

Providers
  dynalay_<backend>   dynalay.fixed_point(..., backend=<backend>): per-row freeze; fwdbwd uses
                      the implicit (IFT) backward with the forward's tol/max_iter (defaults).
  eager               the plain eager loop (batch-max stop, one .item() an iteration); in
                      fwdbwd the same loop backpropagated by unrolling.
  torchdeq_fp         get_deq(f_solver=b_solver='fixed_point_iter', ift=True, ...): see
                      benchlib.make_torchdeq.  fwd: eval mode under no_grad (the inference path);
                      fwdbwd: train mode, IFT backward.
  torchdeq_anderson   the same with 'anderson' (torchdeq defaults m=6, lam=1e-4).
Modes: fwd (no grad), fwdbwd (loss = sum(z * G), gradients of inj and W).

test_slow_adjoint: forward+backward on the slow problem at (512, 256) and (256, 1024) with the
implicit backward's adjoint solved by picard, anderson or gmres (cpp and torch backends).

test_saved_memory is not timed (one round): it records in extra_info the bytes the autograd
graph keeps for backward after the forward (saved_tensors_hooks), for dynalay implicit,
torchdeq (IFT) and unrolled.
"""
from __future__ import annotations

import pytest
import torch

import dynalay
from benchlib import (AGREE_TOL, DYNALAY_BACKENDS, MAX_ITER, TOL, TORCHDEQ_SOLVERS, backend_of, bench_case,
                      dynalay_params, dynalay_skip_reason, eager_solve, fp_problem, last_backward_stats, leaf,
                      make_torchdeq, param, record_env, saved_for_backward, torchdeq_skip_reason)

SHAPES = [(64, 64), (512, 256)]
MODES = ["fwd", "fwdbwd"]
SLOW_SHAPE = (512, 256)
MEMORY_SHAPE = (512, 256)

FP_PROVIDERS = dynalay_params("picard") + [param("eager", None)] + [
    param(p, torchdeq_skip_reason()) for p in TORCHDEQ_SOLVERS]

SLOW_PROVIDERS = (
    [param(f"dynalay_{n}_{s}", dynalay_skip_reason(n, s)) for n in DYNALAY_BACKENDS for s in ("picard", "anderson")]
    + [param("eager", None)] + [param(p, torchdeq_skip_reason()) for p in TORCHDEQ_SOLVERS])

MEMORY_PROVIDERS = dynalay_params("picard") + [param("unrolled", None)] + [
    param(p, torchdeq_skip_reason()) for p in TORCHDEQ_SOLVERS]


# --------------------------------------------------------------------------------------------
# One call of each provider.  run(info=None) does the timed work; given a dict it also fills the
# iteration statistics (once, untimed, before timing; the single call in smoke mode).
# --------------------------------------------------------------------------------------------
def make_runner(provider: str, inj0: torch.Tensor, W0: torch.Tensor, G: torch.Tensor, mode: str,
                solver: str = "picard"):
    grad = mode == "fwdbwd"
    inj, W = leaf(inj0, grad), leaf(W0, grad)

    if provider.startswith("dynalay_"):
        be = backend_of(provider)

        def run(info=None):
            with torch.set_grad_enabled(grad):
                r = dynalay.fixed_point(inj, W, tol=TOL, max_iter=MAX_ITER, solver=solver, backend=be)
                out = torch.autograd.grad((r.z * G).sum(), (inj, W)) if grad else r.z
            if info is not None:
                it = r.iters.float()
                info.update(iters_fwd_mean=float(it.mean()), iters_fwd_max=int(r.iters.max()),
                            converged_fwd=bool(r.converged.all()), row_evals_fwd=int(r.iters.sum()))
                if grad:
                    st = last_backward_stats()
                    info.update(iters_bwd_mean=float(st["iters"].float().mean()),
                                iters_bwd_max=int(st["iters"].max()), converged_bwd=bool(st["converged"].all()))
            return out
        return run

    if provider in ("eager", "unrolled"):
        def run(info=None):
            with torch.set_grad_enabled(grad):
                z, k = eager_solve(inj, W)
                out = torch.autograd.grad((z * G).sum(), (inj, W)) if grad else z
            if info is not None:
                info.update(iters_fwd_mean=float(k), iters_fwd_max=int(k), row_evals_fwd=int(k) * inj.shape[0])
            return out
        return run

    if provider in TORCHDEQ_SOLVERS:
        deq = make_torchdeq(provider)
        deq.train(grad)
        Wt = W.t()
        count = [0]

        def f(z):
            if not torch.is_grad_enabled():  # the solver's evaluations (IFT's extra step and the
                count[0] += 1                # backward's re-evaluation run with grad enabled)
            return torch.tanh(z @ Wt + inj)

        def run(info=None):
            count[0] = 0
            writes = []
            if grad:
                zs, st = deq(f, torch.zeros_like(inj), backward_writer=writes.append)
                out = torch.autograd.grad((zs[-1] * G).sum(), (inj, W))
            else:
                with torch.no_grad():
                    zs, st = deq(f, torch.zeros_like(inj))
                out = zs[-1]
            if info is not None:
                info.update(iters_fwd_mean=float(count[0]), iters_fwd_max=int(count[0]),
                            nstep_fwd_mean=float(st["nstep"].float().mean()),
                            row_evals_fwd=int(count[0]) * inj.shape[0],
                            rel_residual_fwd_max=float(st["rel_lowest"].max()))
                if grad:
                    # IFTGrad.backward calls backward_writer once with the b_solver's statistics:
                    # proof that ift=True solved the adjoint with the b_* settings.
                    assert len(writes) == 1, "torchdeq did not run its IFT backward solve"
                    b = writes[0]
                    info.update(ift_backward_ran=True, iters_bwd_mean=float(b["nstep"].float().mean()),
                                iters_bwd_max=int(b["nstep"].max()),
                                rel_residual_bwd_max=float(b["rel_lowest"].max()))
            return out
        return run

    raise ValueError(provider)


# --------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,H", SHAPES, ids=[f"B{b}-H{h}" for b, h in SHAPES])
@pytest.mark.parametrize("provider", FP_PROVIDERS)
def test_fixed_point(benchmark, provider, B, H, mode):
    inj, W, G = fp_problem("gauss", B, H)
    run = make_runner(provider, inj, W, G, mode)
    benchmark.group = f"fixed_point gauss B={B} H={H} {mode}"
    record_env(benchmark, suite="fixed_point", problem="gauss", provider=provider, B=B, H=H, mode=mode,
               solver="anderson" if provider == "torchdeq_anderson" else "picard")
    bench_case(benchmark, run)


@pytest.mark.parametrize("provider", SLOW_PROVIDERS)
def test_slow_problem(benchmark, provider):
    B, H = SLOW_SHAPE
    inj, W, G = fp_problem("slow", B, H)
    if provider.startswith("dynalay_"):
        solver = provider.rsplit("_", 1)[1]
        run = make_runner(provider, inj, W, G, "fwd", solver=solver)
    else:
        solver = "anderson" if provider == "torchdeq_anderson" else "picard"
        run = make_runner(provider, inj, W, G, "fwd")
    benchmark.group = f"fixed_point slow B={B} H={H} fwd"
    record_env(benchmark, suite="fixed_point_slow", problem="slow", provider=provider, B=B, H=H, mode="fwd",
               solver=solver)
    bench_case(benchmark, run)


ADJOINT_SHAPES = [(512, 256), (256, 1024)]
ADJOINT_PROVIDERS = [param(f"dynalay_{n}_{s}", dynalay_skip_reason(n, "picard"))
                     for n in ("cpp", "torch") for s in ("picard", "anderson", "gmres")]


@pytest.mark.parametrize("B,H", ADJOINT_SHAPES, ids=[f"B{b}-H{h}" for b, h in ADJOINT_SHAPES])
@pytest.mark.parametrize("provider", ADJOINT_PROVIDERS)
def test_slow_adjoint(benchmark, provider, B, H):
    """The implicit backward's adjoint solver on the slow problem: forward+backward with
    backward_solver picard / anderson / gmres (the forward is Picard in all three)."""
    inj0, W0, G = fp_problem("slow", B, H)
    be, bsolver = backend_of(provider), provider.rsplit("_", 1)[1]
    inj, W = leaf(inj0, True), leaf(W0, True)

    def run(info=None):
        r = dynalay.fixed_point(inj, W, tol=TOL, max_iter=MAX_ITER, backend=be, backward_solver=bsolver)
        out = torch.autograd.grad((r.z * G).sum(), (inj, W))
        if info is not None:
            st = last_backward_stats()
            info.update(iters_fwd_mean=float(r.iters.float().mean()), iters_bwd_mean=float(st["iters"].float().mean()),
                        converged_bwd=bool(st["converged"].all()))
        return out
    benchmark.group = f"fixed_point slow adjoint B={B} H={H} fwdbwd"
    record_env(benchmark, suite="fixed_point_adjoint", problem="slow", provider=provider, backend=be,
               backward_solver=bsolver, B=B, H=H, mode="fwdbwd")
    bench_case(benchmark, run)


@pytest.mark.parametrize("problem", ["gauss", "slow"])
@pytest.mark.parametrize("provider", MEMORY_PROVIDERS)
def test_saved_memory(benchmark, provider, problem):
    """Not timed: bytes kept for backward by the graph after the forward (one round)."""
    B, H = MEMORY_SHAPE
    inj0, W0, G = fp_problem(problem, B, H)
    inj, W = leaf(inj0, True), leaf(W0, True)
    info: dict = {}
    if provider.startswith("dynalay_"):
        be = backend_of(provider)

        def forward():
            r = dynalay.fixed_point(inj, W, tol=TOL, max_iter=MAX_ITER, backend=be)
            info["iters_fwd_mean"] = float(r.iters.float().mean())
            return r.z
    elif provider == "unrolled":
        def forward():
            z, k = eager_solve(inj, W)
            info["iters_fwd_mean"] = float(k)
            return z
    else:
        deq = make_torchdeq(provider)
        deq.train()
        Wt = W.t()

        def forward():
            zs, st = deq(lambda z: torch.tanh(z @ Wt + inj), torch.zeros_like(inj))
            info["iters_fwd_mean"] = float(st["nstep"].float().mean())
            return zs[-1]

    z, saved = saved_for_backward(forward, inputs=(inj, W, G))
    state_bytes = B * H * inj.element_size()
    # the graph really backpropagates (and the hooks' unpack works)
    gi, gW = torch.autograd.grad((z * G).sum(), (inj, W))
    assert torch.isfinite(gi).all() and torch.isfinite(gW).all()
    del z
    benchmark.group = f"saved-memory {problem} B={B} H={H}"
    record_env(benchmark, suite="memory", problem=problem, provider=provider, B=B, H=H, mode="fwdbwd", timed=False,
               state_bytes=state_bytes, saved_states=saved["saved_bytes"] / state_bytes, **saved, **info)
    # one untimed round so that the numbers land in the --benchmark-json file
    benchmark.pedantic(lambda: None, rounds=1, warmup_rounds=0, iterations=1)


# --------------------------------------------------------------------------------------------
# Sanity (not a benchmark): the providers solve the same problem
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_providers_agree(mode):
    B, H = 64, 64
    inj, W, G = fp_problem("gauss", B, H)
    ref = make_runner("eager", inj, W, G, mode)()
    ref = ref if isinstance(ref, tuple) else (ref,)
    provs = [p.values[0] for p in FP_PROVIDERS if not p.marks]
    for p in provs:
        out = make_runner(p, inj, W, G, mode)()
        out = out if isinstance(out, tuple) else (out,)
        for a, r in zip(out, ref):
            err = float((a - r).norm() / r.norm())
            assert err < AGREE_TOL, f"{p} {mode}: relative difference {err:.2e} to the eager loop"
