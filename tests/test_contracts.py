"""Input contracts and tracing, from an audit of the public API (session 17): each test is a
case that crashed, failed to trace or silently misbehaved before its fix."""
import math
import os
import sys
import warnings

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import dynalay
from dynalay.models import DynaLay, DynaLayConfig
from helpers import make_W, make_step_params

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
CPP = dynalay.backends.availability_error("cpp") is None
BACKENDS = ["torch"] + (["cpp"] if CPP else []) + (["triton"] if INTERP else [])


def _step_inputs(gen, B=7, H=8, L=3, dtype=torch.float32):
    h, U, W, b = make_step_params(B, H, L, dtype, gen)
    actions = torch.randint(0, L + 1, (B,), generator=gen)
    return h, actions, U, W, b


# ------------------------------------------------------------------ shapes and settings
@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamic_step_rejects_zero_features(backend):
    """H = 0 killed the process (SIGFPE in the cpp kernel); now a ValueError naming h."""
    h, U, W, b = torch.zeros(3, 0), torch.zeros(2, 0, 0), torch.zeros(2, 0, 0), torch.zeros(2, 0)
    with pytest.raises(ValueError, match="h must have at least one feature"):
        dynalay.dynamic_step(h, torch.zeros(3, dtype=torch.int64), U, W, b, backend=backend)


@pytest.mark.parametrize("make", [lambda **k: dynalay.nn.DynamicFPIStep(2, 0, **k),
                                  lambda **k: dynalay.nn.FPILayer(5, 0, **k),
                                  lambda **k: dynalay.nn.FPILayer(0, 5, **k)])
def test_modules_reject_zero_sizes(make):
    with pytest.raises(ValueError, match="must be an int >= 1"):
        make()


@pytest.mark.parametrize("bound", [0.0, -0.5, float("nan"), float("inf"), True])
@pytest.mark.parametrize("cls", ["fpi", "step"])
def test_spectral_bound_zero_is_an_error_not_off(bound, cls):
    """spectral_bound=0.0 used to read as None and leave W unconstrained."""
    with pytest.raises(ValueError, match="spectral_bound"):
        if cls == "fpi":
            dynalay.nn.FPILayer(4, 6, spectral_bound=bound)
        else:
            dynalay.nn.DynamicFPIStep(2, 6, spectral_bound=bound)
    assert dynalay.nn.FPILayer(4, 6, spectral_bound=None).spectral is None


