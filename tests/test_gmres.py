"""backward_solver="gmres": the implicit backward's linear adjoint solved by restarted GMRES
(dynalay/ops/krylov.py) over each backend's grouped products, against the Picard adjoint and
finite differences."""
import os
import warnings

import pytest
import torch
from torch.library import opcheck

import dynalay
from dynalay.ops import last_backward_stats
from helpers import make_W, make_step_params

CPP = dynalay.backends.availability_error("cpp") is None
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["torch"] + (["cpp"] if CPP else []) + (["triton"] if INTERP else [])


def _grads(fn, params, G):
    ps = [p.clone().requires_grad_() for p in params]
    out = fn(*ps)
    gr = torch.autograd.grad((out * G).sum(), ps)
    return gr, {k: v.clone() for k, v in last_backward_stats.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 20), (33, 64)])
def test_gmres_adjoint_matches_picard(backend, shape, gen):
    """Gradients of fixed_point and dynamic_step (NOP rows, an empty layer) with the GMRES adjoint
    equal the Picard adjoint's at a tight tolerance; NOP rows cost nothing and pass g through."""
    B, H = shape
    dt = torch.float32 if backend == "triton" else torch.float64
    tol, rt = (1e-6, 1e-4) if dt == torch.float32 else (1e-12, 1e-9)
    kw = dict(tol=tol, max_iter=3000, backend=backend)
    inj = torch.randn(B, H, generator=gen, dtype=torch.float64).to(dt)
    W = make_W(H, 0.95, gen=gen).to(dt)
    G = torch.randn(B, H, generator=gen, dtype=torch.float64).to(dt)
    fp = {bs: _grads(lambda i, w, bs=bs: dynalay.fixed_point(i, w, backward_solver=bs, **kw).z, (inj, W), G)
          for bs in ("picard", "gmres")}
    for x, y in zip(fp["gmres"][0], fp["picard"][0]):
        torch.testing.assert_close(x, y, rtol=rt, atol=rt)
    assert bool(fp["gmres"][1]["converged"].all())
    L = 3
    h, U, Ws, b = (t.to(dt) for t in make_step_params(B, H, L, torch.float64, gen))
    a = torch.randint(0, L + 1, (B,), generator=gen)
    a[a == 1] = 0  # layer 1 empty
    a[0] = L  # a NOP row
    st = {bs: _grads(lambda h_, U_, W_, b_, bs=bs: dynalay.dynamic_step(h_, a, U_, W_, b_, backward_solver=bs,
                                                                       **kw).h, (h, U, Ws, b), G)
          for bs in ("picard", "gmres")}
    for x, y in zip(st["gmres"][0], st["picard"][0]):
        torch.testing.assert_close(x, y, rtol=rt, atol=rt)
    stats = st["gmres"][1]
    nop = a == L
    assert torch.equal(stats["iters"][nop], torch.zeros_like(stats["iters"][nop]))
    assert bool(stats["converged"].all())
    assert torch.equal(st["gmres"][0][0][nop], G[nop])  # NOP rows pass g through


