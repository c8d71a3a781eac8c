"""Differential fuzz: random problems (shapes, dtypes, solvers, damping, z0, ridge, backward mode,
max_iter small enough to stop early, W contractive or not, action patterns) solved by every CPU
backend against the torch backend: outputs, iteration counts, convergence flags and gradients.

Each run draws fresh cases from the printed seed (replay: DYNALAY_TEST_SEED=<seed>).  Session
19's offline run of 12,000 cases found the Anderson lam=0 disagreement fixed there; 600 cases
through the Triton interpreter agreed.  The batching rules (torch.func.vmap) are fuzzed against
loops over the slices the same way."""
import math
import os
import random
import warnings

import pytest
import torch

import dynalay
from helpers import make_W

CPP = dynalay.backends.availability_error("cpp") is None
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
TOLS = {torch.float64: 1e-8, torch.float32: 2e-4, torch.bfloat16: 3e-2}


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / (b.double().norm() + 1e-30))


def _draw(seed: int) -> dict:
    rnd = random.Random(seed)
    c = dict(dtype=rnd.choice([torch.float64, torch.float32, torch.float32, torch.bfloat16]),
             B=rnd.choice([1, 2, 3, 7, 31, 64, 129, 257]), H=rnd.choice([1, 2, 3, 5, 16, 20, 33, 64, 100]),
             kind=rnd.choice(["fp", "step"]), solver=rnd.choice(["picard", "picard", "anderson"]),
             norm=rnd.choice([0.5, 0.9, 0.99, 1.5]), scale=rnd.choice([0.5, 2.0]), L=rnd.choice([1, 2, 4]),
             pattern=rnd.choice(["random", "all_nop", "one_layer", "random"]), z0=rnd.random() < 0.3)
    kw = dict(tol=rnd.choice([1e-3, 1e-4, 1e-6 if c["dtype"] == torch.float64 else 1e-4]),
              max_iter=rnd.choice([3, 20, 100]), solver=c["solver"], damping=rnd.choice([1.0, 1.0, 0.7]),
              backward=rnd.choice(["implicit", "implicit", "phantom"]), check="none")
    if c["solver"] == "anderson":
        kw.update(anderson_m=rnd.choice([1, 3, 5]), anderson_lam=rnd.choice([1e-6, 1e-3, 0.0]))
    c["kw"] = kw
    return c


def _run(c: dict, seed: int, backend: str):
    g = torch.Generator().manual_seed(seed)
    dt, B, H, L = c["dtype"], c["B"], c["H"], c["L"]
    if c["kind"] == "fp":
        inj = (torch.randn(B, H, generator=g, dtype=torch.float64) * c["scale"]).to(dt)
        W = make_W(H, c["norm"], gen=g).to(dt)
        z0 = (torch.randn(B, H, generator=g, dtype=torch.float64) * 0.1).to(dt) if c["z0"] else None
        ps = [inj.requires_grad_(), W.requires_grad_()]
        r = dynalay.fixed_point(ps[0], ps[1], z0=z0, backend=backend, **c["kw"])
        out, it, conv = r.z, r.iters, r.converged
    else:
        h = torch.randn(B, H, generator=g, dtype=torch.float64).to(dt)
        U = (torch.randn(L, H, H, generator=g, dtype=torch.float64) / math.sqrt(H)).to(dt)
        W = make_W(H, c["norm"], gen=g, L=L).to(dt)
        b = (torch.randn(L, H, generator=g, dtype=torch.float64) * 0.1).to(dt)
        a = torch.randint(0, L + 1, (B,), generator=g)
        if c["pattern"] == "all_nop":
            a[:] = L
        elif c["pattern"] == "one_layer":
            a[:] = 0
        ps = [t.requires_grad_() for t in (h, U, W, b)]
        r = dynalay.dynamic_step(ps[0], a, *ps[1:], backend=backend, **c["kw"])
        out, it, conv = r.h, r.iters, r.converged
    G = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * G).sum(), ps, allow_unused=True)
    return out.detach(), it, conv, grads


