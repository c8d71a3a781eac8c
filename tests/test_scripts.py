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


@pytest.mark.parametrize("script", ["gpu_bench.py", "gpu_tune.py", "agent_refit_dev.py", "model_dev_curves.py",
                                    "stop_rule_ceiling.py"])
def test_benchmark_script_imports_and_parses_its_arguments(script):
    """``--help`` imports the script's modules and builds its argument parser, on CPU."""
    env = dict(os.environ, PYTHONPATH=BENCH + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, os.path.join(BENCH, script), "--help"], capture_output=True, text=True,
                       timeout=300, cwd=BENCH, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "usage:" in p.stdout
