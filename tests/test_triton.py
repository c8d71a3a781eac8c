"""The Triton kernels on CPU under TRITON_INTERPRET=1 (fp32/fp64) against the torch_ref backend:
z to 1e-5, iters equal (up to the fp32 rounding band), gradients to 1e-4; fast (resident W) and
tiled (H > 128) paths, masked tails, B=1, rows converging at different speeds, all rows
converged at once.  On a machine with CUDA these run in tests/test_gpu.py instead."""
import os

import pytest
import torch

import dynalay
from dynalay import backends
from helpers import assert_close, assert_iters, make_W, ref_solve, rel_err

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU tensors run the Triton kernels only under TRITON_INTERPRET=1 "
                                       "(set by tests/conftest.py when no CUDA device exists)")

SHAPES = [(1, 20), (7, 20), (33, 64), (5, 100), (16, 128), (3, 130), (2, 200)]


def problem(B, H, dtype, gen, kind="gauss", scale=1.0):
    W = make_W(H, kind=kind, gen=gen).to(dtype)
    inj = (scale * torch.randn(B, H, generator=gen, dtype=torch.float64)).to(dtype)
    return inj, W


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,H", SHAPES)
def test_forward_matches_torch_ref(B, H, dtype, gen):
    inj, W = problem(B, H, dtype, gen)
    a = dynalay.fixed_point(inj, W, backend="torch", max_iter=300)
    t = dynalay.fixed_point(inj, W, backend="triton", max_iter=300)
    _, _, _, _, amb = ref_solve(inj, W, max_iter=300, band=1e-2)
    assert t.z.dtype == dtype and t.converged.all()
    assert_iters(t.iters, a.iters, amb)
    assert torch.equal(t.converged, a.converged)
    d = t.z.double() - a.z.double()
    same = t.iters == a.iters
    assert d[same].abs().max() < (1e-12 if dtype == torch.float64 else 1e-5)
    # a row whose stop lies within fp32 rounding of tol (amb) may take one more iteration on one
    # backend: its z then moves by one step, at most about the residual tol (1e-4) relative
    rel = d[~same].norm(dim=1) / a.z.double()[~same].norm(dim=1)
    assert rel.numel() == 0 or float(rel.max()) < 2e-4, rel


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,H", [(7, 20), (16, 100), (3, 150)])
def test_gradients_match_torch_ref(B, H, dtype, gen):
    inj, W = problem(B, H, dtype, gen)
    G = torch.randn(B, H, generator=gen, dtype=torch.float64).to(dtype)
    grads = []
    for be in ("torch", "triton"):
        i_, W_ = inj.clone().requires_grad_(), W.clone().requires_grad_()
        (dynalay.fixed_point(i_, W_, backend=be).z * G).sum().backward()
        grads.append((i_.grad, W_.grad))
    for g0, g1 in zip(*grads):
        assert rel_err(g1, g0) < (1e-10 if dtype == torch.float64 else 1e-4)


def test_rows_converging_at_different_speeds_and_all_at_once(gen):
    B, H = 24, 32
    W = make_W(H, kind="sym", gen=gen)
    scale = torch.logspace(-4, 1, B, dtype=torch.float64)
    inj = torch.randn(B, H, generator=gen, dtype=torch.float64) * scale[:, None]
    t = dynalay.fixed_point(inj, W, backend="triton", max_iter=300)
    z, it, _, _, amb = ref_solve(inj, W, max_iter=300)
    assert_iters(t.iters, it, amb)
    assert t.iters.max() - t.iters.min() >= 5
    assert_close(t.z, z, torch.float64)
    zero = dynalay.fixed_point(torch.zeros(5, H, dtype=torch.float64), W, backend="triton")
    assert (zero.iters == 1).all() and zero.converged.all() and (zero.z == 0).all()


def test_damping_z0_and_divergence(gen):
    inj, W = problem(9, 20, torch.float64, gen)
    z0 = torch.randn(9, 20, generator=gen, dtype=torch.float64)
    t = dynalay.fixed_point(inj, W, damping=0.6, z0=z0, backend="triton", max_iter=300)
    z, it, _, _, amb = ref_solve(inj, W, damping=0.6, z0=z0, max_iter=300)
    assert_iters(t.iters, it, amb)
    assert_close(t.z, z, torch.float64)
    with pytest.warns(dynalay.ConvergenceWarning):
        d = dynalay.fixed_point(inj, W * 4, backend="triton", max_iter=20)
    a = dynalay.fixed_point(inj, W * 4, backend="torch", max_iter=20, check="none")
    assert torch.equal(d.converged, a.converged) and torch.isfinite(d.z).all()
    assert (d.iters[~d.converged] == 20).all()