def _compare(c: dict, got, ref) -> list:
    contractive = c["norm"] <= 1
    if not contractive:  # chaotic iterates: only shapes, dtypes and finiteness of what the reference has finite
        return [] if got[0].shape == ref[0].shape and got[0].dtype == ref[0].dtype else ["shape/dtype"]
    bad = []
    tol = TOLS[c["dtype"]] * (30 if c["kw"]["max_iter"] == 3 else 1)
    if _rel(got[0], ref[0]) > tol:
        bad.append(f"out rel {_rel(got[0], ref[0]):.2e}")
    di = (got[1].long() - ref[1].long()).abs()
    if c["kw"]["max_iter"] > 3 and int(di.max()) > (0 if c["dtype"] == torch.float64 else 1):
        bad.append(f"iters differ by up to {int(di.max())} ({int((di > 0).sum())} rows)")
    if int((got[2] != ref[2]).sum()) > max(1, c["B"] // 50):
        bad.append(f"converged differs in {int((got[2] != ref[2]).sum())} rows")
    for n, (x, y) in enumerate(zip(got[3], ref[3])):
        if (x is None) != (y is None):
            bad.append(f"grad {n}: None on one side")
        elif x is not None and _rel(x, y) > 10 * tol:
            bad.append(f"grad {n} rel {_rel(x, y):.2e}")
    return bad


@pytest.mark.parametrize("backend,cases", [
    pytest.param("cpp", 400, marks=pytest.mark.skipif(not CPP, reason="cpp not built")),
    pytest.param("triton", 25, marks=pytest.mark.skipif(not INTERP, reason="triton runs on CPU only under "
                                                                          "TRITON_INTERPRET=1")),
])
def test_backends_agree_with_torch_on_random_problems(backend, cases, gen):
    base = int(torch.randint(0, 2**30, (1,), generator=gen))
    failures, ran = [], 0
    for s in range(base, base + 10 * cases):
        c = _draw(s)
        if backend == "triton" and (c["solver"] == "anderson" or c["dtype"] == torch.bfloat16
                                    or c["B"] > 64 or c["H"] > 64):
            continue  # Picard only; bf16 tl.dot is wrong in the interpreter; small shapes there
        bad = _compare(c, _run(c, s, backend), _run(c, s, "torch"))
        if bad:
            failures.append(f"case seed {s} {c}: {bad}")
        ran += 1
        if ran == cases:
            break
    assert ran == cases
    assert not failures, "\n".join(failures[:10])


def _vmap_case(seed: int, backend: str) -> list:
    """One random vmap problem: dynamic_step or fixed_point, each tensor mapped or not, the mapped
    dimension at a random position; the vmap against a loop over the slices (states, iterations,
    flags) and, for shared layers, per-sample gradients against a loop of grad."""
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    dt = torch.float32 if backend == "triton" else torch.float64
    N, B, H, L = rnd.choice([1, 2, 3]), rnd.choice([1, 2, 5]), rnd.choice([1, 3, 8]), rnd.choice([1, 2, 3])
    kw = dict(tol=1e-5 if dt == torch.float32 else 1e-10, max_iter=rnd.choice([4, 200]), backend=backend,
              backward=rnd.choice(["implicit", "phantom"]), check=rnd.choice(["none", "warn"]))
    step = rnd.random() < 0.6
    if step:
        per = [(torch.randn(B, H, generator=g, dtype=dt), torch.randint(0, L + 1, (B,), generator=g),
                (torch.randn(L, H, H, generator=g, dtype=torch.float64) / math.sqrt(H)).to(dt),
                make_W(H, 0.8, gen=g, L=L).to(dt), (0.1 * torch.randn(L, H, generator=g)).to(dt)) for _ in range(N)]
        fn = lambda h, a, U, W, b: tuple(dynalay.dynamic_step(h, a, U, W, b, **kw))  # noqa: E731
    else:
        per = [(torch.randn(B, H, generator=g, dtype=dt), make_W(H, 0.8, gen=g).to(dt)) for _ in range(N)]
        fn = lambda i, w: tuple(dynalay.fixed_point(i, w, **kw))  # noqa: E731
    mapped = [rnd.random() < 0.6 for _ in per[0]]
    if not any(mapped):
        mapped[0] = True
    args, dims = [], []
    for k, m in enumerate(mapped):
        if m:
            d = rnd.randrange(per[0][k].dim() + 1)
            args.append(torch.stack([p[k] for p in per]).movedim(0, d))
            dims.append(d)
        else:
            args.append(per[0][k])
            dims.append(None)
    with warnings.catch_warnings():  # check="warn" runs the batching rules' checks; early stops warn
        warnings.simplefilter("ignore", dynalay.ConvergenceWarning)
        out = torch.func.vmap(fn, in_dims=tuple(dims))(*args)
        loop = [fn(*[p[k] if m else per[0][k] for k, m in enumerate(mapped)]) for p in per]
    bad = []
    tol = 1e-4 if dt == torch.float32 else 1e-9
    for j, name in ((0, "out"), (1, "iters"), (-1, "converged")):  # the flags are last in both results
        ref, got = torch.stack([x[j] for x in loop]), out[j]
        if j == 0 and _rel(got, ref) > tol:
            bad.append(f"{name} rel {_rel(got, ref):.2e}")
        if j != 0 and kw["max_iter"] > 4 and int((got.long() - ref.long()).abs().max()) > (dt != torch.float64):
            bad.append(f"{name} differ")
    if step and not any(mapped[2:]):  # per-sample gradients of shared layers
        h, a = torch.stack([p[0] for p in per]).flatten(0, 1), torch.stack([p[1] for p in per]).flatten()
        U, W, b = per[0][2:]

        def loss(U_, W_, b_, x, ai):
            return dynalay.dynamic_step(x[None], ai[None], U_, W_, b_, **kw).h.square().sum()
        gr = torch.func.grad(loss, argnums=(0, 1, 2, 3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dynalay.ConvergenceWarning)
            got = torch.func.vmap(gr, in_dims=(None, None, None, 0, 0))(U, W, b, h, a)
            ref = [gr(U, W, b, h[i], a[i]) for i in range(h.shape[0])]
        for k in range(4):
            if _rel(got[k], torch.stack([r[k] for r in ref])) > 10 * tol:
                bad.append(f"per-sample grad {k} rel {_rel(got[k], torch.stack([r[k] for r in ref])):.2e}")
    return [f"case seed {seed} ({'step' if step else 'fp'}, N={N} B={B} H={H} L={L}, in_dims {dims}, {kw}): "
            f"{bad}"] if bad else []


@pytest.mark.parametrize("backend,cases", [
    ("torch", 30),
    pytest.param("cpp", 60, marks=pytest.mark.skipif(not CPP, reason="cpp not built")),
    pytest.param("triton", 8, marks=pytest.mark.skipif(not INTERP, reason="triton runs on CPU only under "
                                                                         "TRITON_INTERPRET=1")),
])
def test_vmap_rules_agree_with_loops_on_random_problems(backend, cases, gen):
    """The batching rules on random problems: mapped or shared tensors, the mapped dimension at any
    position, early stops (max_iter 4), both backward modes, per-sample gradients."""
    base = int(torch.randint(0, 2**30, (1,), generator=gen))
    failures = [f for s in range(base, base + cases) for f in _vmap_case(s, backend)]
    assert not failures, "\n".join(failures[:10])