def test_backend_argument_is_validated_with_a_clear_error():
    with pytest.raises(TypeError, match="backend must be a str"):
        dynalay.fixed_point(torch.zeros(2, 3), torch.zeros(3, 3), backend=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        dynalay.nn.FPILayer(3, 4, backend="nope")  # at construction, not at the first forward


@pytest.mark.parametrize("kw,match", [(dict(max_iter=2**63), "max_iter"), (dict(max_iter=2**31), "max_iter"),
                                      (dict(eps=1e-50), "eps"), (dict(eps=0.0), "eps"),
                                      (dict(tol=float("nan")), "tol"), (dict(tol=float("inf")), "tol"),
                                      (dict(anderson_lam=float("nan")), "anderson_lam")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_solver_settings_out_of_range(kw, match, backend):
    """max_iter beyond int32 hit a dispatcher schema error on cpp; an eps that is 0 in float32
    made torch report NaN residuals where cpp converged."""
    with pytest.raises(ValueError, match=match):
        dynalay.fixed_point(torch.zeros(2, 3), torch.zeros(3, 3), backend=backend, **kw)


# ------------------------------------------------------------------ the torch backend
@pytest.mark.parametrize("op", ["fixed_point", "dynamic_step"])
def test_torch_backend_outputs_are_contiguous_for_strided_inputs(op, gen):
    """torch_ref returned the input's layout (a transposed inj gave strides (1, B)); the fake
    kernels promise contiguous outputs, so opcheck and torch.compile failed on such inputs."""
    if op == "fixed_point":
        inj = torch.randn(8, 5, generator=gen).t()
        W = make_W(8, 0.8, dtype=torch.float32, gen=gen).t()
        out = dynalay.fixed_point(inj, W, backend="torch").z
        ref = dynalay.fixed_point(inj.contiguous(), W.contiguous(), backend="torch").z
        fn = lambda i: dynalay.fixed_point(i, W, backend="torch").z.sin()  # noqa: E731
        x = inj
    else:
        h, a, U, W, b = _step_inputs(gen)
        x = h.t().contiguous().t()
        out = dynalay.dynamic_step(x, a, U, W, b, backend="torch").h
        ref = dynalay.dynamic_step(h, a, U, W, b, backend="torch").h
        fn = lambda i: dynalay.dynamic_step(i, a, U, W, b, backend="torch").h.sin()  # noqa: E731
    assert out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)  # a strided GEMM may round differently
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x), out.sin(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("H,dtype", [(1, torch.float32), (1, torch.float64), (2, torch.float32)])
def test_anderson_without_ridge_falls_back_on_a_singular_mix(H, dtype, gen):
    """anderson_lam=0 (allowed) made torch.linalg.solve raise on a singular Gram matrix; a
    degenerate mix now takes the plain step, as documented."""
    inj = torch.randn(4, H, generator=gen, dtype=dtype)
    W = make_W(H, 0.9, dtype=dtype, gen=gen)
    for backward_solver in (None, "anderson"):
        i = inj.clone().requires_grad_()
        r = dynalay.fixed_point(i, W, solver="anderson", anderson_lam=0.0, backward_solver=backward_solver,
                                backend="torch", max_iter=200, check="raise")
        r.z.sum().backward()
        assert bool(r.converged.all())
        assert torch.isfinite(i.grad).all()
        # the reference in float64: fp32 cannot always reach a relative residual of 1e-6 when
        # ||W|| = 0.9 (round-off amplified ~10x; 5% of seeds at H=1 failed before)
        ref = dynalay.fixed_point(inj.double(), W.double(), backend="torch", tol=1e-10, max_iter=1000,
                                  check="raise").z
        torch.testing.assert_close(r.z, ref.to(dtype), atol=1e-3, rtol=0)


@pytest.mark.skipif(not CPP, reason="cpp backend not built")
@pytest.mark.parametrize("H", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_anderson_without_ridge_agrees_across_backends_when_history_exceeds_H(H, dtype, gen):
    """With anderson_lam=0 and m > H the Gram matrix of the m residuals is singular in exact
    arithmetic; each backend's mix followed its own rounding noise (iteration counts differed by
    up to 52 on the same problem, found by a differential fuzz).  Now at most H pairs are mixed,
    and torch and cpp agree."""
    inj = torch.randn(129, H, generator=gen, dtype=dtype)
    W = make_W(H, 0.9, dtype=dtype, gen=gen)
    out = [dynalay.fixed_point(inj, W, solver="anderson", anderson_m=5, anderson_lam=0.0, backend=be, max_iter=100,
                               check="none") for be in ("torch", "cpp")]
    assert out[0].converged.all() and out[1].converged.all()
    assert (out[0].iters.long() - out[1].iters.long()).abs().max() <= (0 if dtype == torch.float64 else 1)
    torch.testing.assert_close(out[1].z, out[0].z, atol=1e-4 if dtype == torch.float32 else 1e-9, rtol=0)


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if INTERP else []))
def test_out_of_range_actions_with_check_none_keep_the_state(backend, gen):
    """With check='none' nothing validates the actions; an out-of-range row used to come back
    as zeros from the torch backend (the Triton kernel keeps h).  Both keep h now, with
    converged False; cpp checks the range for free and raises."""
    h, a, U, W, b = _step_inputs(gen, L=2)
    a = torch.tensor([0, 1, 2, 5, -1, 1, 0])
    r = dynalay.dynamic_step(h, a, U, W, b, backend=backend, check="none")
    assert torch.equal(r.h[3:5], h[3:5])
    assert r.converged[3:5].tolist() == [False, False] and r.iters[3:5].tolist() == [0, 0]
    ok = torch.tensor([0, 1, 2, 5, -1, 1, 0]).clamp(0, 2)
    ref = dynalay.dynamic_step(h, torch.where((a < 0) | (a > 2), 2, ok), U, W, b, backend=backend)
    assert torch.equal(r.h, ref.h)
    if CPP:
        with pytest.raises(RuntimeError, match="actions must lie in"):
            dynalay.dynamic_step(h, a, U, W, b, backend="cpp", check="none")


# ------------------------------------------------------------------ tracing
def test_compile_with_a_float_argument_that_changes(gen):
    """A tol that changes between calls (or dynamic=True) arrives as a SymFloat; validation used
    math.isfinite on it and broke fullgraph compilation."""
    inj = torch.randn(6, 8, generator=gen)
    W = make_W(8, 0.9, dtype=torch.float32, gen=gen)

    def f(i, tol, pd):
        r = dynalay.fixed_point(i, W, tol=tol, backward="phantom", phantom_damping=pd)
        return r.z, r.iters

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True)
    for tol, pd in ((1e-2, 0.5), (1e-5, 0.5), (1e-6, 0.7)):
        z, it = cf(inj, tol, pd)
        z_ref, it_ref = f(inj, tol, pd)
        assert torch.equal(it, it_ref) and torch.equal(z, z_ref)


@pytest.mark.parametrize("what", ["fpi", "step"])
def test_compile_dynamic_true(what, gen):
    torch._dynamo.reset()
    if what == "fpi":
        mod = dynalay.nn.FPILayer(4, 8)
        args = [(torch.randn(B, 4, generator=gen),) for B in (5, 7)]
    else:
        mod = dynalay.nn.DynamicFPIStep(2, 8)
        args = [(torch.randn(B, 8, generator=gen), torch.randint(0, 3, (B,), generator=gen)) for B in (5, 9)]
    mod.eval()  # in training mode every forward advances the spectral bound's power iteration
    cm = torch.compile(mod, fullgraph=True, dynamic=True)
    for a in args:
        out, ref = cm(*a), mod(*a)
        out, ref = (out.h, ref.h) if what == "step" else (out, ref)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("check", ["warn", "raise"])
