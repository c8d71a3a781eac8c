"""Loading of the compiled extensions.  Never raises: a missing or broken extension is
recorded here, reported once as a warning when a backend would have used it, and shown
by ``python -m dynalay info``."""
from __future__ import annotations

import importlib
import json
import os
import warnings
from typing import Dict, Optional

_state: Dict[str, Optional[str]] = {}  # module name -> None if loaded, else the reason
_warned: set = set()


def build_info() -> dict:
    path = os.path.join(os.path.dirname(__file__), "build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except OSError:
        return {}


# The ops each extension must define: a library built from an older dynalay (stale build in an
# editable install) loads fine but lacks the newer ops; it is then treated as not loaded.
CPP_OPS = ("fp_solve", "dynamic_step", "implicit_backward", "first_non_finite", "grouped_linear", "grouped_wgrad",
           "agent_decide", "run_model")


# The ops the CUDA library must implement (for the CUDA dispatch key) on top of dynalay._C's schemas.
CUDA_OPS = ("fp_solve", "dynamic_step", "implicit_backward", "grouped_linear", "grouped_wgrad")


def missing_cuda_kernels(names) -> list:
    """The ``dynalay_C`` ops of ``names`` without a CUDA kernel."""
    import torch

    return [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(f"dynalay_C::{n}", "CUDA")]


def missing_ops(namespace: str, names) -> list:
    """The ops of ``names`` that ``torch.ops.<namespace>`` does not define."""
    import torch

    ns = getattr(torch.ops, namespace)
    out = []
    for n in names:
        try:
            getattr(ns, n)
        except (AttributeError, RuntimeError):
            out.append(n)
    return out


def _load(name: str, expected_key: str) -> Optional[str]:
    if name in _state:
        return _state[name]
    reason: Optional[str]
    try:
        importlib.import_module(f"dynalay.{name}")
        reason = None
        if name == "_C":
            gone = missing_ops("dynalay_C", CPP_OPS)
            if gone:
                reason = (f"dynalay._C is a stale build (it lacks the ops {', '.join(gone)}): rebuild it with "
                          f"`pip install -e . --no-build-isolation`")
        elif name == "_C_cuda":
            gone = missing_cuda_kernels(CUDA_OPS)
            if gone:
                reason = (f"dynalay._C_cuda is a stale build (no CUDA kernel for {', '.join(gone)}): rebuild it "
                          f"with `DYNALAY_BUILD_CUDA=1 pip install -e . --no-build-isolation`")
    except ImportError as e:
        info = build_info()
        if info and not info.get(expected_key, False):
            err = info.get(f"{expected_key}_error")
            reason = f"dynalay.{name} was not built" + (f" (build error: {err})" if err else
                                                         f" (DYNALAY_BUILD_{expected_key.upper()}=0 or not applicable)")
        else:
            reason = f"dynalay.{name} failed to load: {e}"
    except Exception as e:  # noqa: BLE001 - e.g. undefined symbols from a torch ABI mismatch
        reason = f"dynalay.{name} failed to load: {type(e).__name__}: {e}"
    _state[name] = reason
    return reason


def cpp_error() -> Optional[str]:
    """None when the C++ CPU ops are loaded, else why not."""
    return _load("_C", "cpp")


def cuda_error() -> Optional[str]:
    import torch

    if torch.version.cuda is None:
        return "this torch is a CPU-only build"
    return _load("_C_cuda", "cuda")


def warn_fallback_once(key: str, message: str) -> None:
    if key in _warned or os.environ.get("DYNALAY_QUIET", "0") == "1":
        return
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def cpu_name() -> str:
    """The CPU's model name (for benchmark and report headers)."""
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name
