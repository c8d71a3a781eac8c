"""The scripts a GPU session runs in one call (benchmarks/gpu_run.sh) and the dev-set diagnostics
must at least parse and import here: a syntax or import error found only on a lent GPU costs
its whole device budget."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BENCH = os.path.join(ROOT, "benchmarks")


def test_gpu_run_script_parses():
    p = subprocess.run(["bash", "-n", os.path.join(BENCH, "gpu_run.sh")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("script", ["gpu_bench.py", "gpu_tune.py", "gpu_targets.py", "agent_refit_dev.py",
                                    "model_dev_curves.py", "stop_rule_ceiling.py"])
def test_benchmark_script_imports_and_parses_its_arguments(script):
    """``--help`` imports the script's modules and builds its argument parser, on CPU."""
    env = dict(os.environ, PYTHONPATH=BENCH + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, os.path.join(BENCH, script), "--help"], capture_output=True, text=True,
                       timeout=300, cwd=BENCH, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "usage:" in p.stdout


def test_gpu_targets_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu_targets.py end to end at tiny shapes with torch/cpp standing in for
    triton/cuda (the per-op provider included): every table row is produced, no provider fails."""
    p = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_targets.py"), "--quick", "--no-compiled",
                        "--rounds", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                       cwd=BENCH)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "failed" not in p.stdout and "cannot set up" not in p.stdout, p.stdout[-3000:]
    md = (tmp_path / "targets.md").read_text()
    assert md.count("| phase1 |") == 8  # eager, triton, cuda, cuda_perop x fwd, fwdbwd
    assert md.count("| 128 | ") == 12  # uniform/skew x NOP 0/0.5/0.9 x fwd/fwdbwd
