"""FPILayer module, contractivity, stats, and the info command."""
import subprocess
import sys

import pytest
import torch

import dynalay
from dynalay.nn import FPILayer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fpilayer_forward_backward_and_stats(dtype):
    torch.manual_seed(0)
    layer = FPILayer(7, 19, dtype=dtype, tol=1e-6, max_iter=200)
    x = torch.randn(5, 3, 7, dtype=dtype)
    z = layer(x)
    assert z.shape == (5, 3, 19) and z.dtype == dtype
    st = layer.last_stats
    assert st.converged.all() and st.iters.shape == (15,)
    z.square().sum().backward()
    assert layer.weight.grad is not None and layer.U.weight.grad is not None
    assert torch.isfinite(layer.weight.grad).all()


def test_fpilayer_z0_with_the_leading_dimensions_of_x():
    """A start ``z0`` shaped like the output (leading dimensions of x) or already flattened: the
    same solve; a warm start at the fixed point converges at once."""
    torch.manual_seed(2)
    layer = FPILayer(4, 6, tol=1e-8, max_iter=300, backend="torch").double().eval()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    z = layer(x)
    z_nd = layer(x, z0=z)
    assert layer.last_stats.iters.max() <= 2
    z_flat = layer(x, z0=z.reshape(10, 6))
    torch.testing.assert_close(z_nd, z_flat, rtol=0, atol=0)
    torch.testing.assert_close(z_nd, z, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="z0"):
        layer(x, z0=z[:, :4])


def test_spectral_bound_holds_through_training():
    torch.manual_seed(0)
    layer = FPILayer(4, 16, spectral_bound=0.8)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        layer(torch.randn(8, 4)).sum().mul(-1).backward()
        opt.step()
    layer.eval()
    sigma = torch.linalg.matrix_norm(layer.effective_weight().detach(), 2)
    assert sigma <= 0.8 * 1.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bound", [0.9, 1.0])
def test_spectral_bound_holds_at_construction(dtype, bound):
    """Fresh modules, eval mode (no power step): ||W_eff||_2 <= bound, measured in float64.  With
    30 power iterations from a random vector the estimate stopped short of sigma when the top
    singular values were close: 0.9414 for a bound of 0.9, > 1 in 20 of 20 layers for 1.0."""
    torch.manual_seed(0)
    for _ in range(6):
        step = dynalay.nn.DynamicFPIStep(4, 64, spectral_bound=bound, dtype=dtype).eval()
        lay = FPILayer(8, 64, spectral_bound=bound, dtype=dtype).eval()
        for W in (step.effective_weight(), lay.effective_weight()):
            assert torch.linalg.matrix_norm(W.detach().double(), 2).max() <= bound
    assert step.spectral.u.dtype == dtype and lay.spectral.v.dtype == dtype  # buffers follow dtype=


def test_spectral_bound_recovers_from_a_zero_or_nan_weight():
    """W = 0 made the power iteration's vectors exactly 0, from which it never left: sigma = 0
    and no bound for any later W.  A NaN in W poisoned them the same way."""
    torch.manual_seed(3)
    lay = FPILayer(4, 8, spectral_bound=0.9)
    for bad in (0.0, float("nan")):
        with torch.no_grad():
            lay.weight.fill_(bad)
        if bad == bad:
            lay(torch.randn(2, 4))
        else:  # the solve names the bad weight; the power step ran before it
            with pytest.raises(ValueError, match="W contains NaN"):
                lay(torch.randn(2, 4))
        assert torch.isfinite(lay.spectral.u).all() and lay.spectral.u.norm() > 0.5
        with torch.no_grad():
            lay.weight.copy_(5 * torch.eye(8))
        for _ in range(3):
            lay(torch.randn(2, 4))
        assert torch.linalg.matrix_norm(lay.effective_weight().detach().double(), 2) <= 0.9
    with torch.no_grad():
        lay.weight.zero_()
    lay.spectral.reset(lay.weight)  # reset on a zero W, then new weights and reset: exact again
    with torch.no_grad():
        lay.weight.copy_(torch.randn(8, 8))
    lay.spectral.reset(lay.weight)
    sigma = torch.linalg.matrix_norm(lay.eval().effective_weight().detach().double(), 2)
    assert 0.9 * (1 - 1e-5) <= sigma <= 0.9


