"""The CUDA C++ backend (dynalay._C_cuda: csrc/cuda + kernels/) against the torch backend on the GPU.

Reference: backend="torch" on CUDA tensors in float64.  The CUDA kernels iterate in float32, so
a row may stop one iteration earlier or later than the reference when its residual lands next to
tol: iteration counts must agree within 1, z must agree to float32 tolerances on rows that
stopped at the same iteration (and to 10x that on the others).  Skipped without a GPU (conftest);
without a built extension these tests are skipped when the build was not asked for, and fail when
it was built but does not load.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import dynalay
from dynalay import _ext, backends
from dynalay.backends import torch_ref
from helpers import assert_close, make_W, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.cuda_ext]

DEV = "cuda"


@pytest.fixture(autouse=True)
def _cuda_ext():
    err = backends.availability_error("cuda")
    if err:
        info = _ext.build_info()
        if not info.get("cuda", False) and "cuda_error" not in info:
            pytest.skip(f"dynalay._C_cuda was not built ({err})")
        pytest.fail(f"the CUDA extension must load for these tests: {err}")
    yield


def problem(B, H, gen, kind="gauss", inj_scale=1.0):
    W = make_W(H, kind=kind, gen=gen)
    inj = inj_scale * torch.randn(B, H, generator=gen, dtype=torch.float64)
    return inj, W


def assert_iters_close(it, ref_it, slack=1):
    it, ref_it = it.cpu().long(), ref_it.cpu().long()
    d = (it - ref_it).abs()
    assert d.numel() == 0 or int(d.max()) <= slack, \
        f"iters differ by {int(d.max())}: {it[d > slack][:8].tolist()} vs {ref_it[d > slack][:8].tolist()}"


def assert_z_close(z, ref_z, it, ref_it, dtype=torch.float32, what="z"):
    same = (it.cpu() == ref_it.cpu())
    if bool(same.any()):
        assert_close(z.cpu()[same], ref_z.cpu()[same], dtype, what=f"{what} (rows with equal iters)")
    assert_close(z, ref_z, dtype, scale=10.0, what=f"{what} (all rows)")


def leaf(t, dtype, requires_grad=True):
    """A fresh leaf copy of ``t`` on the GPU."""
    return t.detach().to(DEV, dtype).clone().requires_grad_(requires_grad)


def fp(inj, W, backend, dtype, **kw):
    return dynalay.fixed_point(inj.to(DEV, dtype), W.to(DEV, dtype), backend=backend, **kw)


# ---------------------------------------------------------------------------------------------
# fixed_point forward
# ---------------------------------------------------------------------------------------------
SHAPES = [(1, 1), (1, 20), (7, 20), (5, 33), (257, 64), (33, 100), (40, 128), (9, 129), (65, 300), (17, 520),
          (17, 1024)]


@pytest.mark.parametrize("B,H", SHAPES)
def test_forward_matches_torch_float64(B, H, gen):
    inj, W = problem(B, H, gen)
    ref = fp(inj, W, "torch", torch.float64, max_iter=300)
    r = fp(inj, W, "cuda", torch.float32, max_iter=300)
    assert r.z.dtype == torch.float32 and r.z.shape == (B, H) and r.z.device.type == DEV
    assert r.iters.dtype == torch.int32 and r.converged.dtype == torch.bool and r.residual.dtype == torch.float32
    assert ref.converged.all() and r.converged.all()
    assert torch.equal(r.converged.cpu(), ref.converged.cpu())
    assert_iters_close(r.iters, ref.iters)
    assert_z_close(r.z, ref.z, r.iters, ref.iters)
    assert (r.residual < 1e-4).all()
    same = r.iters == ref.iters
    assert torch.allclose(r.residual[same].double(), ref.residual[same], rtol=5e-2, atol=2e-6)


def test_rows_converging_at_very_different_speeds(gen):
    B, H = 300, 24
    W = make_W(H, kind="sym", gen=gen)
    scale = torch.logspace(-4, 1, B, dtype=torch.float64)
    inj = torch.randn(B, H, generator=gen, dtype=torch.float64) * scale[:, None]
    inj[3] = 0.0
    ref = fp(inj, W, "torch", torch.float64, max_iter=400)
    r = fp(inj, W, "cuda", torch.float32, max_iter=400)
    assert int(ref.iters.max()) - int(ref.iters.min()) >= 5
    assert r.iters[3] == 1 and r.converged[3]
    assert torch.equal(r.converged.cpu(), ref.converged.cpu())
    assert_iters_close(r.iters, ref.iters)
    assert_z_close(r.z, ref.z, r.iters, ref.iters)


def test_damping_and_z0(gen):
    inj, W = problem(45, 37, gen)
    z0 = torch.randn(45, 37, generator=gen, dtype=torch.float64)
    kw = dict(damping=0.7, max_iter=300)
    ref = dynalay.fixed_point(inj.to(DEV), W.to(DEV), z0=z0.to(DEV), backend="torch", **kw)
    r = dynalay.fixed_point(inj.to(DEV, torch.float32), W.to(DEV, torch.float32), z0=z0.to(DEV, torch.float32),
                            backend="cuda", **kw)
    assert r.converged.all()
    assert_iters_close(r.iters, ref.iters)
    assert_z_close(r.z, ref.z, r.iters, ref.iters)


def test_max_iter_reached_keeps_last_iterate(gen):
    inj, W = problem(20, 30, gen)
    W = 3.0 * W / 0.9  # not contractive
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = fp(inj, W, "torch", torch.float64, max_iter=4, check="none")
        r = fp(inj, W, "cuda", torch.float32, max_iter=4, check="none")
    assert not r.converged.all()
    assert torch.equal(r.converged.cpu(), ref.converged.cpu())
    assert (r.iters[~r.converged] == 4).all()
    assert_z_close(r.z, ref.z, r.iters, ref.iters)


def test_non_contiguous_inputs(gen):
    inj, W = problem(64, 40, gen)
    big = torch.zeros(64, 80, dtype=torch.float32, device=DEV)
    big[:, ::2] = inj.to(DEV, torch.float32)
    inj_nc = big[:, ::2]
    W_nc = W.t().contiguous().to(DEV, torch.float32).t()
    assert not inj_nc.is_contiguous() and not W_nc.is_contiguous()
    r = dynalay.fixed_point(inj_nc, W_nc, backend="cuda")
    ref = fp(inj, W, "torch", torch.float64)
    assert_iters_close(r.iters, ref.iters)
    assert_z_close(r.z, ref.z, r.iters, ref.iters)


def test_h_above_1024_is_refused_with_a_clear_message(gen):
    inj = torch.randn(2, 1025, device=DEV)
    W = torch.zeros(1025, 1025, device=DEV)
    with pytest.raises(RuntimeError, match="1024"):
        dynalay.fixed_point(inj, W, backend="cuda")


def test_anderson_is_refused_by_the_op():
    # in a subprocess: an exception thrown by the extension's argument checks must reach Python as
    # a RuntimeError (a crash there is reported here as a failure instead of killing the run)
    import subprocess
    import sys
    code = ("import torch, dynalay, dynalay._C_cuda\n"
            "c = torch.randn(4, 8, device='cuda'); W = torch.zeros(1, 8, 8, device='cuda')\n"
            "try:\n"
            "    torch.ops.dynalay_C.fp_solve(c, W, None, None, None, False, 1e-4, 10, 'anderson', 1.0, 5, 1e-6, 1e-12)\n"
            "except RuntimeError as e:\n"
            "    print('RAISED', 'Picard' in str(e) or 'picard' in str(e))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"the extension crashed (rc={out.returncode}): {out.stderr[-2000:]}"
    assert "RAISED True" in out.stdout, out.stdout + out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
def _grads(inj, W, G, backend, dtype, **kw):
    i_, W_ = leaf(inj, dtype), leaf(W, dtype)
    r = dynalay.fixed_point(i_, W_, backend=backend, **kw)
    (r.z.double() * G.to(DEV)).sum().backward()
    return r, i_.grad, W_.grad


@pytest.mark.parametrize("B,H", [(7, 20), (33, 100), (12, 300)])
@pytest.mark.parametrize("backward", ["implicit", "phantom"])
def test_gradients_match_torch_float64(B, H, backward, gen):
    inj, W = problem(B, H, gen)
    G = torch.randn(B, H, generator=gen, dtype=torch.float64)
    kw = dict(tol=1e-6, max_iter=500, backward=backward)
    _, ri, rW = _grads(inj, W, G, "torch", torch.float64, **kw)
    _, gi, gW = _grads(inj, W, G, "cuda", torch.float32, **kw)
    assert gi.dtype == torch.float32 and gW.dtype == torch.float32
    assert rel_err(gi, ri) < 1e-4, rel_err(gi, ri)
    assert rel_err(gW, rW) < 1e-4, rel_err(gW, rW)


# ---------------------------------------------------------------------------------------------
# float16 / bfloat16 storage (float32 arithmetic)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H", [(33, 20), (40, 100), (9, 300)])
def test_low_precision_inputs(dtype, B, H, gen):
    inj, W = problem(B, H, gen)
    # the same rounded inputs, solved by the torch backend in float32
    ref = fp(inj.to(dtype).double(), W.to(dtype).double(), "torch", torch.float32, max_iter=300)
    r = fp(inj, W, "cuda", dtype, max_iter=300)
    assert r.z.dtype == dtype and r.residual.dtype == torch.float32
    assert r.converged.all()
    assert_iters_close(r.iters, ref.iters)
    assert (r.z.float() - ref.z).abs().max().item() < 2e-2
    # against the float32 solution of the unrounded problem: loose
    full = fp(inj, W, "torch", torch.float32, max_iter=300)
    assert (r.z.float() - full.z).abs().max().item() < (5e-2 if dtype == torch.bfloat16 else 2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients(dtype, gen):
    inj, W = problem(24, 40, gen)
    G = torch.randn(24, 40, generator=gen, dtype=torch.float64)
    _, ri, rW = _grads(inj.to(dtype).double(), W.to(dtype).double(), G, "torch", torch.float32, tol=1e-6,
                       max_iter=500)
    _, gi, gW = _grads(inj, W, G, "cuda", dtype, tol=1e-6, max_iter=500)
    assert gi.dtype == dtype and gW.dtype == dtype
    assert rel_err(gi.float(), ri) < 2e-2
    assert rel_err(gW.float(), rW) < 2e-2


# ---------------------------------------------------------------------------------------------
# every output element written, determinism
# ---------------------------------------------------------------------------------------------
def _poison_allocator():
    """Leave NaN in the caching allocator's free blocks (small and large pools), so that an
    output the kernels fail to write shows up as NaN."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    keep = [torch.full((n,), float("nan"), device=DEV) for n in [2**k for k in range(6, 18)] * 8]
    keep.append(torch.full((64 * 2**20,), float("nan"), device=DEV))
    keep.append(torch.full((8 * 2**20,), float("nan"), device=DEV))
    del keep