def test_gradcheck_float64(gen):
    inj, W = problem(3, 4, torch.float64, gen)
    W = (W * 0.5 / 0.9).requires_grad_()
    inj.requires_grad_()
    f = lambda i, w: dynalay.fixed_point(i, w, tol=1e-13, max_iter=500, backend="triton").z
    assert torch.autograd.gradcheck(f, (inj, W), eps=1e-6, atol=1e-7)


def test_deterministic_and_opcheck(gen):
    from torch.library import opcheck
    inj, W = problem(20, 24, torch.float32, gen)
    outs = []
    for _ in range(2):
        i_, W_ = inj.clone().requires_grad_(), W.clone().requires_grad_()
        r = dynalay.fixed_point(i_, W_, backend="triton")
        r.z.square().sum().backward()
        outs.append((r.z.detach(), r.iters, i_.grad, W_.grad))
    for x, y in zip(*outs):
        assert torch.equal(x, y)
    i2, W2 = inj[:6, :5].double().requires_grad_(), (W[:5, :5].double() * 0.5).unsqueeze(0).requires_grad_()
    args = (i2, W2, None, None, 1e-8, 200, "picard", 1.0, 5, 1e-6, 1e-12, "implicit", 1e-8, 200, "picard", 1.0, 5,
            1e-6, 1e-12, 3, 0.5, "none", "triton", "triton")
    opcheck(torch.ops.dynalay.fixed_point_fwd, args)


def test_selection_on_cpu_prefers_cpp_and_refuses_bf16_under_interpreter():
    assert backends.select("cpu", torch.float32) in ("cpp", "torch")
    assert backends.select("cpu", torch.float32, backend="triton") == "triton"
    assert any("bf16" in r for r in backends.not_supported_reasons("triton", "cpu", torch.bfloat16))
    assert any("picard" in r for r in backends.not_supported_reasons("triton", "cpu", torch.float32, ("anderson",)))
    with pytest.raises(RuntimeError, match="picard"):
        dynalay.fixed_point(torch.randn(2, 3), make_W(3, dtype=torch.float32), backend="triton", solver="anderson")


@pytest.mark.parametrize("fast,tiled", [((32, 4), (64, 32, 4)), ((64, 8), (16, 16, 2))])
def test_other_launch_configurations_are_correct(fast, tiled, gen):
    from dynalay.backends import triton as tb
    try:
        tb.set_solve_config(fast=fast, tiled=tiled)
        for B, H in ((37, 100), (5, 150)):
            inj, W = problem(B, H, torch.float64, gen)
            params = [p for p in (inj, W)]
            a = dynalay.fixed_point(*params, backend="torch")
            t = dynalay.fixed_point(*params, backend="triton")
            assert torch.equal(t.iters, a.iters) and (t.z - a.z).abs().max() < 1e-12
        h = torch.randn(40, 20, generator=gen, dtype=torch.float64)
        U = torch.randn(3, 20, 20, generator=gen, dtype=torch.float64) / 5
        Wl = make_W(20, gen=gen, L=3)
        b = torch.randn(3, 20, generator=gen, dtype=torch.float64)
        acts = torch.randint(0, 4, (40,), generator=gen)
        a = dynalay.dynamic_step(h, acts, U, Wl, b, backend="torch")
        t = dynalay.dynamic_step(h, acts, U, Wl, b, backend="triton")
        assert torch.equal(t.iters, a.iters) and (t.h - a.h).abs().max() < 1e-12
    finally:
        tb.set_solve_config()


def test_routing_is_shared_inside_a_scope_and_recomputed_after_an_in_place_change(gen):
    """Inside ``route_scope`` (one backward pass) the triton backend reuses the routing of an
    actions tensor; an in-place change of the actions must not reuse it; outside a scope nothing
    is cached."""
    from dynalay.backends import triton as tb
    L, B = 3, 37
    a = torch.randint(0, L + 1, (B,), generator=gen)
    assert tb._route(a, L, 16) is not tb._route(a, L, 16)    # no scope: routed afresh
    with tb.route_scope():
        r1 = tb._route(a, L, 16)
        assert tb._route(a, L, 16) is r1                     # same tensor, same version: reused
        assert tb._route(a, L, 32, any_block=True) is r1      # perm/offsets of any tile size will do
        assert tb._route(a, L, 32) is not r1                  # tile tables for another block size
        with tb.route_scope():                               # nested: the outer scope's tables
            assert tb._route(a, L, 16) is r1
        a.copy_(torch.flip(a, [0]).remainder(L + 1))          # in place: a new version, a new routing
        r2 = tb._route(a, L, 16)
        assert r2 is not r1
        for x, y in zip(r2, dynalay.route(a, L, 16)):
            assert torch.equal(x, y)
        with torch.inference_mode():                         # no version counter: still routed
            ai = a.clone()
        assert tb._route(ai, L, 16) is tb._route(ai, L, 16)


