"""dynalay.fixed_point on CPU: float64 references, backends agreeing, gradients, custom-op
contract (opcheck, compile), determinism, convergence reporting, memory kept for backward."""
import warnings

import pytest
import torch

import dynalay
from dynalay import backends
from helpers import assert_close, assert_iters, make_step_params, make_W, ref_solve, rel_err, unrolled_grads

CPU_BACKENDS = ["torch", "cpp"]
SHAPES = [(1, 1), (1, 20), (7, 20), (64, 64), (33, 100)]


def problem(B, H, dtype, gen, kind="gauss", inj_scale=1.0):
    W = make_W(H, kind=kind, gen=gen).to(dtype)
    inj = (inj_scale * torch.randn(B, H, generator=gen, dtype=torch.float64)).to(dtype)
    return inj, W


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,H", SHAPES)
def test_forward_matches_float64_reference(backend, dtype, B, H, gen):
    inj, W = problem(B, H, dtype, gen)
    r = dynalay.fixed_point(inj, W, backend=backend, max_iter=300)
    z, it, res, conv, amb = ref_solve(inj, W, max_iter=300)
    assert r.z.dtype == dtype and r.z.shape == (B, H)
    assert r.iters.dtype == torch.int32 and r.converged.dtype == torch.bool
    assert conv.all() and r.converged.all()
    assert_iters(r.iters, it, amb)
    assert_close(r.z, z, dtype, what="z")
    assert (r.residual.double() < 1e-4).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_cpp_agrees_with_torch_ref(dtype, solver, gen):
    if backends.availability_error("cpp"):
        pytest.fail(f"the C++ extension must be built for the test suite: {backends.availability_error('cpp')}")
    inj, W = problem(96, 48, dtype, gen)
    a = dynalay.fixed_point(inj, W, backend="torch", solver=solver)
    b = dynalay.fixed_point(inj, W, backend="cpp", solver=solver)
    if solver == "picard":
        z, it, res, conv, amb = ref_solve(inj, W)
        assert_iters(a.iters, b.iters, amb)
    else:  # Anderson's small solves differ in rounding between the two
        assert (a.iters - b.iters).abs().max() <= 1
    assert_close(b.z, a.z, dtype, what="z cpp vs torch")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rows_converging_at_different_speeds(backend, gen):
    # injections spanning 6 orders of magnitude + a zero row + one slow symmetric problem
    B, H = 40, 24
    W = make_W(H, kind="sym", gen=gen)
    scale = torch.logspace(-4, 1, B, dtype=torch.float64)
    inj = torch.randn(B, H, generator=gen, dtype=torch.float64) * scale[:, None]
    inj[3] = 0.0
    r = dynalay.fixed_point(inj, W, backend=backend, max_iter=200)
    z, it, res, conv, amb = ref_solve(inj, W, max_iter=200)
    assert_iters(r.iters, it, amb)
    assert int(r.iters.max()) - int(r.iters.min()) >= 5, "the problem should spread the iteration counts"
    assert r.iters[3] == 1 and r.converged[3]
    assert_close(r.z, z, torch.float64, what="z")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_damping_and_z0(backend, gen):
    inj, W = problem(9, 13, torch.float64, gen)
    z0 = torch.randn(9, 13, generator=gen, dtype=torch.float64)
    r = dynalay.fixed_point(inj, W, damping=0.7, z0=z0, backend=backend, max_iter=200)
    z, it, res, conv, amb = ref_solve(inj, W, damping=0.7, z0=z0, max_iter=200)
    assert_iters(r.iters, it, amb)
    assert_close(r.z, z, torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_anderson_reaches_the_same_fixed_point_faster_on_slow_problem(backend, gen):
    inj, W = problem(64, 64, torch.float64, gen, kind="sym", inj_scale=0.3)
    p = dynalay.fixed_point(inj, W, tol=1e-8, max_iter=300, backend=backend)
    a = dynalay.fixed_point(inj, W, tol=1e-8, max_iter=300, solver="anderson", backend=backend)
    assert p.converged.all() and a.converged.all()
    assert (a.z - p.z).abs().max() < 1e-6
    assert a.iters.double().mean() <= 0.6 * p.iters.double().mean()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_implicit_gradient_matches_unrolled_backprop(backend, gen):
    inj, W = problem(16, 12, torch.float64, gen)
    G = torch.randn(16, 12, generator=gen, dtype=torch.float64)
    i_ = inj.clone().requires_grad_()
    W_ = W.clone().requires_grad_()
    r = dynalay.fixed_point(i_, W_, tol=1e-13, max_iter=500, backend=backend)
    (r.z * G).sum().backward()
    gi, gW = unrolled_grads(inj, W, G, n_iter=400)
    assert rel_err(i_.grad, gi) < 1e-9
    assert rel_err(W_.grad, gW) < 1e-9


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_gradcheck_float64(backend, solver, gen):
    inj, W = problem(3, 4, torch.float64, gen)
    inj.requires_grad_()
    W.requires_grad_()
    f = lambda i, w: dynalay.fixed_point(i, w, tol=1e-13, max_iter=500, solver=solver, backend=backend,
                                         backward_solver=solver).z
    assert torch.autograd.gradcheck(f, (inj, W), eps=1e-6, atol=1e-7)


def test_phantom_gradient_is_k_step_backprop(gen):
    inj, W = problem(5, 7, torch.float64, gen)
    G = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    i_, W_ = inj.clone().requires_grad_(), W.clone().requires_grad_()
    r = dynalay.fixed_point(i_, W_, tol=1e-12, max_iter=300, backward="phantom", phantom_steps=3,
                            phantom_damping=0.6)
    (r.z * G).sum().backward()
    # explicit autograd through 3 damped steps started at the (constant) fixed point
    i2, W2 = inj.clone().requires_grad_(), W.clone().requires_grad_()
    z = r.z.detach()
    for _ in range(3):
        z = 0.4 * z + 0.6 * torch.tanh(z @ W2.t() + i2)
    (z * G).sum().backward()
    assert rel_err(i_.grad, i2.grad) < 1e-12 and rel_err(W_.grad, W2.grad) < 1e-12


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bfloat16_and_float16_iterate_in_float32(backend, gen):
    inj, W = problem(20, 24, torch.float32, gen)
    ref = dynalay.fixed_point(inj, W, backend=backend)
    for dt in (torch.bfloat16, torch.float16):
        r = dynalay.fixed_point(inj.to(dt), W.to(dt), backend=backend)
        assert r.z.dtype == dt and r.residual.dtype == torch.float32
        exp = dynalay.fixed_point(inj.to(dt).float(), W.to(dt).float(), backend=backend)
        assert torch.equal(r.z, exp.z.to(dt)) and torch.equal(r.iters, exp.iters)
        assert (r.z.float() - ref.z).abs().max() < (0.05 if dt == torch.bfloat16 else 0.01)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_deterministic(backend, gen):
    inj, W = problem(50, 30, torch.float32, gen)
    outs = []
    for _ in range(2):
        i_, W_ = inj.clone().requires_grad_(), W.clone().requires_grad_()
        r = dynalay.fixed_point(i_, W_, backend=backend, solver="anderson")
        r.z.square().sum().backward()
        outs.append((r.z.detach(), r.iters, r.residual, i_.grad, W_.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_divergent_layer_warns_and_flags_rows(backend, gen):
    inj, W = problem(10, 16, torch.float64, gen)
    W = 3.0 * W / 0.9
    with pytest.warns(dynalay.ConvergenceWarning, match="did not converge"):
        r = dynalay.fixed_point(inj, W, max_iter=30, backend=backend)
    assert not r.converged.all() and torch.isfinite(r.z).all()
    assert (r.iters[~r.converged] == 30).all()
    assert (r.residual[~r.converged] >= 1e-4).all()
    with pytest.raises(dynalay.NotConvergedError):
        dynalay.fixed_point(inj, W, max_iter=30, backend=backend, check="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dynalay.fixed_point(inj, W, max_iter=30, backend=backend, check="none")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_non_convergence_is_reported(backend, gen):
    inj, W = problem(6, 8, torch.float64, gen)
    inj.requires_grad_()
    r = dynalay.fixed_point(inj, W, backend=backend, backward_max_iter=2)
    with pytest.warns(dynalay.ConvergenceWarning, match="backward"):
        r.z.sum().backward()
    assert not dynalay.ops.last_backward_stats["converged"].all()


def test_memory_kept_for_backward_is_at_most_two_states(gen):
    B, H = 64, 32
    for kind, n_iter in (("gauss", None), ("sym", None)):
        inj, W = problem(B, H, torch.float32, gen, kind=kind, inj_scale=0.3)
        inj.requires_grad_()
        W.requires_grad_()
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            r = dynalay.fixed_point(inj, W, tol=1e-6, max_iter=200)
        states = [t for t in saved if t.numel() >= B * H and t.shape != W.shape]
        assert len(states) <= 2, [tuple(t.shape) for t in saved]
        assert r.iters.max() > 10  # independent of the number of iterations


def _op_args(inj, W, backend, actions=None, backward="implicit"):
    return (inj, W, actions, None, 1e-8, 200, "picard", 1.0, 5, 1e-6, 1e-12, backward, 1e-8, 200, "picard",
            1.0, 5, 1e-6, 1e-12, 3, 0.5, "none", backend, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck(backend, requires_grad, gen):
    from torch.library import opcheck
    inj, W = problem(6, 5, torch.float64, gen)
    inj.requires_grad_(requires_grad)
    W = W.unsqueeze(0).requires_grad_(requires_grad)
    opcheck(torch.ops.dynalay.fixed_point_fwd, _op_args(inj, W, backend))
    opcheck(torch.ops.dynalay.fixed_point_fwd, _op_args(inj, W, backend, backward="phantom"))
    z = torch.tanh(torch.randn(6, 5, generator=gen, dtype=torch.float64) * 0.3)
    g = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    opcheck(torch.ops.dynalay.fixed_point_adjoint, (z, g, W.detach(), None, 1e-8, 200, "picard", 1.0, 5, 1e-6,
                                                    1e-12, backend))
    opcheck(torch.ops.dynalay.grouped_wgrad, (g, z, None, 1, backend))
    acts = torch.tensor([0, 1, 1, 0, 2, 1])
    U = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64).requires_grad_(requires_grad)
    b = torch.randn(2, 4, generator=gen, dtype=torch.float64).requires_grad_(requires_grad)
    opcheck(torch.ops.dynalay.grouped_linear, (inj, U, b, acts, False, backend))
    opcheck(torch.ops.dynalay.grouped_wgrad, (g, z, acts, 2, backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grouped_fixed_point_op_gradcheck_with_nop_rows(backend, gen):
    """fixed_point_fwd with actions (several layers, NOP rows): gradcheck of the implicit
    backward (on cpp: the one-call C++ backward), and opcheck of the grouped op."""
    from torch.library import opcheck
    B, H, L = 9, 5, 3
    inj = torch.randn(B, H, generator=gen, dtype=torch.float64).requires_grad_()
    W = torch.randn(L, H, H, generator=gen, dtype=torch.float64)
    W = (0.5 * W / torch.linalg.matrix_norm(W, 2).view(L, 1, 1)).requires_grad_()
    acts = torch.tensor([0, 1, 2, 3, 0, 1, 3, 2, 0])  # 3 = NOP
    f = lambda i, w: torch.ops.dynalay.fixed_point_fwd(*_op_args(i, w, backend, actions=acts))[0]
    z = f(inj, W)
    assert torch.equal(z[acts == L], torch.zeros(2, H, dtype=torch.float64))
    assert torch.autograd.gradcheck(f, (inj, W), eps=1e-6, atol=1e-7)
    opcheck(torch.ops.dynalay.fixed_point_fwd, _op_args(inj, W, backend, actions=acts))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend, gen):
    inj, W = problem(12, 10, torch.float32, gen)
    layer_W = W.clone().requires_grad_()

    def f(x, w):
        r = dynalay.fixed_point(x * 2.0, w, tol=1e-6, max_iter=100, check="none")
        return (r.z.sin() * r.converged.unsqueeze(1)).sum() + r.iters.sum() * 0

    x = inj.clone().requires_grad_()
    cf = torch.compile(f, fullgraph=True, backend=compile_backend)
    out = cf(x, layer_W)
    out.backward()
    x2, w2 = inj.clone().requires_grad_(), W.clone().requires_grad_()
    ref = f(x2, w2)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer_W.grad, w2.grad)


BAD = [
    (lambda i, W: dynalay.fixed_point(i.numpy(), W), TypeError, "inj"),
    (lambda i, W: dynalay.fixed_point(i[0], W), ValueError, "inj"),
    (lambda i, W: dynalay.fixed_point(i, W[:3]), ValueError, "W"),
    (lambda i, W: dynalay.fixed_point(i, W.double()), TypeError, "W"),
    (lambda i, W: dynalay.fixed_point(i.long(), W), TypeError, "inj"),
    (lambda i, W: dynalay.fixed_point(i, W, tol=0.0), ValueError, "tol"),
    (lambda i, W: dynalay.fixed_point(i, W, tol=float("nan")), ValueError, "tol"),
    (lambda i, W: dynalay.fixed_point(i, W, tol=1e-46), ValueError, "tol"),  # 0 in float32, not in cpp's double
    (lambda i, W: dynalay.fixed_point(i, W, backward_tol=1e-300), ValueError, "backward_tol"),
    (lambda i, W: dynalay.fixed_point(i, W, max_iter=0), ValueError, "max_iter"),
    (lambda i, W: dynalay.fixed_point(i, W, max_iter=2.5), ValueError, "max_iter"),
    (lambda i, W: dynalay.fixed_point(i, W, solver="broyden"), ValueError, "solver"),
    (lambda i, W: dynalay.fixed_point(i, W, backward="unrolled"), ValueError, "backward"),
    (lambda i, W: dynalay.fixed_point(i, W, backward_solver="cg"), ValueError, "backward_solver"),
    (lambda i, W: dynalay.fixed_point(i, W, backward_tol=-1.0), ValueError, "backward_tol"),
    (lambda i, W: dynalay.fixed_point(i, W, damping=1.5), ValueError, "damping"),
    (lambda i, W: dynalay.fixed_point(i, W, anderson_m=0), ValueError, "anderson_m"),
    (lambda i, W: dynalay.fixed_point(i, W, anderson_m=True), ValueError, "anderson_m"),
    (lambda i, W: dynalay.fixed_point(i, W, check="maybe"), ValueError, "check"),
    (lambda i, W: dynalay.fixed_point(i, W, backend="tpu"), ValueError, "backend"),
    (lambda i, W: dynalay.fixed_point(i, W, z0=i[:, :2]), ValueError, "z0"),
    (lambda i, W: dynalay.fixed_point(i, W, f_tol=1e-3), TypeError, "f_tol"),
    (lambda i, W: dynalay.fixed_point(i.clone().index_fill_(0, torch.tensor([1]), float("nan")), W), ValueError,
     "inj contains NaN"),
    (lambda i, W: dynalay.fixed_point(i, W.clone().fill_(float("inf"))), ValueError, "W contains NaN or Inf"),
    (lambda i, W: dynalay.fixed_point(i[:, :0], W[:0, :0]), ValueError, "inj"),
    (lambda i, W: dynalay.nn.FPILayer(4, 4, stop_mode="rel"), TypeError, "stop_mode"),
    (lambda i, W: dynalay.nn.FPILayer(4, 4, tol=-1), ValueError, "tol"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input_is_rejected_with_the_argument_named(case):
    fn, exc, match = BAD[case]
    inj, W = torch.randn(4, 6), make_W(6, dtype=torch.float32)
    with pytest.raises(exc, match=match):
        fn(inj, W)


@pytest.mark.parametrize("path", ["cpp", "sum"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_check_has_no_false_alarm_and_catches_every_non_finite(path, dtype, monkeypatch):
    """check_finite runs one C++ pass on CPU (cpp built) and otherwise one sum per tensor with an
    exact fallback: large finite inputs (sums that overflow) are legal, and a lone NaN or Inf
    anywhere (first, middle, last element; small and multi-threaded tensor sizes) is caught and
    named, as are +Inf/-Inf pairs."""
    from dynalay import _ext
    from dynalay.ops._common import check_finite
    if path == "cpp" and _ext.cpp_error():
        pytest.skip("cpp backend not built")
    if path == "sum":
        monkeypatch.setattr(_ext, "cpp_error", lambda: "disabled for this test")
    big = torch.full((64, 8), torch.finfo(dtype).max / 2, dtype=dtype)
    check_finite("raise", inj=big, W=-big)  # sums overflow, every element finite: accepted
    for n in (37, 300_001):
        for bad in (float("nan"), float("inf"), -float("inf")):
            for pos in (0, n // 2, n - 1):
                t = torch.randn(n, dtype=torch.float32).to(dtype)
                t[pos] = bad
                with pytest.raises(ValueError, match="second contains NaN or Inf"):
                    check_finite("warn", first=torch.randn(3, 3).to(dtype), second=t, third=None)
        check_finite("warn", ok=torch.randn(n).to(dtype))
    pair = torch.zeros(10, dtype=dtype)
    pair[2], pair[7] = float("inf"), -float("inf")
    with pytest.raises(ValueError, match="x contains"):
        check_finite("warn", x=pair)
    check_finite("none", x=pair)  # check="none" skips


@pytest.mark.parametrize("op", ["fixed_point", "dynamic_step", "backward"])
def test_inf_in_W_with_checks_off_matches_the_reference(op, gen):
    """check="none" skips the input scan, and the solve then computes what the reference computes.
    The cpp solve from z0 = 0 skipped its first GEMM, so W 0 (NaN where W holds an Inf) was never
    formed: finite rows flagged converged where the reference gives NaN, not converged."""
    if backends.availability_error("cpp"):
        pytest.skip("cpp backend not built")
    H, B = 6, 8
    seed = int(torch.randint(2**31, (1,), generator=gen))
    out = {}
    for be in CPU_BACKENDS:
        g = torch.Generator().manual_seed(seed)  # the same inputs for each backend
        W = make_W(H, gen=g).float()
        W[0, 0] = float("inf")
        if op == "fixed_point":
            r = dynalay.fixed_point(torch.randn(B, H, generator=g), W, check="none", backend=be)
            out[be] = (r.z, r.iters, r.converged)
        elif op == "dynamic_step":
            U, b = torch.randn(2, H, H, generator=g), torch.randn(2, H, generator=g)
            h = torch.randn(B, H, generator=g)
            a = torch.arange(B) % 3
            r = dynalay.dynamic_step(h, a, U, torch.stack([W, make_W(H, gen=g).float()]), b, check="none",
                                     backend=be)
            out[be] = (r.h, r.iters, r.converged)
        else:  # the adjoint solve from u = 0 (the C++ backward op; the torch reference solve)
            z = torch.tanh(torch.randn(B, H, generator=g))
            gz = torch.randn(B, H, generator=g)
            if be == "cpp":
                dx, *_, it, _, conv = torch.ops.dynalay_C.implicit_backward(
                    z, gz, W[None], None, None, None, True, False, False, False, 1e-4, 50, "picard", 1.0, 5, 1e-6,
                    1e-12)
            else:
                from dynalay.backends import torch_ref
                dx, it, _, conv = torch_ref.fp_solve(gz, W[None], 1 - z * z, None, None, True, 1e-4, 50, "picard",
                                                     1.0, 5, 1e-6, 1e-12)
            out[be] = (dx, it, conv)
    for a, b in zip(out["torch"], out["cpp"]):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a.nan_to_num(), b.nan_to_num())
    assert out["cpp"][0].isnan().any() and not out["cpp"][2].all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("check", ["warn", "raise"])
@pytest.mark.parametrize("backward_solver", ["picard", "gmres"])
def test_non_finite_incoming_gradient_is_named(backend, check, backward_solver):
    """A NaN in the gradient flowing into z was reported as the adjoint solve not converging
    ('Is W contractive?', or NotConvergedError): now a ValueError names the gradient."""
    if backends.availability_error(backend):
        pytest.skip(backends.availability_error(backend))
    x = torch.randn(3, 4, requires_grad=True)
    r = dynalay.fixed_point(x, 0.5 * torch.eye(4), check=check, backend=backend, backward_solver=backward_solver)
    g = torch.ones(3, 4)
    g[1, 0] = float("nan")
    with pytest.raises(ValueError, match="incoming gradient .* NaN or Inf"):
        r.z.backward(g)


def test_phantom_backward_leaves_no_stale_statistics():
    from dynalay.ops import last_backward_stats
    W = 0.5 * torch.eye(4)
    x = torch.randn(7, 4, requires_grad=True)
    dynalay.fixed_point(x, W).z.sum().backward()
    assert last_backward_stats["iters"].shape == (7,)
    y = torch.randn(3, 4, requires_grad=True)
    dynalay.fixed_point(y, W, backward="phantom").z.sum().backward()
    assert last_backward_stats == {}  # a phantom backward solves nothing: not the previous call's


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_anderson_history_longer_than_H_is_capped(backend):
    """m > H with the default ridge: the minimum-norm mix spread over stale iterates and took 39
    iterations at H = 8, m = 32 against Picard's 22; at most H pairs are now mixed."""
    if backends.availability_error(backend):
        pytest.skip(backends.availability_error(backend))
    g = torch.Generator().manual_seed(0)
    H = 8
    W = torch.randn(H, H, generator=g, dtype=torch.float64)
    W = 0.95 * W / torch.linalg.matrix_norm(W, 2)
    inj = torch.randn(4, H, generator=g, dtype=torch.float64)
    kw = dict(tol=1e-8, max_iter=200, backend=backend)
    it = {m: dynalay.fixed_point(inj, W, solver="anderson", anderson_m=m, **kw).iters for m in (H, 32)}
    picard = dynalay.fixed_point(inj, W, **kw).iters
    assert (it[32] - it[H]).abs().max() <= 1 and it[32].max() < picard.max()


def test_empty_batch_is_fine():
    r = dynalay.fixed_point(torch.zeros(0, 5), make_W(5, dtype=torch.float32))
    assert r.z.shape == (0, 5) and r.iters.shape == (0,)


def test_forced_backend_that_cannot_run_lists_reasons():
    with pytest.raises(RuntimeError, match="cannot run") as e:
        dynalay.fixed_point(torch.randn(2, 3), make_W(3, dtype=torch.float32), backend="cuda")
    assert "CUDA" in str(e.value)


def test_missing_extension_degrades_with_one_warning(monkeypatch):
    from dynalay import _ext
    monkeypatch.setitem(_ext._state, "_C", "dynalay._C failed to load: simulated")
    monkeypatch.setattr(_ext, "_warned", set())
    monkeypatch.setattr(backends, "_cache", {})
    monkeypatch.setenv("DYNALAY_QUIET", "0")
    inj, W = torch.randn(3, 4), make_W(4, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="pure-PyTorch fallback.*simulated") as rec:
        dynalay.fixed_point(inj, W)
        dynalay.fixed_point(inj, W)
    assert sum("fallback" in str(w.message) for w in rec) == 1
    assert backends.select("cpu", torch.float32) == "torch"
    with pytest.raises(RuntimeError, match="simulated"):
        dynalay.fixed_point(inj, W, backend="cpp")


def test_stale_extension_is_reported_and_not_used(monkeypatch):
    """A dynalay._C built from an older dynalay loads but lacks newer ops: it must count as not
    loaded (with the reason) rather than fail later inside a call."""
    from dynalay import _ext
    if _ext.cpp_error():
        pytest.skip("cpp backend not built")
    monkeypatch.setattr(_ext, "CPP_OPS", _ext.CPP_OPS + ("an_op_from_the_future",))
    monkeypatch.delitem(_ext._state, "_C")
    err = _ext.cpp_error()
    assert err is not None and "stale build" in err and "an_op_from_the_future" in err
    monkeypatch.setattr(backends, "_cache", {})
    monkeypatch.setenv("DYNALAY_QUIET", "1")
    assert backends.select("cpu", torch.float32) == "torch"
    r = dynalay.fixed_point(torch.randn(3, 4), make_W(4, dtype=torch.float32))  # falls back, finite check too
    assert r.converged.all()


def test_cuda_kernel_check_and_fused_switch():
    """The stale-build check of dynalay._C_cuda lists the ops without a CUDA kernel (all of them
    where no CUDA library is loaded, none where it is), and DYNALAY_CUDA_FUSED=0 (read at import)
    drops the cuda backend's two fused entry points, which the ops then do not take."""
    import os
    import subprocess
    import sys
    from dynalay import _ext
    if _ext.cpp_error():
        pytest.skip("cpp backend not built (it defines the op schemas)")
    missing = _ext.missing_cuda_kernels(_ext.CUDA_OPS)
    assert missing == ([] if _ext.cuda_error() is None else list(_ext.CUDA_OPS))
    code = ("import importlib, torch; import dynalay.backends.cuda as c; "
            "f = importlib.import_module('dynalay.ops.fixed_point'); torch.set_grad_enabled(False); "
            "print(hasattr(c, 'implicit_backward'), hasattr(c, 'dynamic_step'), f.has_fused_backward('cuda'))")
    base = {k: v for k, v in os.environ.items() if k != "DYNALAY_CUDA_FUSED"}
    for extra, want in (({}, "True True True"), ({"DYNALAY_CUDA_FUSED": "0"}, "False False False")):
        env = dict(base, **extra)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0 and out.stdout.strip() == want, (env.get("DYNALAY_CUDA_FUSED"), out.stdout,
                                                                   out.stderr[-2000:])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward_through_the_implicit_gradient_raises(backend, gen):
    """The implicit backward has no derivative of its own: create_graph=True followed by a second
    backward must raise (never return zeros or a partial derivative)."""
    inj, W = problem(4, 3, torch.float64, gen)
    inj.requires_grad_()
    h, U, Ws, b = make_step_params(4, 3, 2, torch.float64, gen)
    h.requires_grad_()
    for z, x in ((dynalay.fixed_point(inj, W, backend=backend, check="none").z, inj),
                 (dynalay.dynamic_step(h, torch.tensor([0, 1, 2, 0]), U, Ws, b, backend=backend, check="none").h, h)):
        g, = torch.autograd.grad(z.square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="gradients of gradients .* are not supported"):
            torch.autograd.grad(g.sum(), x)
    W.requires_grad_()  # the weight gradient's reduction (grouped_wgrad) says the same
    gW, = torch.autograd.grad(dynalay.fixed_point(inj, W, backend=backend, check="none").z.square().sum(), W,
                              create_graph=True)
    with pytest.raises(RuntimeError, match="gradients of gradients .* are not supported"):
        torch.autograd.grad(gW.sum(), W)


def test_large_fp32_fixed_points_prefer_triton_on_cuda(monkeypatch):
    """fp32 solves with H > 128 and B >= 65536 go to Triton first on CUDA (measured there, session
    15); smaller batches, H <= 128 and bf16 keep the CUDA C++ kernels first; CPU is unaffected.
    The public function selects with the shape's key."""
    assert backends.fixed_point_op(65536, 256, torch.float32) == "fixed_point/large"
    assert backends.fixed_point_op(10 ** 6, 1024, torch.float32) == "fixed_point/large"
    for B, H, dt in ((65535, 256, torch.float32), (65536, 128, torch.float32), (65536, 512, torch.bfloat16),
                     (8192, 512, torch.float32)):
        assert backends.fixed_point_op(B, H, dt) == "fixed_point", (B, H, dt)
    monkeypatch.setattr(backends, "_cache", {})
    monkeypatch.setattr(backends, "not_supported_reasons", lambda name, *a, **k: [])
    assert backends.select("cuda", torch.float32, op="fixed_point/large") == "triton"
    assert backends.select("cuda", torch.float32, op="fixed_point") == "cuda"
    assert backends.select("cpu", torch.float32, op="fixed_point/large") == "cpp"
    monkeypatch.setattr(backends, "_cache", {})
    monkeypatch.setattr(backends, "not_supported_reasons", lambda name, *a, **k: ["no"] if name == "triton" else [])
    assert backends.select("cuda", torch.float32, op="fixed_point/large") == "cuda"
    seen = []
    real = backends.select
    monkeypatch.setattr(backends, "select", lambda *a, **k: seen.append(a[4] if len(a) > 4 else k.get("op"))
                        or real(*a, **k))
    dynalay.fixed_point(torch.zeros(3, 4), torch.zeros(4, 4), check="none")
    assert seen == ["fixed_point"]


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("DYNALAY_BACKEND", "torch")
    assert backends.select("cpu", torch.float32) == "torch"
    monkeypatch.setenv("DYNALAY_BACKEND", "nope")
    with pytest.raises(ValueError, match="DYNALAY_BACKEND"):
        backends.select("cpu", torch.float32)


def test_auto_order_on_cuda_is_per_op(monkeypatch):
    """On CUDA tensors auto prefers the CUDA C++ kernels for fixed_point and Triton for
    dynamic_step (measured, benchmarks/results/gpu-h200-2026-11-27-s10); each falls back to the
    other, then to torch.  Checked with every backend reported runnable / cuda unavailable."""
    monkeypatch.setattr(backends, "_cache", {})
    monkeypatch.setattr(backends, "not_supported_reasons", lambda name, *a, **k: [])
    assert backends.select("cuda", torch.float32, op="fixed_point") == "cuda"
    assert backends.select("cuda", torch.float32, op="dynamic_step") == "triton"
    assert backends.select("cuda", torch.float32) == "triton"
    monkeypatch.setattr(backends, "_cache", {})
    monkeypatch.setattr(backends, "not_supported_reasons",
                        lambda name, *a, **k: ["no"] if name == "cuda" else [])
    assert backends.select("cuda", torch.float32, op="fixed_point") == "triton"
    monkeypatch.setattr(backends, "_cache", {})
    monkeypatch.setattr(backends, "not_supported_reasons",
                        lambda name, *a, **k: ["no"] if name in ("cuda", "triton") else [])
    with warnings.catch_warnings():  # the one-time "falling back to torch" warning
        warnings.simplefilter("ignore")
        assert backends.select("cuda", torch.float32, op="dynamic_step") == "torch"


def test_cpp_extension_errors_reach_python_as_runtime_errors():
    # the raw C++ op's own argument checks (TORCH_CHECK) must surface as RuntimeError, not crash;
    # run in a subprocess so that a crash fails this test instead of the whole run
    import subprocess
    import sys
    code = ("import torch, dynalay, dynalay._C\n"
            "try:\n"
            "    torch.ops.dynalay_C.fp_solve(torch.randn(3, 4), torch.zeros(1, 4, 4), None, None, None, False, 1e-4,"
            " 5, 'broyden', 1.0, 5, 1e-6, 1e-12)\n"
            "except RuntimeError as e:\n"
            "    print('RAISED', 'solver' in str(e))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"crashed (rc={out.returncode}): {out.stderr[-2000:]}"
    assert "RAISED True" in out.stdout, out.stdout + out.stderr[-2000:]