@pytest.mark.parametrize("B,H", [(1000, 20), (300, 300), (50, 1024)])
def test_every_output_element_is_written(B, H, gen):
    inj, W = problem(B, H, gen)
    _poison_allocator()
    i_, W_ = leaf(inj, torch.float32), leaf(W, torch.float32)
    r = dynalay.fixed_point(i_, W_, backend="cuda", max_iter=300)
    assert torch.isfinite(r.z).all() and torch.isfinite(r.residual).all()
    assert (r.iters >= 1).all() and r.converged.all()
    _poison_allocator()
    (r.z * r.z).sum().backward()
    assert torch.isfinite(i_.grad).all() and torch.isfinite(W_.grad).all()

    L = 3
    h = torch.randn(B, H, generator=gen).to(DEV)
    actions = torch.randint(0, L + 1, (B,), generator=gen).to(DEV)
    U = leaf(0.5 * torch.randn(L, H, H, generator=gen) / H ** 0.5, torch.float32)
    Ws = leaf(make_W(H, L=L, gen=gen), torch.float32)
    b = leaf(0.1 * torch.randn(L, H, generator=gen), torch.float32)
    _poison_allocator()
    out = dynalay.dynamic_step(h, actions, U, Ws, b, backend="cuda", max_iter=300)
    assert torch.isfinite(out.h).all()
    _poison_allocator()
    out.h.square().sum().backward()
    for t in (U.grad, Ws.grad, b.grad):
        assert torch.isfinite(t).all()