@pytest.mark.parametrize("mode", ["fake", "symbolic"])
def test_make_fx_with_the_default_checks(check, mode, gen):
    """The data-dependent checks (NaN/Inf scan, convergence report) are skipped under any
    tracing mode, as under torch.compile; make_fx raised on the C++ scan op before."""
    inj = torch.randn(5, 8, generator=gen)
    W = make_W(8, 0.9, dtype=torch.float32, gen=gen)
    h, a, U, Ws, b = _step_inputs(gen)
    g1 = make_fx(lambda i, w: dynalay.fixed_point(i, w, check=check).z, tracing_mode=mode)(inj, W)
    g2 = make_fx(lambda *t: dynalay.dynamic_step(*t, check=check).h, tracing_mode=mode)(h, a, U, Ws, b)
    assert torch.equal(g1(inj, W), dynalay.fixed_point(inj, W).z)
    assert torch.equal(g2(h, a, U, Ws, b), dynalay.dynamic_step(h, a, U, Ws, b).h)


@pytest.mark.parametrize("check", ["warn", "raise"])
def test_opcheck_with_the_default_checks(check, gen):
    inj = torch.randn(5, 8, generator=gen, requires_grad=True)
    W = make_W(8, 0.9, dtype=torch.float32, gen=gen).requires_grad_()
    from dynalay.ops.fixed_point import fixed_point_fwd, prepare_solve_args
    args = (inj, W.unsqueeze(0), None, None) + prepare_solve_args(
        1e-4, 50, "picard", 1.0, 5, 1e-6, 1e-12, "implicit", None, None, None, 5, 0.5, check) + ("torch", "torch")
    torch.library.opcheck(fixed_point_fwd, args)


def test_meta_tensors_propagate_shapes():
    inj, W = torch.empty(4, 8, device="meta"), torch.empty(8, 8, device="meta")
    r = dynalay.fixed_point(inj, W)
    assert r.z.shape == (4, 8) and r.z.is_meta and r.iters.dtype == torch.int32
    h, U, Ws, b = (torch.empty(4, 8, device="meta"), torch.empty(2, 8, 8, device="meta"),
                   torch.empty(2, 8, 8, device="meta"), torch.empty(2, 8, device="meta"))
    s = dynalay.dynamic_step(h, torch.zeros(4, dtype=torch.int64, device="meta"), U, Ws, b)
    assert s.h.shape == (4, 8) and s.h.is_meta


# ------------------------------------------------------------------ the model's inputs and knobs
@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return DynaLay(DynaLayConfig(in_features=6, hidden=16, num_classes=3)).eval()


@pytest.mark.parametrize("fused", [None, False])
def test_model_rejects_non_finite_inputs_and_knobs(small_model, fused):
    """x with NaN, a W with an Inf (tanh can saturate it into finite, wrong logits) and lam=NaN
    (silently other decisions) ran without a word."""
    m, x = small_model, torch.randn(5, 6)
    with torch.no_grad():
        bad_x = x.clone()
        bad_x[2, 1] = float("nan")
        with pytest.raises(ValueError, match="x contains NaN"):
            m.run(bad_x, fused=fused)
        W = m.pool.effective_weight().clone()
        m.run(x, W=W, fused=fused)
        W[0, 0, 0] = float("inf")  # in place: a new version of the same tensor is scanned again
        with pytest.raises(ValueError, match="W contains NaN"):
            m.run(x, W=W, fused=fused)
        for bad in (dict(lam=float("nan")), dict(lam=-1.0), dict(lam=torch.full((5,), float("nan"))),
                    dict(budget=float("nan")), dict(budget=math.inf), dict(nop_bias=float("nan")),
                    dict(exit_threshold=float("nan"), policy="forced", forced=m.static_actions(5, None, x.device))):
            with pytest.raises(ValueError, match=next(iter(k for k in bad if k not in ("policy", "forced")))):
                m.run(x, fused=fused, **bad)
        with pytest.raises(ValueError, match="int64 table"):
            m.run(x, policy="forced", forced=torch.zeros(5, m.cfg.max_steps, dtype=torch.int32), fused=fused)
        with pytest.raises(ValueError, match="nop_bias applies to the agent"):
            m.run(x, policy="forced", forced=m.static_actions(5, None, x.device), nop_bias=1.0, fused=fused)
        with pytest.raises(TypeError, match="floating-point"):
            m.run(x.long(), fused=fused)
        m.run(x, nop_bias=math.inf, fused=fused)  # +-inf is a documented extreme of the knob


@pytest.mark.parametrize("name, bad", [("pool.b", float("nan")), ("pool.W", float("inf")),
                                       ("pool.W", -float("inf"))])