def test_gmres_needs_fewer_products_on_a_slow_problem(gen):
    """Symmetric W with eigenvalues up to 0.99: the Picard adjoint contracts slowly; GMRES needs
    at most a third of its products with W for the same tolerance, and the same gradients."""
    B, H = 16, 48
    W = make_W(H, 0.99, kind="sym", gen=gen)
    inj = 0.3 * torch.randn(B, H, generator=gen, dtype=torch.float64)
    G = torch.randn(B, H, generator=gen, dtype=torch.float64)
    res = {bs: _grads(lambda i, w, bs=bs: dynalay.fixed_point(i, w, tol=1e-10, max_iter=5000, backward_solver=bs,
                                                              backend="torch").z, (inj, W), G)
           for bs in ("picard", "gmres")}
    for x, y in zip(res["gmres"][0], res["picard"][0]):
        torch.testing.assert_close(x, y, rtol=1e-7, atol=1e-8)
    it_p, it_g = (res[bs][1]["iters"].double().mean() for bs in ("picard", "gmres"))
    assert it_g <= it_p / 3, (float(it_g), float(it_p))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gmres_reports_and_freezes(backend, gen):
    """Rows whose gradient is 0 converge at the first evaluation with u = 0; too small a
    backward_max_iter is reported (warning, or NotConvergedError with check="raise") with per-row
    flags; the stopping rule is the solvers' relative residual."""
    B, H = 6, 16
    dt = torch.float32 if backend == "triton" else torch.float64
    inj = torch.randn(B, H, generator=gen, dtype=torch.float64).to(dt)
    W = make_W(H, 0.95, kind="sym", gen=gen).to(dt)
    G = torch.randn(B, H, generator=gen, dtype=torch.float64).to(dt)
    G[2] = 0
    kw = dict(tol=1e-5, max_iter=500, backend=backend, backward_solver="gmres")
    gr, st = _grads(lambda i, w: dynalay.fixed_point(i, w, **kw).z, (inj, W), G)
    assert int(st["iters"][2]) == 1 and bool(st["converged"][2]) and float(gr[0][2].abs().max()) == 0
    assert bool((st["residual"] < 1e-5).all())
    with pytest.warns(dynalay.ConvergenceWarning, match="backward"):
        _, st = _grads(lambda i, w: dynalay.fixed_point(i, w, backward_max_iter=3, **kw).z, (inj, W), G)
    assert int(st["iters"].max()) == 3 and not bool(st["converged"][0])
    with pytest.raises(dynalay.NotConvergedError, match="backward"):
        _grads(lambda i, w: dynalay.fixed_point(i, w, backward_max_iter=3, check="raise", **kw).z, (inj, W), G)


def test_gmres_is_a_backward_solver_only():
    inj, W = torch.randn(2, 3), 0.1 * torch.eye(3)
    with pytest.raises(ValueError, match="backward_solver='gmres'"):
        dynalay.fixed_point(inj, W, solver="gmres")
    with pytest.raises(ValueError, match="backward_solver must be one of"):
        dynalay.fixed_point(inj, W, backward_solver="cg")


def test_gmres_gradcheck_opcheck_compile(gen):
    """gradcheck in float64 through the GMRES adjoint, opcheck of the adjoint op with it, and
    torch.compile(fullgraph=True) of a solve whose backward uses it."""
    H = 5
    W = make_W(H, 0.7, gen=gen).requires_grad_()
    inj = torch.randn(3, H, generator=gen, dtype=torch.float64, requires_grad=True)
    f = lambda i, w: dynalay.fixed_point(i, w, tol=1e-13, max_iter=500, backward_solver="gmres").z  # noqa: E731
    assert torch.autograd.gradcheck(f, (inj, W), eps=1e-6, atol=1e-7)
    z = dynalay.fixed_point(inj.detach(), W.detach(), tol=1e-12, max_iter=500).z
    g = torch.randn(3, H, generator=gen, dtype=torch.float64)
    opcheck(torch.ops.dynalay.fixed_point_adjoint, (z, g, W.detach()[None], None, 1e-10, 200, "gmres", 1.0, 5, 1e-6,
                                                   1e-12, "torch", "warn"))

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True)  # the backward (AOTAutograd) calls the adjoint op with gmres
    got = torch.autograd.grad(cf(inj, W).square().sum(), (inj, W))
    ref = torch.autograd.grad(f(inj, W).square().sum(), (inj, W))
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_gmres_per_sample_gradients(gen):
    """vmap(grad) with the GMRES adjoint: the batching rule of the adjoint op folds the samples."""
    H = 6
    W = make_W(H, 0.9, gen=gen)
    x = torch.randn(4, H, generator=gen, dtype=torch.float64)
    loss = lambda w, xi: dynalay.fixed_point(xi[None], w, tol=1e-12, max_iter=500,  # noqa: E731
                                             backward_solver="gmres").z.square().sum()
    got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(W, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = torch.stack([torch.func.grad(loss)(W, xi) for xi in x])
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-11)