def test_deterministic(gen):
    B, H, L = 700, 96, 4
    inj, W = problem(B, H, gen)
    h = torch.randn(B, H, generator=gen).to(DEV)
    actions = torch.randint(0, L + 1, (B,), generator=gen).to(DEV)
    U0 = 0.5 * torch.randn(L, H, H, generator=gen) / H ** 0.5
    Ws0 = make_W(H, L=L, gen=gen, dtype=torch.float32)
    b0 = 0.1 * torch.randn(L, H, generator=gen)
    outs = []
    for _ in range(2):
        i_, W_ = leaf(inj, torch.float32), leaf(W, torch.float32)
        r = dynalay.fixed_point(i_, W_, backend="cuda")
        r.z.square().sum().backward()
        U, Ws, b = (leaf(t, torch.float32) for t in (U0, Ws0, b0))
        s = dynalay.dynamic_step(h, actions, U, Ws, b, backend="cuda")
        s.h.square().sum().backward()
        outs.append((r.z.detach(), r.iters, r.residual, i_.grad, W_.grad, s.h.detach(), s.iters, U.grad, Ws.grad,
                     b.grad))
    for a, b_ in zip(*outs):
        assert torch.equal(a, b_)


# ---------------------------------------------------------------------------------------------
# dynamic_step (grouped: routing, empty layers, NOP rows)
# ---------------------------------------------------------------------------------------------
def _actions(case, B, L, gen):
    if case == "mixed":
        return torch.randint(0, L + 1, (B,), generator=gen)
    if case == "empty_layers":  # layers 1 and 3 get no row
        return torch.tensor([0, 2, L])[torch.randint(0, 3, (B,), generator=gen)]
    if case == "all_nop":
        return torch.full((B,), L, dtype=torch.long)
    if case == "skewed":  # 90% on layer 1
        a = torch.randint(0, L + 1, (B,), generator=gen)
        a[torch.rand(B, generator=gen) < 0.9] = 1
        return a
    if case == "no_nop":
        return torch.randint(0, L, (B,), generator=gen)
    raise ValueError(case)


