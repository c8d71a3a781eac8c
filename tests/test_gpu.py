"""GPU tests (CUDA tensors): the torch_ref backend on CUDA against float64 CPU references, and
the Triton kernels against torch_ref, for fp32/fp16/bf16 inputs, odd and large shapes, the
tiled path, grouped dispatch and gradients.  Reported as skipped where there is no CUDA device."""
import pytest
import torch

import dynalay
from dynalay import backends
from helpers import make_actions, make_step_params, make_W, ref_solve, rel_err

pytestmark = pytest.mark.gpu
DEV = "cuda"
LOWP = {torch.float16: 1e-2, torch.bfloat16: 5e-2}


def problem(B, H, dtype, gen, kind="gauss"):
    W = make_W(H, kind=kind, gen=gen)
    inj = torch.randn(B, H, generator=gen, dtype=torch.float64)
    return inj.to(DEV, dtype), W.to(DEV, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,H", [(1, 1), (7, 20), (64, 64), (33, 100)])
def test_torch_ref_on_cuda_matches_float64_reference(B, H, dtype, gen):
    inj, W = problem(B, H, dtype, gen)
    r = dynalay.fixed_point(inj, W, backend="torch", max_iter=300)
    z, it, _, conv, amb = ref_solve(inj.cpu(), W.cpu(), max_iter=300, band=1e-2)
    assert r.z.is_cuda and r.converged.all()
    assert ((r.iters.cpu().long() - it.long()).abs() <= 1).all()
    assert (r.z.cpu().double() - z).abs().max() < (1e-10 if dtype == torch.float64 else 2e-5)
    i_ = inj.clone().requires_grad_()
    W_ = W.clone().requires_grad_()
    dynalay.fixed_point(i_, W_, backend="torch", max_iter=300).z.sum().backward()
    i2, W2 = inj.cpu().clone().requires_grad_(), W.cpu().clone().requires_grad_()
    dynalay.fixed_point(i2, W2, backend="torch", max_iter=300).z.sum().backward()
    assert rel_err(i_.grad.cpu(), i2.grad) < (1e-9 if dtype == torch.float64 else 1e-4)
    assert rel_err(W_.grad.cpu(), W2.grad) < (1e-9 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("B,H", [(1, 20), (1000, 20), (513, 64), (8192, 100), (4096, 128), (300, 256), (64, 1024)])
def test_triton_fp32_forward_and_gradients(B, H, gen):
    inj, W = problem(B, H, torch.float32, gen)
    G = torch.randn(B, H, device=DEV)
    res = {}
    for be in ("torch", "triton"):
        i_, W_ = inj.clone().requires_grad_(), W.clone().requires_grad_()
        r = dynalay.fixed_point(i_, W_, backend=be, max_iter=100)
        (r.z * G).sum().backward()
        res[be] = (r, i_.grad, W_.grad)
    a, t = res["torch"][0], res["triton"][0]
    assert t.converged.all() and torch.isfinite(t.z).all()
    assert (t.iters.long() - a.iters.long()).abs().max() <= 1
    assert (t.iters != a.iters).float().mean() < 0.02
    assert (t.z - a.z).abs().max() < 1e-4
    assert rel_err(res["triton"][1], res["torch"][1]) < 1e-4
    assert rel_err(res["triton"][2], res["torch"][2]) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H", [64, 128, 512])
def test_triton_low_precision_inputs_iterate_in_fp32(dtype, H, gen):
    inj, W = problem(2048, H, torch.float32, gen)
    ref = dynalay.fixed_point(inj.to(dtype).float(), W.to(dtype).float(), backend="torch", max_iter=100)
    t = dynalay.fixed_point(inj.to(dtype), W.to(dtype), backend="triton", max_iter=100)
    assert t.z.dtype == dtype and t.residual.dtype == torch.float32 and t.converged.all()
    # iterating in fp32 on the dtype-rounded inputs: only the final cast differs
    assert (t.z.float() - ref.z).abs().max() < LOWP[dtype]
    assert (t.iters.long() - ref.iters.long()).abs().max() <= 1


def test_triton_outputs_fully_written(gen):
    inj, W = problem(999, 100, torch.float32, gen)
    torch.empty(64 << 20, device=DEV).fill_(float("nan"))  # poison the caching allocator's memory
    r = dynalay.fixed_point(inj, W, backend="triton")
    assert torch.isfinite(r.z).all() and torch.isfinite(r.residual).all() and (r.iters > 0).all()


@pytest.mark.parametrize("kind", ["uniform", "skew", "empty", "allnop", "onelayer", "nop90"])
@pytest.mark.parametrize("H", [20, 64, 128, 256])
def test_triton_dynamic_step(kind, H, gen):
    B, L = 3000, 4
    params = [p.to(DEV) for p in make_step_params(B, H, L, torch.float32, gen)]
    a = make_actions(kind, B, L, gen).to(DEV)
    G = torch.randn(B, H, device=DEV)
    out = {}
    for be in ("torch", "triton"):
        ps = [p.clone().requires_grad_() for p in params]
        r = dynalay.dynamic_step(ps[0], a, *ps[1:], backend=be, max_iter=100)
        (r.h * G).sum().backward()
        out[be] = (r, [p.grad for p in ps])
    (ra, ga), (rt, gt) = out["torch"], out["triton"]
    # a row that stops one iteration apart (fp32 rounding at the tol boundary) differs by about
    # one step, ~tol * |z|: only rows with equal counts are held to 1e-4
    same = rt.iters == ra.iters
    assert (rt.iters.long() - ra.iters.long()).abs().max() <= 1 and same.float().mean() > 0.99
    assert (rt.h - ra.h)[same].abs().max() < 1e-4
    assert (rt.h - ra.h).abs().max() < 1e-3
    assert torch.equal(rt.converged, ra.converged)
    nop = a == L
    assert torch.equal(rt.h[nop], params[0][nop])
    for name, x, y in zip("hUWb", gt, ga):
        assert rel_err(x, y) < 1e-4, name


def test_triton_deterministic_on_gpu(gen):
    params = [p.to(DEV) for p in make_step_params(4096, 128, 4, torch.float32, gen)]
    a = make_actions("skew", 4096, 4, gen).to(DEV)
    outs = []
    for _ in range(2):
        ps = [p.clone().requires_grad_() for p in params]
        r = dynalay.dynamic_step(ps[0], a, *ps[1:], backend="triton")
        r.h.square().sum().backward()
        outs.append([r.h.detach(), r.iters] + [p.grad for p in ps])
    for x, y in zip(*outs):
        assert torch.equal(x, y)


@pytest.mark.parametrize("prec", ["tf32x3", "tf32"])
def test_triton_tensor_core_precisions(prec, gen):
    from dynalay.backends import triton as tb
    inj, W = problem(4096, 128, torch.float32, gen)
    ref = dynalay.fixed_point(inj, W, backend="torch")
    try:
        tb.set_precision(prec)
        r = dynalay.fixed_point(inj, W, backend="triton", tol=1e-4 if prec == "tf32x3" else 3e-3, check="none")
    finally:
        tb.set_precision("ieee")
    assert (r.z - ref.z).abs().max() < (1e-4 if prec == "tf32x3" else 3e-2)
    if prec == "tf32x3":
        assert r.converged.all()


def test_auto_selection_on_cuda():
    assert backends.select(DEV, torch.float32) in ("triton", "cuda")
    cuda_ok = not backends.not_supported_reasons("cuda", "cuda", torch.float32)
    assert backends.select(DEV, torch.float32, op="fixed_point") == ("cuda" if cuda_ok else "triton")
    assert backends.select(DEV, torch.float32, op="fixed_point/large") == "triton"
    assert backends.select(DEV, torch.bfloat16, op="fixed_point") == ("cuda" if cuda_ok else "triton")
    assert backends.select(DEV, torch.float32, op="dynamic_step") == "triton"
    assert backends.select(DEV, torch.float32, ("anderson",)) == "torch"
    assert backends.select(DEV, torch.float64) == "torch"


def test_fpilayer_on_cuda():
    layer = dynalay.nn.FPILayer(16, 128).to(DEV)
    x = torch.randn(512, 16, device=DEV)
    z = layer(x)
    z.sum().backward()
    assert layer.last_stats.converged.all() and layer.weight.grad is not None


@pytest.mark.parametrize("B,L,BM", [(1, 1, 16), (4096, 4, 16), (65536, 4, 16), (3001, 7, 64), (20000, 16, 32)])
def test_triton_route_kernels_on_cuda(B, L, BM, gen):
    from dynalay.backends import triton as tb
    from dynalay.ops.dispatch import route_impl
    for kind in ("uniform", "skew", "allnop", "onelayer"):
        a = make_actions(kind, B, L, gen).to(DEV)
        for x, y in zip(route_impl(a, L, BM), tb.route_tables(a, L, BM)):
            assert x.dtype == y.dtype and torch.equal(x, y), kind


@pytest.mark.parametrize("be", ["triton", "cuda"])
def test_dynamic_step_captured_in_a_cuda_graph(be, gen):
    """No host sync inside the op: forward+backward capture in one CUDA graph, and a replay with
    new actions (copied into the captured tensor) matches eager (the routing is recomputed)."""
    if backends.not_supported_reasons(be, "cuda", torch.float32):
        pytest.skip(f"backend {be} cannot run here")
    B, H, L = 1000, 64, 4
    params = [p.to(DEV) for p in make_step_params(B, H, L, torch.float32, gen)]
    G = torch.randn(B, H, device=DEV)
    a = make_actions("uniform", B, L, gen).to(DEV)
    ps = [p.clone().requires_grad_() for p in params]

    def step():
        for p in ps:
            p.grad = None
        r = dynalay.dynamic_step(ps[0], a, *ps[1:], backend=be, check="none")
        (r.h * G).sum().backward()
        return r.h

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h_out = step()
    grads = [p.grad for p in ps]
    for kind in ("skew", "nop90", "allnop"):
        a.copy_(make_actions(kind, B, L, gen).to(DEV))
        graph.replay()
        torch.cuda.synchronize()
        qs = [p.clone().requires_grad_() for p in params]
        ref = dynalay.dynamic_step(qs[0], a, *qs[1:], backend=be)
        (ref.h * G).sum().backward()
        assert torch.equal(h_out, ref.h.detach()), kind
        for x, q in zip(grads, qs):
            assert torch.equal(x, q.grad), kind


@pytest.mark.parametrize("be", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_on_cuda(be, dtype, gen):
    """torch.autocast('cuda'): an FPILayer's fp16/bf16 ``U x`` with its fp32 W (a dtype error
    before); the ops cast the inputs like a matmul, solve in fp32 with autocast off inside, and a
    backward called in the autocast region equals one outside it."""
    if backends.not_supported_reasons(be, "cuda", dtype):
        pytest.skip(f"backend {be} cannot run here")
    layer = dynalay.nn.FPILayer(24, 64, backend=be).to(DEV).eval()
    x = torch.randn(300, 24, device=DEV)
    W = layer.effective_weight()
    with torch.autocast("cuda", dtype=dtype):
        z = layer(x)
        inj = layer.U(x)
        assert torch.equal(layer.effective_weight(), W)
    assert z.dtype == dtype and inj.dtype == dtype
    assert torch.equal(z, dynalay.fixed_point(inj, W.to(dtype), backend=be).z)
    h, U, Ws, b = [p.to(DEV) for p in make_step_params(200, 32, 3, torch.float32, gen)]
    a = make_actions("nop50", 200, 3, gen).to(DEV)
    grads = []
    for inside in (False, True):
        ps = [p.clone().requires_grad_() for p in (h, U, Ws, b)]
        with torch.autocast("cuda", dtype=dtype):
            out = dynalay.dynamic_step(ps[0], a, *ps[1:], backend=be).h
            if inside:
                out.float().square().sum().backward()
        if not inside:
            out.float().square().sum().backward()
        assert out.dtype == dtype
        grads.append([p.grad for p in ps])
    for g0, g1 in zip(*grads):
        assert g0.dtype == torch.float32 and torch.equal(g0, g1)


@pytest.mark.parametrize("be", ["torch", "triton", "cuda"])
def test_vmap_fold_on_cuda(be, gen):
    """torch.func.vmap over fixed_point folds the mapped dimension into the rows (a mapped W
    becomes a grouped solve): equal to a loop of solves on each backend."""
    if backends.not_supported_reasons(be, "cuda", torch.float32):
        pytest.skip(f"backend {be} cannot run here")
    N, B, H = 5, 300, 64
    inj = torch.randn(N, B, H, generator=gen).to(DEV)
    Ws = torch.stack([make_W(H, 0.9, gen=gen) for _ in range(N)]).to(DEV, torch.float32)
    f = lambda i, w: dynalay.fixed_point(i, w, backend=be, max_iter=100)  # noqa: E731
    for in_dims, W in (((0, 0), Ws), ((0, None), Ws[0])):
        r = torch.func.vmap(f, in_dims=in_dims)(inj, W)
        loop = [f(inj[k], W[k] if in_dims[1] == 0 else W) for k in range(N)]
        assert (r.z - torch.stack([x.z for x in loop])).abs().max() < 1e-5
        assert (r.iters.long() - torch.stack([x.iters for x in loop]).long()).abs().max() <= 1


@pytest.mark.parametrize("be", ["torch", "triton", "cuda"])
def test_vmap_dynamic_step_fold_on_cuda(be, gen):
    """torch.func.vmap over dynamic_step folds the mapped dimension into the rows (mapped layers
    become a stack of N*L layers): equal to a loop of steps on each backend."""
    if backends.not_supported_reasons(be, "cuda", torch.float32):
        pytest.skip(f"backend {be} cannot run here")
    N, B, H, L = 4, 300, 64, 3
    hs = torch.randn(N, B, H, generator=gen).to(DEV)
    acts = torch.randint(0, L + 1, (N, B), generator=gen).to(DEV)
    params = [make_step_params(B, H, L, torch.float32, gen)[1:] for _ in range(N)]
    Us, Ws, bs = (torch.stack(t).to(DEV) for t in zip(*params))
    f = lambda h, a, U, W, b: dynalay.dynamic_step(h, a, U, W, b, backend=be, max_iter=100)  # noqa: E731
    full, one = (hs, acts, Us, Ws, bs), (hs[0], acts[0], Us[0], Ws[0], bs[0])
    for in_dims in ((0, 0, None, None, None), (0, 0, 0, 0, 0), (None, 0, None, 0, None)):
        args = [x if d == 0 else o for x, o, d in zip(full, one, in_dims)]
        r = torch.func.vmap(f, in_dims=in_dims)(*args)
        loop = [f(*[x[k] if d == 0 else x for x, d in zip(args, in_dims)]) for k in range(N)]
        assert (r.h - torch.stack([x.h for x in loop])).abs().max() < 1e-5
        assert (r.iters.long() - torch.stack([x.iters for x in loop]).long()).abs().max() <= 1


@pytest.mark.parametrize("be", ["torch", "triton", "cuda"])
def test_per_sample_grads_on_cuda(be, gen):
    """Per-sample gradients (vmap(grad)) of dynamic_step with shared layers on each CUDA backend:
    one folded forward and backward, equal to a loop of grad."""
    if backends.not_supported_reasons(be, "cuda", torch.float32):
        pytest.skip(f"backend {be} cannot run here")
    B, H, L = 96, 64, 3
    h, U, W, b = [p.to(DEV) for p in make_step_params(B, H, L, torch.float32, gen)]
    a = torch.randint(0, L + 1, (B,), generator=gen).to(DEV)

    def loss(U_, W_, b_, x, ai):
        return dynalay.dynamic_step(x[None], ai[None], U_, W_, b_, backend=be, tol=1e-6, max_iter=200).h.square().sum()
    g = torch.func.grad(loss, argnums=(0, 1, 2, 3))
    got = torch.func.vmap(g, in_dims=(None, None, None, 0, 0))(U, W, b, h, a)
    loop = [g(U, W, b, h[i], a[i]) for i in range(B)]
    for k, ref in enumerate(zip(*loop)):
        assert (got[k] - torch.stack(ref)).abs().max() < 1e-4, k


@pytest.mark.parametrize("be", ["torch", "triton", "cuda"])
def test_gmres_adjoint_on_cuda(be, gen):
    """backward_solver='gmres' runs on every CUDA backend (over its grouped products) and gives
    the Picard adjoint's gradients, for fixed_point and dynamic_step."""
    if backends.not_supported_reasons(be, "cuda", torch.float32):
        pytest.skip(f"backend {be} cannot run here")
    B, H, L = 300, 64, 3
    h, U, W, b = [p.to(DEV) for p in make_step_params(B, H, L, torch.float32, gen)]
    a = torch.randint(0, L + 1, (B,), generator=gen).to(DEV)
    G = torch.randn(B, H, generator=gen).to(DEV)
    grads = {}
    for bs in ("picard", "gmres"):
        ps = [t.clone().requires_grad_() for t in (h, U, W, b)]
        out = dynalay.dynamic_step(ps[0], a, *ps[1:], backend=be, tol=1e-6, max_iter=300, backward_solver=bs).h
        grads[bs] = torch.autograd.grad((out * G).sum(), ps)
    for x, y in zip(grads["gmres"], grads["picard"]):
        assert (x - y).abs().max() <= 1e-3 * (1 + y.abs().max())