def _step_problem(gen, L=3, B=37, H=20):
    h = torch.randn(B, H, generator=gen, dtype=torch.float64)
    U = torch.randn(L, H, H, generator=gen, dtype=torch.float64) / H ** 0.5
    W = torch.stack([make_W(H, gen=gen) for _ in range(L)])
    b = 0.1 * torch.randn(L, H, generator=gen, dtype=torch.float64)
    return h, U, W, b


@pytest.mark.parametrize("backward", ["implicit", "phantom"])
def test_one_routing_per_forward_and_per_backward(backward, gen, monkeypatch):
    """dynamic_step routes once in its forward and once in its backward (the adjoint solve or
    phantom steps, the transposed projection and the weight gradients share it), and the
    gradients equal the torch backend's."""
    from dynalay.backends import triton as tb
    L = 3
    h, U, W, b = _step_problem(gen, L)
    a = torch.randint(0, L + 1, (h.shape[0],), generator=gen)
    calls = []
    real = tb.route_tables
    monkeypatch.setattr(tb, "route_tables", lambda *args: calls.append(1) or real(*args))
    ps = [t.clone().requires_grad_() for t in (h, U, W, b)]
    got = dynalay.dynamic_step(ps[0], a, *ps[1:], backward=backward, backend="triton")
    assert len(calls) == 1
    (got.h * h).sum().backward()
    assert len(calls) == 2
    qs = [t.clone().requires_grad_() for t in (h, U, W, b)]
    ref = dynalay.dynamic_step(qs[0], a, *qs[1:], backward=backward, backend="torch")
    (ref.h * h).sum().backward()
    assert (got.h - ref.h).abs().max() < 1e-12
    for p, q in zip(ps, qs):
        assert (p.grad - q.grad).abs().max() < 1e-9


def test_actions_rewritten_without_a_version_bump_are_routed_afresh(gen):
    """The same actions tensor refilled between calls through a numpy view or ``.data`` (neither
    bumps the version counter), and actions made in inference mode: every call follows the
    current values, as the torch backend does."""
    import numpy as np
    L = 2
    h, U, W, b = _step_problem(gen, L, B=6, H=4)
    buf = np.zeros(6, dtype=np.int64)
    views = [torch.from_numpy(buf), torch.zeros(6, dtype=torch.int64)]
    for a in views:
        for fill in (0, L, 1, L):
            if a.data_ptr() == views[0].data_ptr():
                buf[:] = fill
            else:
                a.data.fill_(fill)
            got = dynalay.dynamic_step(h, a, U, W, b, backend="triton")
            ref = dynalay.dynamic_step(h, a, U, W, b, backend="torch")
            assert torch.equal(got.iters, ref.iters) and (got.h - ref.h).abs().max() < 1e-12
    with torch.inference_mode():
        ai = torch.tensor([0, 1, 2, 0, 1, 2])
        got = dynalay.dynamic_step(h, ai, U, W, b, backend="triton")
    ref = dynalay.dynamic_step(h, ai, U, W, b, backend="torch")
    assert (got.h - ref.h).abs().max() < 1e-12


@pytest.mark.parametrize("B,L,BM", [(1, 1, 16), (17, 3, 16), (1024, 4, 16), (1025, 4, 32), (3000, 7, 64),
                                    (2500, 8, 16), (9000, 100, 32), (600, 300, 16)])
def test_route_kernels_match_route_impl(B, L, BM, gen):
    """The two-launch Triton routing equals the sort-based reference (uniform, skewed, all-NOP and
    all-on-one-layer actions, chunk boundaries, L+1 not a power of two and a power of two, more
    than 64 chunks (9000 rows in chunks of 128 for L = 100), and L = 300, past the kernels' limit,
    where route_impl runs)."""
    from dynalay.backends import triton as tb
    from dynalay.ops.dispatch import route_impl
    cases = [torch.randint(0, L + 1, (B,), generator=gen),
             torch.where(torch.rand(B, generator=gen) < 0.9, 0, torch.randint(0, L + 1, (B,), generator=gen)),
             torch.full((B,), L), torch.full((B,), L - 1)]
    for a in cases:
        for x, y in zip(route_impl(a, L, BM), tb.route_tables(a, L, BM)):
            assert x.dtype == y.dtype and torch.equal(x, y)


def test_route_kernels_route_out_of_range_actions_as_nop(gen):
    """check="none" skips the range check: an invalid action must not corrupt the permutation."""
    from dynalay.backends import triton as tb
    from dynalay.ops.dispatch import route_impl
    L, B = 3, 50
    a = torch.randint(0, L + 1, (B,), generator=gen)
    bad = a.clone()
    bad[[3, 17, 40]] = torch.tensor([-1, L + 1, 99])
    fixed = torch.where((bad < 0) | (bad > L), torch.full_like(bad, L), bad)
    got = tb.route_tables(bad, L, 16)
    for x, y in zip(route_impl(fixed, L, 16), got):
        assert torch.equal(x, y)
    assert torch.equal(got[2].sort().values, torch.arange(B))