def _step_problem(B, H, L, gen):
    h = torch.randn(B, H, generator=gen, dtype=torch.float64)
    U = 0.5 * torch.randn(L, H, H, generator=gen, dtype=torch.float64) / H ** 0.5
    W = make_W(H, L=L, gen=gen)
    b = 0.1 * torch.randn(L, H, generator=gen, dtype=torch.float64)
    return h, U, W, b


def _step(h, actions, U, W, b, backend, dtype, grad=None, **kw):
    ts = [leaf(t, dtype, grad is not None) for t in (h, U, W, b)]
    out = dynalay.dynamic_step(ts[0], actions.to(DEV), ts[1], ts[2], ts[3], backend=backend, **kw)
    grads = None
    if grad is not None:
        (out.h.double() * grad.to(DEV)).sum().backward()
        grads = [t.grad for t in ts]
    return out, grads


@pytest.mark.parametrize("case", ["mixed", "empty_layers", "all_nop", "skewed", "no_nop"])
@pytest.mark.parametrize("B,H,L", [(600, 48, 4), (1, 20, 2), (130, 300, 3)])
def test_dynamic_step_matches_torch(case, B, H, L, gen):
    h, U, W, b = _step_problem(B, H, L, gen)
    actions = _actions(case, B, L, gen)
    G = torch.randn(B, H, generator=gen, dtype=torch.float64)
    kw = dict(tol=1e-6, max_iter=400)
    ref, rg = _step(h, actions, U, W, b, "torch", torch.float64, grad=G, **kw)
    out, og = _step(h, actions, U, W, b, "cuda", torch.float32, grad=G, **kw)
    nop = (actions == L).to(DEV)
    assert out.h.dtype == torch.float32
    assert torch.equal(out.h[nop], h.to(DEV, torch.float32)[nop])
    assert (out.iters[nop] == 0).all() and out.converged[nop].all()
    assert torch.equal(out.converged.cpu(), ref.converged.cpu())
    assert_iters_close(out.iters, ref.iters)
    assert_z_close(out.h, ref.h, out.iters, ref.iters, what="h")
    for name, a, r in zip(("dh", "dU", "dW", "db"), og, rg):
        assert a.dtype == torch.float32
        assert rel_err(a, r) < 1e-4, (name, rel_err(a, r))


def test_dynamic_step_large_batch(gen):
    B, H, L = 100_000, 32, 3
    h, U, W, b = _step_problem(B, H, L, gen)
    actions = _actions("skewed", B, L, gen)
    ref, _ = _step(h, actions, U, W, b, "torch", torch.float32, max_iter=300)
    out, _ = _step(h, actions, U, W, b, "cuda", torch.float32, max_iter=300)
    assert torch.equal(out.converged.cpu(), ref.converged.cpu())
    assert_iters_close(out.iters, ref.iters)
    assert_close(out.h, ref.h, torch.float32, scale=10.0, what="h")


