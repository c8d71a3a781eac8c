"""route, dynamic_step and dispatch on every CPU backend (torch, cpp, triton interpreter)
against a per-row float64 reference loop."""
import os

import pytest
import torch
from torch import nn

import dynalay
from dynalay.nn import DynamicFPIStep
from helpers import (assert_close, assert_iters, make_actions, make_step_params, ref_dynamic_step, rel_err)

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["torch", "cpp"] + (["triton"] if INTERP else [])
PATTERNS = ["uniform", "skew", "empty", "allnop", "onelayer"]


@pytest.mark.parametrize("B,L,BM", [(1, 1, 4), (37, 3, 4), (64, 4, 16), (5, 2, 32), (0, 3, 8)])
@pytest.mark.parametrize("kind", PATTERNS)
def test_route_metadata(B, L, BM, kind, gen):
    a = make_actions(kind, B, L, gen)
    r = dynalay.route(a, L, BM)
    T = (B + BM - 1) // BM + L
    assert r.counts.shape == (L + 1,) and r.offsets.shape == (L + 2,) and r.perm.shape == (B,)
    assert r.tile_layer.shape == (T,) and r.tile_row_start.shape == (T,) and r.num_tiles.shape == (1,)
    assert torch.equal(r.counts, torch.bincount(a, minlength=L + 1))
    assert torch.equal(r.offsets[1:], torch.cumsum(r.counts, 0))
    assert torch.equal(r.perm, torch.sort(a, stable=True).indices)  # stable: NOP last, in order
    n_tiles = int(((r.counts[:L] + BM - 1) // BM).sum())
    assert int(r.num_tiles) == n_tiles
    assert (r.tile_layer[n_tiles:] == -1).all() and (r.tile_layer[:n_tiles] >= 0).all()
    covered = []
    for t in range(n_tiles):
        l, s = int(r.tile_layer[t]), int(r.tile_row_start[t])
        e = min(s + BM, int(r.offsets[l + 1]))
        assert int(r.offsets[l]) <= s < int(r.offsets[l + 1])
        covered += list(range(s, e))
    assert covered == list(range(int(r.offsets[L])))  # every non-NOP row exactly once, in order


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", PATTERNS + ["nop90"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dynamic_step_matches_per_row_reference(backend, kind, dtype, gen):
    B, H, L = (40, 20, 3) if backend != "triton" else (24, 20, 3)
    h, U, W, b = make_step_params(B, H, L, dtype, gen)
    a = make_actions(kind, B, L, gen)
    r = dynalay.dynamic_step(h, a, U, W, b, backend=backend, max_iter=200)
    ref, it, conv, amb = ref_dynamic_step(h, a, U, W, b, max_iter=200, band=1e-2)
    assert r.h.dtype == dtype and r.h.shape == (B, H)
    assert conv.all() and r.converged.all()
    assert_iters(r.iters, it, amb)
    assert_close(r.h, ref, dtype, what="h")
    nop = a == L
    assert torch.equal(r.h[nop], h[nop]) and (r.iters[nop] == 0).all()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("kind", ["uniform", "skew", "allnop"])
def test_dynamic_step_gradients_match_torch_ref(backend, kind, gen):
    B, H, L = 30, 24, 3
    params = make_step_params(B, H, L, torch.float64, gen)
    a = make_actions(kind, B, L, gen)
    G = torch.randn(B, H, generator=gen, dtype=torch.float64)
    grads = []
    for be in ("torch", backend):
        ps = [p.clone().requires_grad_() for p in params]
        r = dynalay.dynamic_step(ps[0], a, *ps[1:], backend=be, tol=1e-10, max_iter=300)
        (r.h * G).sum().backward()
        grads.append([p.grad for p in ps])
    for name, g0, g1 in zip("hUWb", *grads):
        assert rel_err(g1, g0) < 1e-9, name


@pytest.mark.parametrize("which", ["h", "U", "W", "b", "hW", "Ub"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_cpp_backward_with_some_inputs_frozen(which, dtype, gen):
    """The cpp backend's one-call backward computes only what autograd asks for; every subset
    must give the torch oracle's gradients (and None elsewhere), in float32 and float64."""
    if dynalay.backends.availability_error("cpp"):
        pytest.skip("cpp backend not built")
    B, H, L = 33, 20, 3
    params = make_step_params(B, H, L, dtype, gen)
    a = make_actions("nop90", B, L, gen)
    a[:6] = torch.tensor([0, 1, 2, 0, 3, 3])  # every layer and NOP present
    G = torch.randn(B, H, generator=gen, dtype=dtype)
    out = []
    for be in ("torch", "cpp"):
        ps = [p.clone().requires_grad_(n in which) for n, p in zip("hUWb", params)]
        r = dynalay.dynamic_step(ps[0], a, *ps[1:], backend=be, tol=1e-7 if dtype == torch.float32 else 1e-11,
                                 max_iter=300)
        (r.h * G).sum().backward()
        out.append([p.grad for p in ps])
    for n, g0, g1 in zip("hUWb", *out):
        if n in which:
            assert g1 is not None and g1.dtype == dtype and rel_err(g1, g0) < (1e-4 if dtype == torch.float32 else 1e-9), n
        else:
            assert g1 is None, n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("backward", ["implicit", "phantom"])
def test_dynamic_step_gradcheck(backend, backward, gen):
    B, H, L = 6, 5, 2
    h, U, W, b = make_step_params(B, H, L, torch.float64, gen)
    ps = [p.requires_grad_() for p in (h, U, W * (0.5 / 0.9), b)]  # ||W|| = 0.5: fast tight solves
    a = torch.tensor([0, 2, 1, 1, 2, 0])
    if backward == "implicit":
        f = lambda h, U, W, b: dynalay.dynamic_step(h, a, U, W, b, tol=1e-13, max_iter=500, backend=backend).h
        # the interpreter is slow: check a random projection of the Jacobian there (fast_mode)
        assert torch.autograd.gradcheck(f, tuple(ps), eps=1e-6, atol=1e-7, fast_mode=backend == "triton")
    else:  # phantom is a different (approximate) gradient: check it is the k-step backprop
        r = dynalay.dynamic_step(*ps[:1], a, *ps[1:], tol=1e-12, max_iter=300, backend=backend, backward="phantom",
                                 phantom_steps=2, phantom_damping=0.7)
        r.h.sum().backward()
        h, U, W, b = [p.detach().clone().requires_grad_() for p in ps]
        act = (a < L).unsqueeze(1)
        inj = torch.stack([U[i] @ h[i] + b[i] if False else U[min(int(a[i]), L - 1)] @ h[i] + b[min(int(a[i]), L - 1)]
                           for i in range(B)])
        z = r.h.detach()
        for _ in range(2):
            Wz = torch.stack([W[min(int(a[i]), L - 1)] @ z[i] for i in range(B)])
            z = torch.where(act, 0.3 * z + 0.7 * torch.tanh(Wz + inj), z)
        z = torch.where(act, z, h)
        z.sum().backward()
        for p, q in zip(ps, (h, U, W, b)):
            assert rel_err(p.grad, q.grad) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamic_step_deterministic(backend, gen):
    params = make_step_params(48, 24, 3, torch.float32, gen)
    a = make_actions("skew", 48, 3, gen)
    outs = []
    for _ in range(2):
        ps = [p.clone().requires_grad_() for p in params]
        r = dynalay.dynamic_step(ps[0], a, *ps[1:], backend=backend)
        r.h.square().sum().backward()
        outs.append([r.h.detach(), r.iters] + [p.grad for p in ps])
    for x, y in zip(*outs):
        assert torch.equal(x, y)


_BLOCKING_SCRIPT = r"""
import sys, torch, dynalay
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(3)
B, H, L = 1500, 64, 3
a = torch.randint(0, L + 1, (B,), generator=g)
a[:1200] = 0  # one big group: split into several blocks
h = torch.randn(B, H, generator=g)
U = torch.randn(L, H, H, generator=g) / H ** 0.5
W = torch.randn(L, H, H, generator=g)
W = 0.9 * W / torch.linalg.matrix_norm(W, 2).view(L, 1, 1)
b = 0.1 * torch.randn(L, H, generator=g)
out = {}
for solver in ("picard", "anderson"):
    ps = [t.clone().requires_grad_() for t in (h, U, W, b)]
    r = dynalay.dynamic_step(ps[0], a, *ps[1:], solver=solver, backend="cpp")
    (r.h * torch.linspace(-1, 1, H)).sum().backward()
    out[solver] = [r.h.detach(), r.iters] + [p.grad for p in ps]
    f = dynalay.fixed_point(h @ U[0].t(), W[0], solver=solver, backend="cpp")
    out[solver] += [f.z, f.iters]
torch.save(out, sys.argv[2])
"""


@pytest.mark.skipif(dynalay.backends.availability_error("cpp") is not None, reason="cpp backend not built")
def test_cpp_results_do_not_depend_on_the_thread_count(tmp_path):
    """The C++ solve cuts groups into blocks (a function of the group size and H only) that
    threads take from one work list: the thread count must not change a single bit of the
    outputs or the iteration counts (the gradients' weight reductions are GEMMs over the batch,
    which MKL splits by thread: equal to rounding).  Forcing another block size
    (DYNALAY_CPU_BLOCK_ROWS, a diagnostic) changes the GEMM's rounding only."""
    import subprocess
    import sys
    script = tmp_path / "run.py"
    script.write_text(_BLOCKING_SCRIPT)

    def run(threads, rows=None):
        env = dict(os.environ)
        env.pop("DYNALAY_CPU_BLOCK_ROWS", None)
        if rows:
            env["DYNALAY_CPU_BLOCK_ROWS"] = rows
        path = tmp_path / f"out_{threads}_{rows}.pt"
        p = subprocess.run([sys.executable, str(script), str(threads), str(path)], env=env, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        return torch.load(path)

    one, two, three = run(1), run(2), run(3)
    small = run(2, "8")
    fwd = (0, 1, 6, 7)  # h, iters, fixed_point z, iters: bitwise whatever the thread count
    for solver in ("picard", "anderson"):
        for i, (x, y, z) in enumerate(zip(one[solver], two[solver], three[solver])):
            if i in fwd:
                assert torch.equal(x, y) and torch.equal(x, z), (solver, i)
            else:  # gradients: the weight reductions are MKL GEMMs over the batch (thread-split)
                assert rel_err(y, x) < 1e-6 and rel_err(z, x) < 1e-6, (solver, i)
        for x, y in zip(one[solver], small[solver]):
            if x.is_floating_point():
                assert rel_err(y, x) < 1e-5, solver
            else:
                assert (x - y).abs().max() <= 1, solver


_MKL_SCRIPT = r"""
import sys, torch, dynalay
torch.set_num_threads(2)
out = []
for dt in (torch.float32, torch.float64):
    for (B, H, L) in ((1, 20, 2), (3, 64, 3), (50, 33, 2), (600, 128, 4)):
        g = torch.Generator().manual_seed(B + H)
        a = torch.randint(0, L + 1, (B,), generator=g)
        h = torch.randn(B, H, generator=g, dtype=dt)
        U = torch.randn(L, H, H, generator=g, dtype=dt) / H ** 0.5
        W = torch.randn(L, H, H, generator=g, dtype=dt)
        W = 0.9 * W / torch.linalg.matrix_norm(W, 2).view(L, 1, 1)
        b = 0.1 * torch.randn(L, H, generator=g, dtype=dt)
        for Wl in (W, W.transpose(1, 2).contiguous().transpose(1, 2)):  # both layouts of W
            for solver in ("picard", "anderson"):
                ps = [t.clone().requires_grad_() for t in (h, U, Wl, b)]
                r = dynalay.dynamic_step(ps[0], a, *ps[1:], solver=solver, backend="cpp", tol=1e-5, max_iter=30)
                (r.h * torch.linspace(-1, 1, H, dtype=dt)).sum().backward()
                out += [r.h.detach(), r.iters] + [p.grad for p in ps]
                f = dynalay.fixed_point(h @ U[0].t(), Wl[0], solver=solver, backend="cpp")
                out += [f.z, f.iters]
torch.save(out, sys.argv[1])
"""


@pytest.mark.skipif(dynalay.backends.availability_error("cpp") is not None, reason="cpp backend not built")
def test_cpp_direct_mkl_calls_equal_the_aten_calls(tmp_path):
    """The solve iteration calls MKL's GEMM and VML tanh directly when the wheel exports them;
    DYNALAY_CPU_ATEN_BLAS=1 forces at::addmm_out / tanh_: every output, gradient and iteration
    count must be bitwise the same (forward, adjoint, Picard, Anderson, fp32, fp64, B = 1 to 600,
    W row- or column-major)."""
    import subprocess
    import sys
    script = tmp_path / "run.py"
    script.write_text(_MKL_SCRIPT)
    res = []
    for aten in (False, True):
        env = dict(os.environ)
        env.pop("DYNALAY_CPU_ATEN_BLAS", None)
        if aten:
            env["DYNALAY_CPU_ATEN_BLAS"] = "1"
        path = tmp_path / f"out_{aten}.pt"
        p = subprocess.run([sys.executable, str(script), str(path)], env=env, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        res.append(torch.load(path))
    assert len(res[0]) == len(res[1]) == 256
    for i, (x, y) in enumerate(zip(*res)):
        assert torch.equal(x, y), i


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("backward", ["implicit", "phantom"])
def test_eager_path_equals_the_registered_op(backend, backward, gen):
    """dynalay.dynamic_step / fixed_point run an autograd.Function over the registered ops'
    implementation in eager mode (or the implementation alone when nothing needs a gradient) (the custom op's Python layer costs ~0.1-0.5 ms per call) and
    the ops themselves under torch.compile: outputs, statistics and gradients must be identical."""
    from dynalay.ops.dispatch import _DynamicStepFn, dynamic_step_op
    from dynalay.ops.dispatch import prepare_solve_args as _prepare
    from dynalay.ops.fixed_point import _FixedPointFn, fixed_point_fwd
    B, H, L = 21, 12, 3
    params = make_step_params(B, H, L, torch.float64, gen)
    a = make_actions("nop50", B, L, gen)
    G = torch.randn(B, H, generator=gen, dtype=torch.float64)
    args = _prepare(1e-9, 200, "picard", 1.0, 5, 1e-6, 1e-12, backward, None, None, None, 3, 0.5, "none")
    outs = []
    for op in (_DynamicStepFn, dynamic_step_op):
        ps = [p.clone().requires_grad_() for p in params]
        r = op(ps[0], a, *ps[1:], *args, backend, backend)
        (r[0] * G).sum().backward()
        outs.append(list(r) + [p.grad for p in ps])
    inj = params[0] @ params[1][0].t()
    Wf = params[2][:1]
    for op in (_FixedPointFn, fixed_point_fwd):
        i_, w_ = inj.clone().requires_grad_(), Wf.clone().requires_grad_()
        r = op(i_, w_, None, None, *args, backend, backend)
        (r[0] * G).sum().backward()
        outs.append(list(r) + [i_.grad, w_.grad])
    # with nothing for autograd to record (no_grad, or no input requiring grad) the eager path
    # runs the implementation without the autograd.Function: the same outputs, bit for bit
    with torch.no_grad():
        nog = [list(_DynamicStepFn(params[0], a, *params[1:], *args, backend, backend)),
               list(_FixedPointFn(inj, Wf, None, None, *args, backend, backend))]
    nog_plain = [list(_DynamicStepFn(params[0], a, *params[1:], *args, backend, backend)),
                 list(_FixedPointFn(inj, Wf, None, None, *args, backend, backend))]
    for got, ref in ((nog[0], outs[1]), (nog[1], outs[3]), (nog_plain[0], outs[1]), (nog_plain[1], outs[3])):
        assert not any(t.requires_grad for t in got)
        for x, y in zip(got, ref):
            assert torch.equal(x, y.detach())
    for x, y in zip(outs[0], outs[1]):
        assert torch.equal(x, y)
    for x, y in zip(outs[2], outs[3]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_make_fx_traces_the_registered_ops(backend, gen):
    """Under a dispatch mode (make_fx, opcheck, AOTAutograd) the public functions must call the
    registered ops, never the eager shortcut (whose implementations read values on the host)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    h, U, W, b = make_step_params(6, 5, 2, torch.float64, gen)
    a = torch.tensor([0, 1, 2, 0, 1, 2])

    def step(h, a, U, W, b):
        return dynalay.dynamic_step(h, a, U, W, b, check="none", backend=backend).h

    def fp(i, w):
        return dynalay.fixed_point(i, w, check="none", backend=backend).z

    for fn, args, op in ((step, (h, a, U, W, b), "dynalay.dynamic_step.default"),
                         (fp, (h, W[0]), "dynalay.fixed_point_fwd.default")):
        g = make_fx(fn, tracing_mode="fake")(*args)
        targets = {str(n.target) for n in g.graph.nodes if n.op == "call_function"}
        assert op in targets, targets
    # plain tensors and nn.Parameters (what modules pass) take the eager path, subclasses the op
    from dynalay.ops._common import tracing
    assert not tracing(h, nn.Parameter(U), None, 1.0)
    assert tracing(h, torch.Tensor._make_subclass(type("Sub", (torch.Tensor,), {}), U))



@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("backward", ["implicit", "phantom"])
def test_empty_batch(backend, backward, gen):
    """B = 0 (every row finished earlier, say): an empty result, zero weight gradients and an empty
    input gradient, as a torch layer gives on an empty batch; the same for the module and under
    torch.compile.  (``fixed_point``, ``route`` and ``dispatch`` accept B = 0 too.)"""
    h, U, W, b = make_step_params(5, 6, 3, torch.float32, gen)
    h = h[:0].clone().requires_grad_()
    U, W, b = (p.requires_grad_() for p in (U, W, b))
    a = torch.zeros(0, dtype=torch.long)
    r = dynalay.dynamic_step(h, a, U, W, b, backend=None if backend == "auto" else backend, backward=backward)
    assert r.h.shape == (0, 6) and r.iters.shape == (0,) and r.converged.shape == (0,)
    assert r.iters.dtype == torch.int32 and r.converged.dtype == torch.bool
    r.h.sum().backward()
    assert h.grad.shape == (0, 6)
    for p in (U, W, b):
        assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any()
    m = DynamicFPIStep(num_layers=3, hidden=6)
    assert m(h.detach(), a).h.shape == (0, 6)
    f = torch.compile(lambda h, a: dynalay.dynamic_step(h, a, U.detach(), W.detach(), b.detach()).h, fullgraph=True)
    assert f(h.detach(), a).shape == (0, 6)

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_route_and_dynamic_step(backend, gen):
    from torch.library import opcheck
    a = torch.tensor([0, 2, 1, 1, 2, 0, 1])
    opcheck(torch.ops.dynalay.route, (a, 2, 4))
    opcheck(torch.ops.dynalay.route, (torch.full((3,), 2), 2, 16))
    for rg in (True, False):
        h, U, W, b = [p.requires_grad_(rg) for p in make_step_params(7, 5, 2, torch.float64, gen)]
        args = (h, a, U, W, b, 1e-8, 200, "picard", 1.0, 5, 1e-6, 1e-12, "implicit", 1e-8, 200, "picard", 1.0, 5,
                1e-6, 1e-12, 3, 0.5, "none", backend, backend)
        opcheck(torch.ops.dynalay.dynamic_step, args)


def test_opcheck_fused_internal_ops(gen):
    """The C++ ops behind the fused cpp (and cuda) paths: schema, fake kernels, and outputs that
    never alias (the ones not asked for are distinct empty tensors)."""
    from dynalay import _ext
    from torch.library import opcheck
    if _ext.cpp_error():
        pytest.skip(f"dynalay._C is unavailable: {_ext.cpp_error()}")
    dynalay.backends.get("cpp")  # registers the fake kernels
    a = torch.tensor([0, 2, 1, 1, 2, 0, 1])
    h, U, W, b = make_step_params(7, 5, 2, torch.float64, gen)
    cfg = (1e-8, 200, "picard", 1.0, 5, 1e-6, 1e-12)
    opcheck(torch.ops.dynalay_C.dynamic_step, (h, a, U, W, b) + cfg)
    z = torch.tanh(h)
    for step in (False, True):
        for wants in ((True, True, step, step), (False, True, False, step), (True, False, step, False)):
            opcheck(torch.ops.dynalay_C.implicit_backward,
                    (z, h, W, a, h if step else None, U if step else None) + wants + cfg)


def test_torch_compile_fullgraph_dynamic_step(gen):
    step = DynamicFPIStep(3, 16, check="none", tol=1e-6, max_iter=100).double()
    h = torch.randn(20, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    a = make_actions("uniform", 20, 3, gen)

    def f(h, a):
        r = dynalay.dynamic_step(h, a, step.U, step.W * 0.5, step.b, check="none", tol=1e-6, max_iter=100)
        routing = dynalay.route(a, 3, 8, check="none")
        return r.h.square().sum() + routing.counts.sum() * 0

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(h, a)
    out.backward()
    g = h.grad.clone()
    h.grad = None
    ref = f(h, a)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, h.grad)


def test_dynamic_fpi_step_module(gen):
    torch.manual_seed(0)
    step = DynamicFPIStep(4, 12, tol=1e-6)
    h = torch.randn(9, 12)
    a = make_actions("uniform", 9, 4, gen)
    r = step(h, a)
    assert r.h.shape == (9, 12) and step.last_result is not None
    r.h.sum().backward()
    assert step.U.grad is not None and step.W.grad is not None and step.b.grad is not None
    step.eval()
    sig = torch.linalg.matrix_norm(step.effective_weight().detach(), 2)
    assert (sig <= 0.9 * 1.02).all()


@pytest.mark.parametrize("kind", ["uniform", "allnop", "onelayer"])
def test_dispatch_arbitrary_modules(kind, gen):
    torch.manual_seed(0)
    mods = nn.ModuleList([nn.Linear(6, 6), nn.Sequential(nn.Linear(6, 6), nn.Tanh()), nn.Identity()])
    x = torch.randn(13, 6, requires_grad=True)
    a = make_actions(kind, 13, 3, gen)
    y = dynalay.dispatch(x, a, mods)
    ref = torch.stack([mods[int(a[i])](x[i:i + 1])[0] if a[i] < 3 else x[i] for i in range(13)])
    torch.testing.assert_close(y, ref)
    y.square().sum().backward()
    g = x.grad.clone()
    x.grad = None
    ref.square().sum().backward()
    torch.testing.assert_close(g, x.grad)


def test_nop_rows_cost_nothing(gen):
    h, U, W, b = make_step_params(10, 8, 2, torch.float32, gen)
    a = torch.full((10,), 2)
    r = dynalay.dynamic_step(h, a, U, W, b)
    assert torch.equal(r.h, h) and (r.iters == 0).all() and r.converged.all()


GL, GW = dynalay.ops.grouped_linear, dynalay.ops.grouped_wgrad
BAD = [
    (lambda h, a, U, W, b: dynalay.dynamic_step(h, a + 5, U, W, b), ValueError, "actions must lie in"),
    (lambda h, a, U, W, b: dynalay.dynamic_step(h, a - 5, U, W, b), ValueError, "actions must lie in"),
    (lambda h, a, U, W, b: dynalay.dynamic_step(h, a.float(), U, W, b), TypeError, "actions must be int64"),
    (lambda h, a, U, W, b: dynalay.dynamic_step(h, a[:3], U, W, b), ValueError, "actions must have shape"),
    (lambda h, a, U, W, b: dynalay.dynamic_step(h[:, :3], a, U, W, b), ValueError, "U must have shape"),
    (lambda h, a, U, W, b: dynalay.dynamic_step(h, a, U, W[:1], b), ValueError, "W must have shape"),
    (lambda h, a, U, W, b: dynalay.dynamic_step(h, a, U, W, b[:, :2]), ValueError, "b must have shape"),
    (lambda h, a, U, W, b: dynalay.dynamic_step(h, a, U.double(), W, b), TypeError, "U has dtype"),
    (lambda h, a, U, W, b: dynalay.dynamic_step(h, a, U, W, b, tol=0), ValueError, "tol"),
    (lambda h, a, U, W, b: dynalay.dynamic_step(h, a, U, W, b, stop_mode="abs"), TypeError, "stop_mode"),
    (lambda h, a, U, W, b: dynalay.dynamic_step(h, a, U[:0], W[:0], b[:0]), ValueError, "U must have shape"),
    (lambda h, a, U, W, b: dynalay.dynamic_step(h.clone().fill_(float("nan")), a, U, W, b), ValueError, "h contains"),
    (lambda h, a, U, W, b: dynalay.route(a, 0), ValueError, "num_layers"),
    (lambda h, a, U, W, b: dynalay.route(a, 2, 0), ValueError, "block_m"),
    (lambda h, a, U, W, b: dynalay.route(a, True), ValueError, "num_layers"),
    (lambda h, a, U, W, b: dynalay.route(a, 2, True), ValueError, "block_m"),
    (lambda h, a, U, W, b: dynalay.dispatch(h, a, []), ValueError, "modules"),
    (lambda h, a, U, W, b: GL(h, U, b, a[:3]), ValueError, "actions must have shape"),
    (lambda h, a, U, W, b: GL(h, U, b, a + 1), ValueError, "actions must lie in"),
    (lambda h, a, U, W, b: GL(h[:, :3], U, b, a), ValueError, "U must have shape"),
    (lambda h, a, U, W, b: GL(h, U, b[:, :3], a), ValueError, "b must have shape"),
    (lambda h, a, U, W, b: GL(h, U.double(), b, a), TypeError, "U has dtype"),
    (lambda h, a, U, W, b: GL(h, U, b, a, 1), TypeError, "transpose"),
    (lambda h, a, U, W, b: GL(h.long(), U, b, a), TypeError, "x must be"),
    (lambda h, a, U, W, b: GW(h, h, a, 1), ValueError, "actions must lie in"),
    (lambda h, a, U, W, b: GW(h, h[:2], a, 2), ValueError, "x must have 6 rows"),
    (lambda h, a, U, W, b: GW(h, h, a, True), ValueError, "num_layers"),
    (lambda h, a, U, W, b: GW(h, h, a, 2, check="always"), ValueError, "check"),
    (lambda h, a, U, W, b: dynalay.dispatch(h, a, [nn.Linear(8, 3), nn.Linear(8, 3)]), ValueError, "returned shape"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("B,K,N,L", [(1, 1, 1, 1), (7, 5, 3, 3), (33, 20, 12, 4)])
def test_grouped_linear_and_wgrad_match_a_row_loop(backend, transpose, B, K, N, L, gen):
    """The public grouped building blocks: per-row float64 loop, NOP rows (0 / nothing added), an
    empty layer, and gradients of grouped_linear in x, U and b (gradcheck on torch and cpp)."""
    f64 = torch.float64
    x = torch.randn(B, K, generator=gen, dtype=f64)
    U = torch.randn(L, K, N, generator=gen, dtype=f64) if transpose else torch.randn(L, N, K, generator=gen, dtype=f64)
    b = torch.randn(L, N, generator=gen, dtype=f64)
    a = torch.randint(0, L + 1, (B,), generator=gen)
    a[a == L - 1] = L if L > 1 else a[a == L - 1]  # layer L-1 empty when there are others
    y = dynalay.ops.grouped_linear(x, U, b, a, transpose, backend)
    ref = torch.stack([(x[i] @ U[a[i]] if transpose else U[a[i]] @ x[i]) + b[a[i]] if a[i] < L
                       else torch.zeros(N, dtype=f64) for i in range(B)])
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    u = torch.randn(B, N, generator=gen, dtype=f64)
    out = dynalay.ops.grouped_wgrad(u, x, a, L, backend)
    ref_w = torch.stack([sum((torch.outer(u[i], x[i]) for i in range(B) if a[i] == l), torch.zeros(N, K, dtype=f64))
                         for l in range(L)])
    torch.testing.assert_close(out, ref_w, rtol=1e-12, atol=1e-12)
    if backend != "triton":
        ps = [t.clone().requires_grad_() for t in (x, U, b)]
        assert torch.autograd.gradcheck(lambda *p: dynalay.ops.grouped_linear(*p, a, transpose, backend), ps)


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input(case, gen):
    fn, exc, match = BAD[case]
    h, U, W, b = make_step_params(6, 8, 2, torch.float32, gen)
    a = torch.tensor([0, 1, 2, 0, 1, 1])
    with pytest.raises(exc, match=match):
        fn(h, a, U, W, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_phantom_backward_builds_the_projection_in_float32(dtype, monkeypatch):
    """The forward computes U h + b in float32 for 16-bit inputs (README); the phantom backward
    rebuilt it in the input's dtype (a rounded inj for the phantom steps)."""
    import sys
    dmod = sys.modules["dynalay.ops.dispatch"]  # (dynalay.ops.dispatch is also the function)
    seen = []
    real = dmod.phantom_grads

    def spy(z, inj, *a, **k):
        seen.append(inj.dtype)
        return real(z, inj, *a, **k)

    monkeypatch.setattr(dmod, "phantom_grads", spy)
    L, H, B = 2, 8, 4
    h = torch.randn(B, H, dtype=dtype, requires_grad=True)
    U, b = torch.randn(L, H, H, dtype=dtype), torch.randn(L, H, dtype=dtype)
    W = (0.1 * torch.randn(L, H, H)).to(dtype)
    r = dynalay.dynamic_step(h, torch.tensor([0, 1, 0, 2]), U, W, b, backward="phantom", backend="torch")
    r.h.float().sum().backward()
    assert seen == [torch.float32] and h.grad.dtype == dtype and torch.isfinite(h.grad).all()
