"""Issue "Batched dynamic layer dispatch": one DynaLay step for a whole batch.

Row i with a_i < L becomes the fixed point z = tanh(z W[a_i]^T + h_i U[a_i]^T + b[a_i]) (z0 = 0,
tol 1e-4 relative, at most 50 f-evaluations); a_i == L (NOP) keeps h_i.  L = 4, float32.
U ~ N(0, 1/H), every W[l] Gaussian with ||W[l]||_2 = 0.9, b ~ 0.1 N(0, 1), h ~ N(0, 1): the
same tensors for every provider (benchlib.dispatch_problem), actions with exact counts in a
random order (benchlib.make_actions): a fraction `nop` of the rows choose NOP; the others are
spread evenly over the layers (uniform) or 90% of them choose layer 0 (skewed).

Providers
  dynalay_<backend>  dynalay.dynamic_step(h, actions, U, W, b, backend=<backend>): per-row freeze,
                     implicit backward.
  per_layer_loop     for each layer: rows = (actions == l).nonzero(), index_select, the plain
                     eager solve of that group (batch-max stop, .item()), index_copy; NOP rows
                     pass through.  fwdbwd backprops by unrolling through the loops.
  dense              every layer solved on the whole batch with the eager loop, then each row's
                     result gathered (NOP: h).  fwdbwd unrolls too.
Modes: fwd (no grad), fwdbwd (loss = sum(h_new * G), gradients of h, U, W, b).

Grid: B in {256, 4096}, H in {64, 128}, nop in {0, 0.5, 0.9}, uniform/skewed, fwd/fwdbwd:
192 cases, about 1.2 s of measurement each (fewer rounds, at least 3, for slow calls).  The
dense fwdbwd case at B=4096 is kept: it costs ~0.1-0.3 s a call on 2 cores, which the adaptive
round count absorbs (set DYNALAY_BENCH_SKIP_DENSE_BIG=1 to drop it).
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

import dynalay
from benchlib import (AGREE_TOL, DYNALAY_BACKENDS, MAX_ITER, TOL, backend_of, bench_case, dispatch_problem,
                      dynalay_skip_reason, eager_solve, last_backward_stats, leaf, make_actions, record_env)

L = 4
BS = [256, 4096]
HS = [64, 128]
NOPS = [0.0, 0.5, 0.9]
DISTS = ["uniform", "skewed"]
MODES = ["fwd", "fwdbwd"]
SKIP_DENSE_BIG = os.environ.get("DYNALAY_BENCH_SKIP_DENSE_BIG", "0") == "1"

PROVIDERS = [(f"dynalay_{n}", dynalay_skip_reason(n, "picard")) for n in DYNALAY_BACKENDS] + [
    ("per_layer_loop", None), ("dense", None)]


def _cases():
    out = []
    for (prov, reason), B, H, nop, dist, mode in itertools.product(PROVIDERS, BS, HS, NOPS, DISTS, MODES):
        r = reason
        if r is None and SKIP_DENSE_BIG and prov == "dense" and mode == "fwdbwd" and B == 4096:
            r = "DYNALAY_BENCH_SKIP_DENSE_BIG=1: dense fwdbwd at B=4096 dropped"
        marks = [pytest.mark.skip(reason=r)] if r else []
        out.append(pytest.param(prov, B, H, nop, dist, mode, marks=marks,
                                id=f"{prov}-B{B}-H{H}-nop{nop}-{dist}-{mode}"))
    return out


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------
def per_layer_loop(h, actions, U, W, b, stats=None):
    out = h
    for l in range(U.shape[0]):
        rows = (actions == l).nonzero().squeeze(1)
        n = rows.numel()
        if n == 0:
            continue
        inj = h.index_select(0, rows) @ U[l].t() + b[l]
        z, k = eager_solve(inj, W[l])
        out = out.index_copy(0, rows, z)
        if stats is not None:
            stats["row_evals"] += n * k
            stats["iters"].append(k)
    return out


def dense(h, actions, U, W, b, stats=None):
    Ln = U.shape[0]
    outs = []
    for l in range(Ln):
        z, k = eager_solve(h @ U[l].t() + b[l], W[l])
        outs.append(z)
        if stats is not None:
            stats["row_evals"] += h.shape[0] * k
            stats["iters"].append(k)
    outs.append(h)  # NOP
    Z = torch.stack(outs, 1)  # (B, L+1, H)
    idx = actions.view(-1, 1, 1).expand(-1, 1, h.shape[1])
    return Z.gather(1, idx).squeeze(1)


def make_runner(provider, B, H, nop, dist, mode):
    h0, U0, W0, b0, G = dispatch_problem(B, H, L)
    actions = make_actions(B, L, nop, dist)
    grad = mode == "fwdbwd"
    h, U, W, b = (leaf(t, grad) for t in (h0, U0, W0, b0))
    params = (h, U, W, b)

    if provider.startswith("dynalay_"):
        be = backend_of(provider)

        def run(info=None):
            with torch.set_grad_enabled(grad):
                r = dynalay.dynamic_step(h, actions, U, W, b, tol=TOL, max_iter=MAX_ITER, backend=be)
                out = torch.autograd.grad((r.h * G).sum(), params) if grad else r.h
            if info is not None:
                act = actions < L
                it = r.iters[act].float()
                info.update(row_evals_fwd=int(r.iters.sum()),
                            iters_fwd_mean=float(it.mean()) if it.numel() else 0.0,
                            converged_fwd=bool(r.converged.all()))
                if grad:
                    st = last_backward_stats()
                    bi = st["iters"][act].float()
                    info.update(iters_bwd_mean=float(bi.mean()) if bi.numel() else 0.0)
            return out
        return run

    fn = {"per_layer_loop": per_layer_loop, "dense": dense}[provider]

    def run(info=None):
        stats = None if info is None else {"row_evals": 0, "iters": []}
        with torch.set_grad_enabled(grad):
            y = fn(h, actions, U, W, b, stats)
            out = torch.autograd.grad((y * G).sum(), params) if grad else y
        if info is not None:
            its = stats["iters"]
            info.update(row_evals_fwd=int(stats["row_evals"]), iters_per_layer=its,
                        iters_fwd_mean=float(sum(its) / len(its)) if its else 0.0)
        return out
    return run


# --------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("provider,B,H,nop,dist,mode", _cases())
def test_dispatch(benchmark, provider, B, H, nop, dist, mode):
    run = make_runner(provider, B, H, nop, dist, mode)
    benchmark.group = f"dispatch B={B} H={H} nop={nop} {dist} {mode}"
    record_env(benchmark, suite="dispatch", provider=provider, B=B, H=H, L=L, nop=nop, dist=dist, mode=mode,
               solver="picard")
    bench_case(benchmark, run)


# --------------------------------------------------------------------------------------------
# Sanity (not a benchmark): the providers compute the same step
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_providers_agree(mode):
    B, H, nop, dist = 256, 64, 0.5, "skewed"
    provs = [p for p, reason in PROVIDERS if reason is None]
    ref = make_runner("dense", B, H, nop, dist, mode)()
    ref = ref if isinstance(ref, tuple) else (ref,)
    for p in provs:
        out = make_runner(p, B, H, nop, dist, mode)()
        out = out if isinstance(out, tuple) else (out,)
        for name, a, r in zip(("out/h", "U", "W", "b"), out, ref):
            err = float((a - r).norm() / r.norm())
            assert err < AGREE_TOL, f"{p} {mode} {name}: relative difference {err:.2e} to dense"
