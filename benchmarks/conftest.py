"""pytest-benchmark configuration for the dynalay benchmarks.

Run (smoke, as CI does):   python -m pytest benchmarks -q --benchmark-disable
Run (timed, CPU):          bash benchmarks/run_cpu.sh   (JSON + markdown report in benchmarks/results/)

* The Triton interpreter flag is set (when there is no CUDA) before anything imports dynalay, as
  in tests/conftest.py; the interpreter itself is never benchmarked (triton/cuda providers are
  skipped on CPU with the reason).
* CPU runs use ``torch.set_num_threads(2)`` (``DYNALAY_BENCH_THREADS``); ``DYNALAY_BENCH_DEVICE=cpu``
  benchmarks the CPU on a machine that has a GPU.
* Files ``bench_*.py`` are collected (pytest's default only collects ``test_*.py``).
* Helpers live in ``benchlib.py`` (importable from the bench files at collection time) and are
  re-exported here; ``timed`` is also a fixture.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DYNALAY_QUIET", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchlib, also under --import-mode=importlib

import pytest  # noqa: E402

import benchlib  # noqa: E402  (sets the thread count)
from benchlib import (DEVICE, DTYPE, ON_CUDA, env_info, peak_memory, record_env, saved_for_backward,  # noqa: E402,F401
                      sync, timed)


def pytest_collect_file(file_path, parent):
    # a file named on the command line is already collected by pytest's python plugin
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_report_header(config):
    e = env_info()
    return (f"dynalay benchmarks: device={e['device']} ({e['device_name']}), torch {e['torch']}, "
            f"triton {e['triton']}, threads={e['threads']}, dtype={e['dtype']}, target {e['target_s']} s/case")


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Run-wide metadata for report.py: environment and the command line."""
    meta = env_info()
    cmd = os.environ.get("DYNALAY_BENCH_CMD")
    meta["command_line"] = cmd or ("python -m pytest " + " ".join(config.invocation_params.args))
    meta["pytest_args"] = list(config.invocation_params.args)
    output_json["dynalay"] = meta


@pytest.fixture
def timed_fn():
    """``timed_fn(benchmark, fn, rounds=None, warmup=3)``: see ``benchlib.timed``."""
    return timed