# ---------------------------------------------------------------------------------------------
# the grouped ops directly
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_grouped_linear_matches_torch_ref(dtype, transpose, with_bias, gen):
    B, K, N, L = 5000, 33, 65, 3
    x = torch.randn(B, K, generator=gen)
    U = torch.randn(L, K, N, generator=gen) if transpose else torch.randn(L, N, K, generator=gen)
    b = torch.randn(L, N, generator=gen) if with_bias else None
    actions = _actions("skewed", B, L, gen)
    be = backends.get("cuda")
    y = be.grouped_linear(x.to(DEV, dtype), U.to(DEV, dtype), None if b is None else b.to(DEV, dtype),
                          actions.to(DEV), transpose)
    rd = lambda t: None if t is None else t.to(dtype).double()  # noqa: E731
    ref = torch_ref.grouped_linear(rd(x), rd(U), rd(b), actions, transpose)
    assert y.dtype == dtype and y.shape == (B, N)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert (y.double().cpu() - ref).abs().max().item() <= tol * (1 + ref.abs().max().item())
    assert (y[(actions == L).to(DEV)] == 0).all()


@pytest.mark.parametrize("B,N,K,L,grouped", [(20000, 48, 49, 3, True), (777, 130, 1, 5, True), (3, 7, 9, 2, True),
                                             (50000, 64, 65, 1, False), (9, 1025, 20, 1, False)])
def test_grouped_wgrad_matches_torch_ref(B, N, K, L, grouped, gen):
    u = torch.randn(B, N, generator=gen, dtype=torch.float64)
    x = torch.randn(B, K, generator=gen, dtype=torch.float64)
    actions = _actions("mixed", B, L, gen) if grouped else None
    out = backends.get("cuda").grouped_wgrad(u.to(DEV, torch.float32), x.to(DEV, torch.float32),
                                             None if actions is None else actions.to(DEV), L)
    ref = torch_ref.grouped_wgrad(u.float().double(), x.float().double(), actions, L)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_err(out.cpu(), ref) < 5e-5
    again = backends.get("cuda").grouped_wgrad(u.to(DEV, torch.float32), x.to(DEV, torch.float32),
                                               None if actions is None else actions.to(DEV), L)
    assert torch.equal(out, again)


def _without_fused(monkeypatch):
    """The per-op cuda path: dynamic_step as grouped_linear + fp_solve, the backward as the adjoint
    fp_solve (d formed by torch) + grouped_wgrad (what DYNALAY_CUDA_FUSED=0 runs)."""
    be = backends.get("cuda")
    monkeypatch.delattr(be, "dynamic_step")
    monkeypatch.delattr(be, "implicit_backward")


@pytest.mark.parametrize("B,H", [(1, 20), (1000, 64), (777, 128), (300, 300)])
def test_fused_fixed_point_backward_equals_the_per_op_path(B, H, gen, monkeypatch):
    """The one-call backward (d = 1 - z*^2 in the solve kernel, same wgrad kernel) gives the bits of
    the per-op path; the forward reads W in place (m_is_w) where H <= 128 and matches torch."""
    assert hasattr(backends.get("cuda"), "implicit_backward"), "DYNALAY_CUDA_FUSED=0 in the environment?"
    inj, W = problem(B, H, gen)
    G = torch.randn(B, H, generator=gen, dtype=torch.float64).to(DEV, torch.float32)
    outs = []
    for fused in (True, False):
        with monkeypatch.context() as m:
            if not fused:
                _without_fused(m)
            i_, W_ = leaf(inj, torch.float32), leaf(W, torch.float32)
            r = dynalay.fixed_point(i_, W_, backend="cuda", tol=1e-6, max_iter=300)
            (r.z * G).sum().backward()
            st = dynalay.ops.last_backward_stats
            outs.append((r.z, r.iters, i_.grad, W_.grad, st["iters"].clone(), st["converged"].clone()))
    for name, a, b in zip(("z", "iters", "dinj", "dW", "adjoint iters", "adjoint converged"), *outs):
        assert torch.equal(a, b), (name, (a.double() - b.double()).abs().max())
    ref = torch_ref.fp_solve(inj, W.unsqueeze(0), None, None, None, False, 1e-6, 300, "picard", 1.0, 5, 1e-6, 1e-12)
    assert_iters_close(outs[0][1], ref[1])
    assert_z_close(outs[0][0], ref[0], outs[0][1], ref[1])


