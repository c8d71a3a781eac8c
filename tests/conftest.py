# The Triton interpreter flag must be set before anything decorates a @triton.jit kernel,
# i.e. before dynalay (or its triton backend) is imported.
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DYNALAY_QUIET", "0")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """GPU tests are reported as skipped with a reason, never silently dropped."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here); run on a GPU machine: see benchmarks/gpu_run.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = terminalreporter.stats.get("skipped", [])
    gpu = [r for r in skipped if "CUDA device" in str(getattr(r, "longrepr", ""))]
    if gpu:
        terminalreporter.write_line(f"dynalay: {len(gpu)} GPU test(s) skipped: no CUDA device on this machine")


@pytest.fixture
def gen(request):
    """A generator with a fresh random seed (printed, so a failure can be replayed with
    DYNALAY_TEST_SEED=<seed>)."""
    import random

    seed = int(os.environ.get("DYNALAY_TEST_SEED", random.randrange(2**31)))
    print(f"[{request.node.name}] seed={seed}")
    return torch.Generator().manual_seed(seed)