@pytest.mark.parametrize("fused", [True, False])
def test_model_names_a_non_finite_parameter(name, bad, fused):
    """Also an Inf in the pool's W on the fused path, whose solves from 0 skip their first GEMM
    without scanning W (run_model): the spectral bound turns it into NaNs, which propagate."""
    torch.manual_seed(1)
    m = DynaLay(DynaLayConfig(in_features=6, hidden=16, num_classes=3)).eval()
    with torch.no_grad():
        m.get_parameter(name).view(-1)[0] = bad
        with pytest.raises(ValueError, match=f"parameter {name}"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.run(torch.randn(4, 6), fused=fused)


# ------------------------------------------------------------------ torch.autocast
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_autocast_casts_the_inputs_like_a_matmul(backend, gen):
    """Under torch.autocast an FPILayer's ``U x`` comes out bfloat16 while its W stays float32:
    the solve raised "W has dtype float32 but must match bfloat16".  Now the floating inputs
    (not float64) go to the autocast dtype, as for a matmul, and the solve still iterates in
    float32; the spectral bound's sigma stays in W's precision."""
    bf = torch.bfloat16
    layer = dynalay.nn.FPILayer(10, 24, backend=backend).eval()
    x = torch.randn(9, 10, generator=gen)
    W_plain = layer.effective_weight()
    with torch.autocast("cpu", dtype=bf):
        z = layer(x)
        inj = layer.U(x)
        W_ac = layer.effective_weight()
    assert inj.dtype == bf and z.dtype == bf
    assert W_ac.dtype == torch.float32 and torch.equal(W_ac, W_plain)  # sigma not computed in bf16
    assert torch.equal(z, dynalay.fixed_point(inj, W_plain.to(bf), backend=backend).z)
    layer.train()
    with torch.autocast("cpu", dtype=bf):
        z = layer(x)
    z.float().square().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()
    assert layer.weight.grad.abs().sum() > 0
    # a backward called inside the autocast region (torch's docs advise against it, but it
    # happens): the solve's own backward (the torch backend's matmuls, the phantom steps) stays
    # in float32 and gives the gradients of a backward outside it, bit for bit
    inj0 = torch.randn(9, 24, generator=gen).to(bf)
    for backward in ("implicit", "phantom"):
        grads = []
        for inside in (False, True):
            i_, w_ = inj0.clone().requires_grad_(), W_plain.detach().clone().requires_grad_()
            with torch.autocast("cpu", dtype=bf):
                z = dynalay.fixed_point(i_, w_, backend=backend, backward=backward).z
                if inside:
                    z.float().square().sum().backward()
            if not inside:
                z.float().square().sum().backward()
            grads.append((i_.grad, w_.grad))
        for g0, g1 in zip(*grads):
            assert g0.abs().sum() > 0 and torch.equal(g0, g1), backward
        assert grads[0][1].dtype == torch.float32

    # dynamic_step: fp32 inputs give the result of explicitly cast inputs, bit for bit
    h, a, U, W, b = _step_inputs(gen, B=11, H=12, L=3)
    with torch.autocast("cpu", dtype=bf):
        r = dynalay.dynamic_step(h, a, U, W, b, backend=backend)
        step = torch.compile(lambda h: dynalay.dynamic_step(h, a, U, W, b, backend=backend).h, fullgraph=True,
                             backend="aot_eager")(h)
    ref = dynalay.dynamic_step(h.to(bf), a, U.to(bf), W.to(bf), b.to(bf), backend=backend)
    assert r.h.dtype == bf and torch.equal(r.h, ref.h) and torch.equal(r.iters, ref.iters)
    assert torch.equal(step, ref.h)
    # float64 is not cast (as for a matmul), and outside autocast mismatched dtypes stay an error
    h64, a64, U64, W64, b64 = _step_inputs(gen, B=5, H=6, L=2, dtype=torch.float64)
    with torch.autocast("cpu", dtype=bf):
        assert dynalay.dynamic_step(h64, a64, U64, W64, b64, backend=backend).h.dtype == torch.float64
    with pytest.raises(TypeError, match="W has dtype torch.float32 but must match torch.bfloat16"):
        dynalay.fixed_point(inj, W_plain, backend=backend)


# ------------------------------------------------------------------ torch.func
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("backward", ["implicit", "phantom"])
def test_torch_func_transforms(backend, backward, gen):
    """torch.func failed everywhere: vmap in the NaN scan (no batching rule), grad and jacrev on
    an autograd.Function without setup_context.  Now vmap runs the registered op once per mapped
    slice (fixed_point: the mapped dimension folded into the rows, one call), grad and jacrev run
    the eager autograd.Function, per-sample gradients (grad inside vmap) fold the samples into rows,
    all equal to a loop / torch.autograd; what cannot work (forward mode, grad of grad) says so."""
    N, B, H, L = 3, 5, 8, 2
    kw = dict(tol=1e-10, max_iter=200, backend=backend, backward=backward)
    inj = torch.randn(N, B, H, generator=gen, dtype=torch.float64, requires_grad=True)
    Ws = torch.stack([make_W(H, 0.8, gen=gen) for _ in range(N)]).requires_grad_()
    fp = lambda i, w: dynalay.fixed_point(i, w, **kw).z  # noqa: E731
    for in_dims, args in (((0, None), (inj, Ws[0])), ((0, 0), (inj, Ws))):
        out = torch.func.vmap(fp, in_dims=in_dims)(*args)
        loop = torch.stack([fp(inj[n], args[1][n] if in_dims[1] == 0 else args[1]) for n in range(N)])
        # one solve over the folded rows: a GEMM of other shape may round differently
        torch.testing.assert_close(out, loop, rtol=1e-12, atol=1e-12)
        gv = torch.autograd.grad(out.square().sum(), args)
        gl = torch.autograd.grad(loop.square().sum(), args)
        for a, b in zip(gv, gl):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # z0 mapped too, W not mapped while inj is not: statistics as in a loop
    z0s = 0.1 * torch.randn(N, B, H, generator=gen, dtype=torch.float64)
    full = lambda i, w, z: dynalay.fixed_point(i, w, z0=z, **kw)  # noqa: E731
    for in_dims, args in (((0, 0, 0), (inj.detach(), Ws.detach(), z0s)), ((None, 0, 0), (inj[0].detach(), Ws.detach(), z0s))):
        r = torch.func.vmap(full, in_dims=in_dims)(*args)
        loop = [full(*[a[n] if d == 0 else a for a, d in zip(args, in_dims)]) for n in range(N)]
        torch.testing.assert_close(r.z, torch.stack([x.z for x in loop]), rtol=1e-12, atol=1e-12)
        assert torch.equal(r.iters, torch.stack([x.iters for x in loop]))
        assert torch.equal(r.converged, torch.stack([x.converged for x in loop]))
    # grad and jacrev against torch.autograd
    i0, w0 = inj[0].detach(), Ws[0].detach()
    got = torch.func.grad(lambda i, w: fp(i, w).square().sum(), argnums=(0, 1))(i0, w0)
    i_, w_ = i0.clone().requires_grad_(), w0.clone().requires_grad_()
    ref = torch.autograd.grad(fp(i_, w_).square().sum(), (i_, w_))
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    J = torch.func.jacrev(fp, argnums=(0, 1))(i0[:2], w0)
    Jr = torch.autograd.functional.jacobian(fp, (i0[:2], w0))
    for a_, b_ in zip(J, Jr):  # jacrev's backward runs once over the folded basis vectors: rounding
        torch.testing.assert_close(a_, b_, rtol=1e-12, atol=1e-12)
    h, a, U, W, b = _step_inputs(gen, B=6, H=8, L=2, dtype=torch.float64)
    st = lambda h_, U_, W_, b_: dynalay.dynamic_step(h_, a, U_, W_, b_, **kw).h  # noqa: E731
    hs = torch.randn(N, 6, 8, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(st, in_dims=(0, None, None, None))(hs, U, W, b),
                               torch.stack([st(x, U, W, b) for x in hs]), rtol=1e-12, atol=1e-12)
    got = torch.func.grad(lambda *p: st(*p).square().sum(), argnums=(0, 1, 2, 3))(h, U, W, b)
    ps = [t.clone().requires_grad_() for t in (h, U, W, b)]
    ref = torch.autograd.grad(st(*ps).square().sum(), ps)
    # torch.func.grad runs the backward with create_graph (functorch always does), so it takes the
    # generic path, whose helper ops autograd records, not cpp's one fused call: db, a sum over a
    # group's rows, is a GEMM column there and at::sum in the fused call, and differs in its last
    # bit for ~3% of draws (measured: 7 of 200 seeds, 2-4e-16); every other gradient was bitwise
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-14)
    if backend == "torch":  # one path: bit for bit
        assert all(torch.equal(x, y) for x, y in zip(got, ref))
    # what cannot work says so
    with pytest.raises(RuntimeError, match="dynalay.fixed_point does not support forward-mode AD"):
        torch.func.jacfwd(lambda i: fp(i, w0))(i0)
    with pytest.raises(RuntimeError, match="dynalay.dynamic_step does not support forward-mode AD"):
        torch.func.jvp(lambda x: st(x, U, W, b), (h,), (h,))
    # per-sample gradients (grad inside vmap): the backward's helper ops fold the samples into rows
    # and their weight reductions come out per sample; equal to a loop of torch.func.grad
    ps_fp = lambda w, i: fp(i[None], w).square().sum()  # noqa: E731
    got = torch.func.vmap(torch.func.grad(ps_fp, argnums=(0, 1)), in_dims=(None, 0))(w0, i0)
    for k, ref in enumerate(zip(*[torch.func.grad(ps_fp, argnums=(0, 1))(w0, x) for x in i0])):
        torch.testing.assert_close(got[k], torch.stack(ref), rtol=1e-10, atol=1e-12)
    def ps_st(U_, W_, b_, h_, a_):
        return dynalay.dynamic_step(h_[None], a_[None], U_, W_, b_, **kw).h.square().sum()
    a_ps = a.clone()
    a_ps[0] = U.shape[0]  # a NOP sample: its weight gradients are 0, its h gradient passes through
    dims = (None, None, None, 0, 0)
    got = torch.func.vmap(torch.func.grad(ps_st, argnums=(0, 1, 2, 3)), in_dims=dims)(U, W, b, h, a_ps)
    loop = [torch.func.grad(ps_st, argnums=(0, 1, 2, 3))(U, W, b, h[i], a_ps[i]) for i in range(h.shape[0])]
    for k, ref in enumerate(zip(*loop)):
        torch.testing.assert_close(got[k], torch.stack(ref), rtol=1e-10, atol=1e-12)
    assert got[0][0].abs().max() == 0 and torch.equal(got[3][0], 2 * h[0])
    gg = lambda i: torch.func.grad(lambda i: torch.func.grad(lambda j: fp(j, w0).square().sum())(i).sum())(i)  # noqa
    if backward == "implicit":
        with pytest.raises(RuntimeError, match="gradients of gradients"):
            gg(i0)
    else:  # the phantom steps are torch ops: their gradient in inj differentiates again, as torch.autograd does
        i_ = i0.clone().requires_grad_()
        g1, = torch.autograd.grad(fp(i_, w0).square().sum(), i_, create_graph=True)
        assert torch.equal(gg(i0), torch.autograd.grad(g1.sum(), i_)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_dynamic_step_folds_into_rows(backend, gen):
    """vmap over dynamic_step ran one step per slice (torch's fallback).  Now the mapped
    dimension folds into the rows: one step over N*B rows; mapped layers become a stack of N*L
    layers that each slice's actions index.  Every in_dims pattern equals a loop over the slices:
    states (to rounding: one GEMM of another shape), iteration counts and flags exactly, and the
    gradients that flow back through the vmapped output."""
    N, B, H, L = 3, 6, 8, 2
    dt = torch.float32 if backend == "triton" else torch.float64
    tol = 1e-5 if dt == torch.float32 else 1e-12
    kw = dict(tol=1e-6 if dt == torch.float32 else 1e-10, max_iter=200, backend=backend)
    hs = torch.randn(N, B, H, generator=gen, dtype=dt)
    acts = torch.randint(0, L + 1, (N, B), generator=gen)
    acts[0] = L  # one slice all NOP
    acts[1, :3] = 0  # a layer skewed
    params = [make_step_params(B, H, L, dt, gen)[1:] for _ in range(N)]
    Us, Ws, bs = (torch.stack(t) for t in zip(*params))
    step = lambda h, a, U, W, b: dynalay.dynamic_step(h, a, U, W, b, **kw)  # noqa: E731
    full = (hs, acts, Us, Ws, bs)
    one = (hs[0], acts[1], Us[0], Ws[0], bs[0])
    calls = 0
    mod = sys.modules["dynalay.ops.dispatch"]  # the module (dynalay.ops.dispatch is the function)
    orig = mod._step_forward

    def counting(*a):
        nonlocal calls
        calls += 1
        return orig(*a)

    for in_dims in ((0, None, None, None, None), (0, 0, None, None, None), (None, 0, None, None, None),
                    (0, 0, None, 0, None), (0, 0, 0, 0, 0), (None, None, 0, None, 0), (0, None, 0, 0, 0)):
        args = [f if d == 0 else o for f, o, d in zip(full, one, in_dims)]
        ps = [a.clone().requires_grad_(a.is_floating_point()) for a in args]
        mod._step_forward, calls = counting, 0
        try:
            r = torch.func.vmap(step, in_dims=in_dims)(*ps)
        finally:
            mod._step_forward = orig
        assert calls == 1, in_dims  # one folded step, not one per slice
        qs = [a.clone().requires_grad_(a.is_floating_point()) for a in args]
        loop = [step(*[q[n] if d == 0 else q for q, d in zip(qs, in_dims)]) for n in range(N)]
        ref_h = torch.stack([x.h for x in loop])
        torch.testing.assert_close(r.h, ref_h, rtol=tol, atol=tol)
        assert torch.equal(r.iters, torch.stack([x.iters for x in loop])), in_dims
        assert torch.equal(r.converged, torch.stack([x.converged for x in loop])), in_dims
        G = torch.randn(N, B, H, generator=gen, dtype=dt)
        fl = [i for i, p in enumerate(ps) if p.requires_grad]
        gv = torch.autograd.grad((r.h * G).sum(), [ps[i] for i in fl])
        gl = torch.autograd.grad((ref_h * G).sum(), [qs[i] for i in fl])
        for i, x, y in zip(fl, gv, gl):
            torch.testing.assert_close(x, y, rtol=10 * tol, atol=10 * tol, msg=f"grad {i} for in_dims {in_dims}")
    # per-sample gradients of shared layers (grad inside vmap), both backward modes
    h, a = hs[1], acts[1]
    for bw in ("implicit", "phantom"):
        def f(U, W, b, x, ai, bw=bw):
            return dynalay.dynamic_step(x[None], ai[None], U, W, b, backward=bw, **kw).h.square().sum()
        got = torch.func.vmap(torch.func.grad(f, argnums=(0, 1, 2, 3)), in_dims=(None, None, None, 0, 0))(
            Us[0], Ws[0], bs[0], h, a)
        loop = [torch.func.grad(f, argnums=(0, 1, 2, 3))(Us[0], Ws[0], bs[0], h[i], a[i]) for i in range(B)]
        for k, ref in enumerate(zip(*loop)):
            torch.testing.assert_close(got[k], torch.stack(ref), rtol=10 * tol, atol=10 * tol, msg=f"{bw} grad {k}")


def test_vmap_ensemble_of_dynamic_steps(gen):
    """An ensemble of DynamicFPIStep modules through torch.func.stack_module_state +
    functional_call + vmap (the README's example): one folded step equal to calling each module,
    and gradients for the stacked parameters equal to each module's own."""
    import copy
    from torch.func import functional_call, stack_module_state, vmap
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    ms = [dynalay.nn.DynamicFPIStep(3, 16, dtype=torch.float64) for _ in range(4)]
    params, buffers = stack_module_state(ms)
    base = copy.deepcopy(ms[0]).to("meta")
    h = torch.randn(10, 16, generator=gen, dtype=torch.float64)
    a = torch.randint(0, 4, (10,), generator=gen)
    out = vmap(lambda p, bu: functional_call(base, (p, bu), (h, a)).h, in_dims=(0, 0))(params, buffers)
    refs = [m(h, a).h for m in ms]
    torch.testing.assert_close(out, torch.stack(refs), rtol=1e-12, atol=1e-12)
    gs = torch.autograd.grad(out.square().sum(), [params[k] for k in ("U", "W", "b")])
    for i, (m, r) in enumerate(zip(ms, refs)):
        gm = torch.autograd.grad(r.square().sum(), [getattr(m, k) for k in ("U", "W", "b")])
        for x, y in zip(gs, gm):
            torch.testing.assert_close(x[i], y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_torch_export_with_a_dynamic_batch(backend, gen, tmp_path):
    """torch.export of a module with an FPILayer and a DynamicFPIStep (the deploy path): the
    custom ops appear in the graph, a symbolic batch dimension works (fake kernels with static
    shape formulas), and the program, also saved and loaded, equals the module at other batch
    sizes, B=1 included."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fpi = dynalay.nn.FPILayer(12, 20, backend=backend)
            self.step = dynalay.nn.DynamicFPIStep(3, 20, backend=backend)

        def forward(self, x, a):
            return self.step(self.fpi(x), a).h

    net = Net().eval()
    x, a = torch.randn(8, 12, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    B = torch.export.Dim("B", min=1)
    ep = torch.export.export(net, (x, a), dynamic_shapes={"x": {0: B}, "a": {0: B}})
    code = ep.graph_module.code
    assert "dynalay.fixed_point_fwd" in code and "dynalay.dynamic_step" in code
    path = tmp_path / "net.pt2"
    torch.export.save(ep, str(path))
    loaded = torch.export.load(str(path))
    for n in (1, 5, 33):
        xn, an = torch.randn(n, 12, generator=gen), torch.randint(0, 4, (n,), generator=gen)
        ref = net(xn, an)
        assert torch.equal(ep.module()(xn, an), ref)
        assert torch.equal(loaded.module()(xn, an), ref)


def test_compiled_vmap_uses_the_batching_rule(gen):
    """torch.compile(fullgraph=True) over torch.func.vmap of fixed_point and dynamic_step: no graph
    break, equal to the eager vmap (its batching rules)."""
    torch._dynamo.reset()
    H, L = 8, 2
    W = make_W(H, 0.8, gen=gen)
    x = torch.randn(4, 3, H, generator=gen, dtype=torch.float64)
    f = lambda i: dynalay.fixed_point(i, W, tol=1e-10, max_iter=200).z  # noqa: E731
    torch.testing.assert_close(torch.compile(torch.func.vmap(f), fullgraph=True)(x), torch.func.vmap(f)(x),
                               rtol=1e-12, atol=1e-12)
    h, a, U, Ws, b = _step_inputs(gen, B=5, H=H, L=L, dtype=torch.float64)
    hs = torch.randn(4, 5, H, generator=gen, dtype=torch.float64)
    st = lambda x_: dynalay.dynamic_step(x_, a, U, Ws, b, tol=1e-10, max_iter=200).h  # noqa: E731
    torch.testing.assert_close(torch.compile(torch.func.vmap(st), fullgraph=True)(hs), torch.func.vmap(st)(hs),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_nested_vmap_and_ensemble_per_sample_grads(backend, gen):
    """Transforms nest: vmap(vmap(.)) with layers mapped at both levels (the inner fold's actions
    are folded again), and per-sample gradients inside an ensemble vmap; equal to loops."""
    H, B, L = 6, 5, 2
    kw = dict(tol=1e-12, max_iter=300, backend=backend)
    Ws = torch.stack([torch.stack([make_W(H, 0.8, gen=gen) for _ in range(3)]) for _ in range(2)])
    x = torch.randn(2, 3, 4, H, generator=gen, dtype=torch.float64)
    f = lambda i, w: dynalay.fixed_point(i, w, **kw).z  # noqa: E731
    ref = torch.stack([torch.stack([f(x[p, q], Ws[p, q]) for q in range(3)]) for p in range(2)])
    torch.testing.assert_close(torch.func.vmap(torch.func.vmap(f))(x, Ws), ref, rtol=1e-12, atol=1e-12)
    P = [[make_step_params(B, H, L, torch.float64, gen) for _ in range(3)] for _ in range(2)]
    hs, Us, W2, bs = (torch.stack([torch.stack([p[k] for p in row]) for row in P]) for k in range(4))
    a = torch.randint(0, L + 1, (2, 3, B), generator=gen)
    st = lambda h_, a_, U_, W_, b_: dynalay.dynamic_step(h_, a_, U_, W_, b_, **kw).h  # noqa: E731
    ref = torch.stack([torch.stack([st(hs[p, q], a[p, q], Us[p, q], W2[p, q], bs[p, q]) for q in range(3)])
                       for p in range(2)])
    torch.testing.assert_close(torch.func.vmap(torch.func.vmap(st))(hs, a, Us, W2, bs), ref, rtol=1e-12,
                               atol=1e-12)

    def loss(U_, W_, b_, h_, a_):
        return dynalay.dynamic_step(h_[None], a_[None], U_, W_, b_, **kw).h.square().sum()
    psg = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1, 2)), in_dims=(None, None, None, 0, 0))
    ens = torch.func.vmap(psg)(Us[0], W2[0], bs[0], hs[0], a[0])
    loop = [psg(Us[0, q], W2[0, q], bs[0, q], hs[0, q], a[0, q]) for q in range(3)]
    for k in range(3):
        torch.testing.assert_close(ens[k], torch.stack([r[k] for r in loop]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_caught_under_vmap(backend, gen):
    """Under vmap the public call cannot read batched values, so the batching rules run the data
    checks: out-of-range actions and NaN inputs give the same errors as without vmap (also under
    vmap(grad)), and check="none" lets them through as it does without vmap."""
    B, H, L = 5, 6, 2
    dt = torch.float32 if backend == "triton" else torch.float64
    h, U, W, b = make_step_params(B, H, L, dt, gen)
    hs = torch.randn(3, B, H, generator=gen, dtype=dt)
    a = torch.randint(0, L + 1, (3, B), generator=gen)
    st = lambda h_, a_, U_, W_, b_: dynalay.dynamic_step(h_, a_, U_, W_, b_, backend=backend).h  # noqa: E731
    bad_a = a.clone()
    bad_a[1, 2] = L + 3
    Us, Ws, bs = U.expand(3, -1, -1, -1), W.expand(3, -1, -1, -1), b.expand(3, -1, -1)
    for dims, args in (((0, 0, None, None, None), (hs, bad_a, U, W, b)), ((0, 0, 0, 0, 0), (hs, bad_a, Us, Ws, bs))):
        with pytest.raises(ValueError, match=r"actions must lie in \[0, 2\]"):
            torch.func.vmap(st, in_dims=dims)(*args)
    nan_h = hs.clone()
    nan_h[2, 1, 3] = float("nan")
    with pytest.raises(ValueError, match="h contains NaN or Inf"):
        torch.func.vmap(st, in_dims=(0, None, None, None, None))(nan_h, a[0], U, W, b)
    with pytest.raises(ValueError, match="inj contains NaN or Inf"):
        torch.func.vmap(lambda x: dynalay.fixed_point(x, W[0], backend=backend).z)(nan_h)

    def loss(U_, W_, b_, x, ai):
        return dynalay.dynamic_step(x[None], ai[None], U_, W_, b_, backend=backend).h.sum()
    with pytest.raises(ValueError, match="h contains NaN or Inf"):
        torch.func.vmap(torch.func.grad(loss), in_dims=(None, None, None, 0, 0))(U, W, b, nan_h[2], a[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # check="none": no check, no convergence warning either
        out = torch.func.vmap(lambda x: dynalay.dynamic_step(x, a[0], U, W, b, backend=backend, check="none").h)(nan_h)
    assert out[2, 1].isnan().any()  # passed through unchecked (a NOP row keeps it, a solved row spreads it)


def test_batching_rules_read_the_right_settings():
    """The batching rules find max_iter and check by position among the settings after the
    tensors: those positions must follow the ops' signatures."""
    import inspect
    import sys as _sys
    fp_mod, st_mod = _sys.modules["dynalay.ops.fixed_point"], _sys.modules["dynalay.ops.dispatch"]
    for impl, n in ((fp_mod._fixed_point_fwd_impl, 4), (st_mod._dynamic_step_impl, 5),
                    (fp_mod._fixed_point_adjoint_impl, 4)):
        names = list(inspect.signature(impl).parameters)[n:]
        assert names[fp_mod.REST_MAX_ITER] == "max_iter", impl.__name__
        pos = fp_mod.ADJOINT_REST_CHECK if impl is fp_mod._fixed_point_adjoint_impl else fp_mod.REST_CHECK
        assert names[pos] == "check", impl.__name__