def test_modules_called_twice_before_backward():
    """A module used for several steps (one pool, T steps) or with a regulariser on its
    effective weight, in train mode: the power step of the second call wrote the vectors that
    the first call's sigma had saved for backward ('modified by an inplace operation')."""
    torch.manual_seed(4)
    lay = FPILayer(8, 8)
    x = torch.randn(4, 8)
    lay(lay(x)).sum().backward()
    (lay(x).sum() + lay.effective_weight().square().sum()).backward()
    step = dynalay.nn.DynamicFPIStep(2, 8)
    h, a = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    step(step(h, a).h, a).h.sum().backward()
    assert torch.isfinite(step.W.grad).all() and step.W.grad.abs().sum() > 0


def test_last_results_not_kept_from_inside_func_transforms():
    """Under vmap/grad the results are wrappers that die with the transform; the modules kept
    them and reading last_result later raised 'escaped from inside a function being vmapped'.
    They now keep the last eager call's results."""
    torch.manual_seed(5)
    step = dynalay.nn.DynamicFPIStep(2, 6).eval()
    h, a = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    eager = step(h, a)
    torch.func.vmap(step)(torch.randn(3, 5, 6), torch.randint(0, 3, (3, 5)))
    torch.testing.assert_close(step.last_result.h, eager.h, rtol=0, atol=0)
    lay = FPILayer(3, 4).eval()
    lay(torch.randn(2, 3))
    kept = lay.last_stats
    torch.func.grad(lambda x: lay(x).sum())(torch.randn(2, 3))
    assert lay.last_stats is kept and float(lay.last_stats.z.sum()) == float(kept.z.sum())


def test_fpilayer_one_dimensional_x_and_z0():
    lay = FPILayer(7, 11, tol=1e-8, max_iter=300).double().eval()
    x = torch.randn(7, dtype=torch.float64)
    z = lay(x)
    assert z.shape == (11,)
    torch.testing.assert_close(lay(x, z0=z), z, rtol=0, atol=1e-7)
    assert lay.last_stats.iters.max() <= 2


def test_route_validates_check_and_shape():
    a = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="check"):
        dynalay.route(a, 2, check="bogus")
    for bad in (torch.tensor(1), torch.zeros(2, 3, dtype=torch.int64)):
        with pytest.raises(ValueError, match="one-dimensional"):
            dynalay.route(bad, 2)


def test_fpilayer_fixed_point_equation_holds():
    torch.manual_seed(1)
    layer = FPILayer(3, 11, tol=1e-7, max_iter=300, backend="torch").double()
    x = torch.randn(4, 3, dtype=torch.float64)
    z = layer(x)
    W = layer.effective_weight()
    assert (z - torch.tanh(z @ W.t() + layer.U(x))).abs().max() < 1e-6


def test_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "dynalay", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "backend" in out.stdout and "cpp" in out.stdout and "auto picks" in out.stdout


def test_convergence_warning_points_at_the_users_line():
    """The warning named a line of dynalay (fpi.py, fixed_point.py) instead of the call that
    caused it: the forward through the module, loss.backward(), the functional call."""
    import inspect
    import warnings

    lay = FPILayer(4, 8, spectral_bound=None, max_iter=2, tol=1e-12)
    with torch.no_grad():
        lay.weight.mul_(10)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        first = inspect.currentframe().f_lineno + 1
        z = lay(torch.randn(3, 4))
        z.sum().backward()
        dynalay.fixed_point(torch.randn(3, 8), 5 * torch.eye(8), max_iter=2)
    got = [(w.filename, w.lineno) for w in rec if issubclass(w.category, dynalay.ConvergenceWarning)]
    assert got == [(__file__, first), (__file__, first + 1), (__file__, first + 2)]


def test_bench_passes_every_argument_to_pytest(monkeypatch):
    """`dynalay bench -k fixed` was refused ('unrecognized arguments: -k'), `bench -- OPTS` handed
    pytest a '--', and a chosen suite ran with the whole folder."""
    import os

    from dynalay import cli

    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    root = os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__)))
    bench = os.path.join(root, "benchmarks")
    suite = os.path.join(bench, "bench_dispatch.py")
    assert cli.main(["bench", "-k", "fixed", "--benchmark-json", "o.json"]) == 0
    assert cli.main(["bench", "--", "-x"]) == 0
    assert cli.main(["bench", suite, "-k", "B1"]) == 0
    pytest_args = [c[c.index("pytest") + 1:] for c in calls]
    assert pytest_args[0][0] == bench and pytest_args[0][-4:] == ["-k", "fixed", "--benchmark-json", "o.json"]
    assert pytest_args[1][0] == bench and pytest_args[1][-1] == "-x" and "--" not in pytest_args[1]
    assert bench not in pytest_args[2] and suite in pytest_args[2]