@pytest.mark.parametrize("case", ["mixed", "empty_layers", "all_nop", "skewed", "no_nop"])
@pytest.mark.parametrize("B,H,L", [(600, 48, 4), (1, 20, 2), (130, 300, 3), (4096, 128, 4)])
def test_fused_dynamic_step_equals_the_per_op_path(case, B, H, L, gen, monkeypatch):
    """The cuda dynamic_step (one routing for projection and solve) and its one-call backward
    against the per-op path: forward, iterations, dh and dW bit for bit (same kernels, same
    tiles); dU and db (one reduction of [h, 1] there, two here) to float32 rounding."""
    h, U, W, b = _step_problem(B, H, L, gen)
    actions = _actions(case, B, L, gen)
    G = torch.randn(B, H, generator=gen, dtype=torch.float64)
    runs = []
    for fused in (True, False):
        with monkeypatch.context() as m:
            if not fused:
                _without_fused(m)
            out, grads = _step(h, actions, U, W, b, "cuda", torch.float32, grad=G, tol=1e-6, max_iter=300)
            runs.append((out, grads, dynalay.ops.last_backward_stats["iters"].clone()))
    (o1, g1, it1), (o2, g2, it2) = runs
    for name, a, c in (("h", o1.h, o2.h), ("iters", o1.iters, o2.iters), ("converged", o1.converged, o2.converged),
                       ("adjoint iters", it1, it2), ("dh", g1[0], g2[0]),
                       ("dW", g1[2], g2[2])):
        assert torch.equal(a, c), (name, (a.double() - c.double()).abs().max())
    for name, a, c in (("dU", g1[1], g2[1]), ("db", g1[3], g2[3])):
        assert rel_err(a, c) < 1e-6, (name, rel_err(a, c))


def test_opcheck_cuda_ops(gen):
    from torch.library import opcheck
    inj = leaf(torch.randn(6, 5, generator=gen), torch.float32)
    W = leaf(make_W(5, gen=gen).unsqueeze(0), torch.float32)
    args = (inj, W, None, None, 1e-6, 200, "picard", 1.0, 5, 1e-6, 1e-12, "implicit", 1e-6, 200, "picard",
            1.0, 5, 1e-6, 1e-12, 3, 0.5, "none", "cuda", "cuda")
    opcheck(torch.ops.dynalay.fixed_point_fwd, args)
    acts = torch.tensor([0, 1, 1, 0, 2, 1], device=DEV)
    U = leaf(torch.randn(2, 4, 5, generator=gen), torch.float32)
    b = leaf(torch.randn(2, 4, generator=gen), torch.float32)
    opcheck(torch.ops.dynalay.grouped_linear, (inj, U, b, acts, False, "cuda"))
    opcheck(torch.ops.dynalay.grouped_wgrad, (inj.detach(), inj.detach(), acts, 2, "cuda"))
    # the fused internal ops (fake kernels in dynalay/backends/cpp.py)
    h, W2 = inj.detach()[:, :4], leaf(make_W(4, L=2, gen=gen), torch.float32, False)
    cfg = (1e-6, 200, "picard", 1.0, 5, 1e-6, 1e-12)
    U2 = U.detach()[:, :, :4].contiguous()
    opcheck(torch.ops.dynalay_C.dynamic_step, (h, acts, U2, W2, b.detach()) + cfg)
    z = torch.tanh(h)
    for step in (False, True):
        opcheck(torch.ops.dynalay_C.implicit_backward,
                (z, h, W2, acts, h if step else None, U2 if step else None, True, True, step, step) + cfg)


# ---------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------
def test_cuda_backend_is_selectable(monkeypatch):
    monkeypatch.delenv("DYNALAY_BACKEND", raising=False)
    backends._cache.clear()
    try:
        assert backends.not_supported_reasons("cuda", "cuda", torch.float32) == []
        assert backends.not_supported_reasons("cuda", "cuda", torch.bfloat16) == []
        assert backends.select("cuda", torch.float32) in backends.NAMES
        assert backends.select("cuda", torch.float32, backend="cuda") == "cuda"
        assert backends.not_supported_reasons("cuda", "cuda", torch.float32, ("anderson",))
    finally:
        backends._cache.clear()
