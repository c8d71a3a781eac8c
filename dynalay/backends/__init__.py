"""Backend selection, with reasons (xformers style).

Backends:
  ``torch``   pure PyTorch (backends/torch_ref.py): every device, dtype and solver; the oracle.
  ``cpp``     C++ CPU ops (dynalay._C, csrc/cpu): CPU tensors, every solver.
  ``triton``  fused Triton kernels (backends/triton/): CUDA tensors; CPU tensors only under
              ``TRITON_INTERPRET=1`` (the interpreter: correctness, not speed); Picard only.
  ``cuda``    CUDA C++ kernels (kernels/*.cu via dynalay._C_cuda): CUDA tensors; Picard only.

``DYNALAY_BACKEND=auto|torch|cpp|triton|cuda`` (or the ``backend=`` argument of the public
functions) forces one.  A forced backend that cannot run raises ``RuntimeError`` listing every
reason; ``auto`` tries, for CPU tensors, cpp then torch; for CUDA tensors, triton, cuda, torch.
When ``auto`` has to fall back to ``torch`` because a compiled backend is missing, one warning
says so.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Dict, List, Optional, Tuple

import torch

from .. import _ext

NAMES = ("torch", "cpp", "triton", "cuda")
_AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("triton", "cuda", "torch")}
# Per-op exceptions, from the H200 measurements of session 10
# (benchmarks/results/gpu-h200-2026-11-27-s10/): a plain fixed-point solve runs faster on the CUDA
# C++ kernels (fp32 B=8192: 0.06/0.12 ms at H=64/128 against Triton's 0.08-0.14/0.13, and the
# lighter C++ call path in fwd+bwd); a dynamic step runs faster on Triton, whose routing is two
# launches where the C++ glue's is ~20 ATen kernels.
# Large fp32 solves with H > 128 are the exception to the exception (session 15, run 1:
# benchmarks/results/gpu-h200-2026-11-28-s15/): at B=65536 Triton's tiled path beats the CUDA block
# kernel, which reads M through L2 (H=256: 2.98 vs 4.95 ms forward, 6.04 vs 10.68 fwd+bwd; H=512:
# 10.3 vs 15.8 and 20.9 vs 35.0), while at B <= 8192 the CUDA kernels lead or tie.  bf16 stays on
# cuda (level at H=256, ahead at H=512).  ``fixed_point_op`` picks the key.
_AUTO_ORDER_OP = {("cuda", "fixed_point"): ("cuda", "triton", "torch"),
                  ("cuda", "fixed_point/large"): ("triton", "cuda", "torch")}
LARGE_B = 65536  # the smallest batch measured where Triton leads (8192: cuda leads or ties)


def fixed_point_op(B: int, H: int, dtype: torch.dtype) -> str:
    """The ``op`` key under which ``fixed_point`` selects its backend for a (B, H) solve."""
    return "fixed_point/large" if dtype == torch.float32 and H > 128 and B >= LARGE_B else "fixed_point"


_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _triton_error() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def not_supported_reasons(name: str, device_type: str = "cpu", dtype: torch.dtype = torch.float32,
                          solvers: Tuple[str, ...] = ("picard",)) -> List[str]:
    """Why backend ``name`` cannot run this problem (empty list: it can)."""
    if name not in NAMES:
        return [f"unknown backend {name!r}; choose one of {', '.join(NAMES)} or 'auto'"]
    reasons: List[str] = []
    if dtype not in _FLOAT:
        reasons.append(f"dtype {dtype} is not a floating dtype")
    if name == "torch":
        return reasons
    if name == "cpp":
        err = _ext.cpp_error()
        if err:
            reasons.append(err)
        if device_type != "cpu":
            reasons.append(f"cpp runs on CPU tensors only (got {device_type})")
        return reasons
    if any(s not in ("picard", "gmres") for s in solvers):  # gmres runs on every backend's grouped products
        reasons.append(f"{name} implements solver='picard' only (asked for {sorted(set(solvers))})")
    if name == "triton":
        err = _triton_error()
        if err:
            reasons.append(err)
        if device_type == "cpu":
            if not _interpreting():
                reasons.append("triton runs CPU tensors only under TRITON_INTERPRET=1 "
                               "(set it before dynalay is imported)")
            elif dtype == torch.bfloat16:
                reasons.append("bf16 tl.dot is silently wrong under the Triton interpreter")
        elif device_type == "cuda":
            if dtype == torch.float64:
                reasons.append("the triton GPU kernels take fp32/fp16/bf16 (float64: use torch)")
        else:
            reasons.append(f"triton does not run on {device_type} tensors")
        return reasons
    # cuda
    if device_type != "cuda":
        reasons.append(f"cuda runs on CUDA tensors only (got {device_type})")
    elif not torch.cuda.is_available():
        reasons.append("no CUDA device is available")
    err = _ext.cuda_error()
    if err:
        reasons.append(err)
    if dtype == torch.float64:
        reasons.append("the CUDA kernels take fp32/fp16/bf16 (float64: use torch)")
    return reasons


def availability_error(name: str) -> Optional[str]:
    """Why backend ``name`` is not usable at all on this machine (None: it is)."""
    if name == "cpp":
        return _ext.cpp_error()
    if name == "triton":
        return _triton_error()
    if name == "cuda":
        return _ext.cuda_error()
    return None


_cache: Dict[tuple, str] = {}


def requested_backend(backend: Optional[str] = None) -> str:
    name = backend if backend is not None else os.environ.get("DYNALAY_BACKEND", "auto")
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str: one of {', '.join(NAMES)} or 'auto' (got {type(name).__name__} "
                        f"{name!r})")
    name = name.strip().lower()
    if name not in NAMES + ("auto",):
        raise ValueError(f"backend must be one of {', '.join(NAMES)} or 'auto' (got {name!r}; "
                         "set by the backend= argument or DYNALAY_BACKEND)")
    return name


@torch.compiler.assume_constant_result
def _select(backend: Optional[str], device_type: str, dtype: torch.dtype, solvers: Tuple[str, ...],
            op: str = "") -> str:
    requested = requested_backend(backend)
    key = (requested, device_type, dtype, solvers, op)
    if key in _cache:
        return _cache[key]
    if requested != "auto":
        reasons = not_supported_reasons(requested, device_type, dtype, solvers)
        if reasons:
            raise RuntimeError(f"dynalay: backend {requested!r} cannot run this call "
                               f"({device_type}, {dtype}, solvers {list(solvers)}):\n  - " + "\n  - ".join(reasons))
        _cache[key] = requested
        return requested
    skipped = []
    for name in _AUTO_ORDER_OP.get((device_type, op), _AUTO_ORDER.get(device_type, ("torch",))):
        if not not_supported_reasons(name, device_type, dtype, solvers):
            missing = [f"{n}: {availability_error(n)}" for n in skipped if availability_error(n)]
            if name == "torch" and missing:
                _ext.warn_fallback_once(
                    f"fallback-{device_type}",
                    "dynalay: using the pure-PyTorch fallback (slower) because " + " | ".join(missing)
                    + ". Run `python -m dynalay info` for details.")
            _cache[key] = name
            return name
        skipped.append(name)
    raise RuntimeError(f"dynalay: no backend can run {device_type}/{dtype}")  # pragma: no cover


def select(device: torch.device, dtype: torch.dtype, solvers: Tuple[str, ...] = ("picard",),
           backend: Optional[str] = None, op: str = "") -> str:
    """Name of the backend that runs a solve on ``device``/``dtype`` with these solvers.

    ``backend`` overrides ``DYNALAY_BACKEND``; ``auto`` picks the fastest that can run, for ``op``
    (``"fixed_point"``, ``"dynamic_step"``; empty: the generic order)."""
    return _select(backend, torch.device(device).type, dtype, tuple(solvers), op)


def routing_scope(name: str):
    """A block in which backend ``name`` may reuse the routing of an actions tensor between its
    launches (one backward pass); a no-op for backends that route inside each call."""
    scope = getattr(get(name), "route_scope", None)
    return contextlib.nullcontext() if scope is None else scope()


def get(name: str):
    """The module implementing backend ``name`` (fp_solve, grouped_linear, grouped_wgrad)."""
    if name == "torch":
        from . import torch_ref
        return torch_ref
    if name == "cpp":
        from . import cpp
        return cpp
    if name == "triton":
        from . import triton as triton_backend
        return triton_backend
    if name == "cuda":
        from . import cuda
        return cuda
    raise ValueError(f"unknown backend {name!r}")


def describe() -> List[Tuple[str, List[str]]]:
    """For ``dynalay info``: each backend and why it cannot run (CPU fp32 and CUDA fp32)."""
    rows = []
    for name in NAMES:
        cpu = not_supported_reasons(name, "cpu", torch.float32)
        gpu = not_supported_reasons(name, "cuda", torch.float32) if torch.cuda.is_available() else [
            "no CUDA device is available"]
        rows.append((name, cpu, gpu))
    return rows
