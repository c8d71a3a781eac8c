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
