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
    assert (t.z.double() - a.z.double()).abs().max() < (1e-12 if dtype == torch.float64 else 1e-5)


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
