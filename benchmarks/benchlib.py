"""Shared helpers for the dynalay benchmarks (imported by conftest.py and the bench_*.py files).

Everything here is plain code so the bench files can use it at import time (parametrize lists);
conftest.py re-exports the helpers and wraps ``timed`` as a fixture.

Conventions (ANCHORS.md sections 2.1-2.5 and 4, "Benchmarks"):
  * one problem per case, the same tensors for every provider;
  * float32, tol 1e-4 on the per-row relative residual ||f(z)-z|| / (||f(z)|| + eps), at most
    50 f-evaluations, z0 = 0, the injection computed once outside the solve;
  * time with ``benchmark.pedantic`` (>= 3 warm-ups, 1 iteration a round, rounds chosen so that
    a case measures for about ``DYNALAY_BENCH_TARGET_S`` seconds), ``torch.cuda.synchronize()``
    inside the timed function on CUDA;
  * ``extra_info``: device, torch/triton versions, dtype, threads, mean iterations, peak memory
    (CUDA only), and the case description that ``report.py`` reads.
"""
from __future__ import annotations

import gc
import importlib
import importlib.util
import math
import os
import time
import weakref
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

# The Triton interpreter flag must be set before dynalay (which decorates @triton.jit kernels)
# is imported; conftest.py does this first, this line only covers a direct import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import dynalay  # noqa: E402
from dynalay import backends  # noqa: E402

# --------------------------------------------------------------------------------------------
# Device, dtype, threads, solver settings
# --------------------------------------------------------------------------------------------
_REQ_DEVICE = os.environ.get("DYNALAY_BENCH_DEVICE", "").strip().lower()
if _REQ_DEVICE not in ("", "cpu", "cuda"):
    raise ValueError(f"DYNALAY_BENCH_DEVICE must be cpu or cuda (got {_REQ_DEVICE!r})")
if _REQ_DEVICE == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("DYNALAY_BENCH_DEVICE=cuda but no CUDA device is available")
DEVICE = torch.device(_REQ_DEVICE or ("cuda" if torch.cuda.is_available() else "cpu"))
ON_CUDA = DEVICE.type == "cuda"
DTYPE = torch.float32
NUM_THREADS = int(os.environ.get("DYNALAY_BENCH_THREADS", "2"))
if not ON_CUDA:
    torch.set_num_threads(NUM_THREADS)

TOL = 1e-4
MAX_ITER = 50
EPS = 1e-12           # dynalay's default eps in the relative residual (torchdeq uses 1e-9)
TARGET_S = float(os.environ.get("DYNALAY_BENCH_TARGET_S", "1.2"))  # measured seconds per case
MIN_ROUNDS = 5
MIN_ROUNDS_SLOW = 3   # for cases slower than SLOW_CALL_S a call
SLOW_CALL_S = 0.4
MAX_ROUNDS = 1000
WARMUP = 3

# Sanity tests: relative difference allowed between providers (stop rules differ: per-row freeze vs
# batch-max; on CUDA the Triton kernels may use TF32 dot products).
AGREE_TOL = 2e-2 if ON_CUDA else 2e-3

HAS_TORCHDEQ = importlib.util.find_spec("torchdeq") is not None
DYNALAY_BACKENDS = ("cpp", "torch", "triton", "cuda")  # report order


def _triton_version() -> Optional[str]:
    try:
        import triton
        return triton.__version__
    except Exception:  # noqa: BLE001
        return None


def device_name() -> str:
    if ON_CUDA:
        return torch.cuda.get_device_name(DEVICE)
    from dynalay._ext import cpu_name
    return cpu_name()


def env_info() -> Dict[str, object]:
    """Run-wide facts (also written at the top of the JSON by conftest.py)."""
    return {
        "device": DEVICE.type,
        "device_name": device_name(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "dynalay": getattr(dynalay, "__version__", None),
        "dtype": str(DTYPE).replace("torch.", ""),
        "threads": torch.get_num_threads() if not ON_CUDA else None,
        "cpu_count": os.cpu_count(),
        "tol": TOL,
        "max_iter": MAX_ITER,
        "target_s": TARGET_S,
    }


_ENV = None


def record_env(benchmark, **case) -> None:
    """Fill ``benchmark.extra_info`` with the environment and the case description."""
    global _ENV
    if _ENV is None:
        _ENV = env_info()
    benchmark.extra_info.update(_ENV)
    benchmark.extra_info.update(case)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def sync() -> None:
    if ON_CUDA:
        torch.cuda.synchronize(DEVICE)


def timed(benchmark, fn: Callable[[], object], rounds: Optional[int] = None, warmup: int = WARMUP,
          target_s: Optional[float] = None):
    """Time ``fn`` with ``benchmark.pedantic`` (iterations=1, >= 3 warm-up rounds).

    ``rounds=None`` picks the number of rounds from one calibration call so that the measured
    part takes about ``target_s`` (default ``DYNALAY_BENCH_TARGET_S``, 1.2 s), with at least 5
    rounds (3 for calls slower than 0.4 s).  Under ``--benchmark-disable`` ``fn`` runs once.
    """
    def run():
        out = fn()
        sync()
        return out

    warmup = max(WARMUP, int(warmup))
    if not benchmark.enabled:  # smoke mode: one call, no calibration
        return benchmark.pedantic(run, rounds=1, warmup_rounds=0, iterations=1)
    if rounds is None:
        target = TARGET_S if target_s is None else float(target_s)
        run()                            # first call: allocator and caches (an extra warm-up)
        t0 = time.perf_counter()
        run()
        dt = max(time.perf_counter() - t0, 1e-6)
        lo = MIN_ROUNDS_SLOW if dt > SLOW_CALL_S else MIN_ROUNDS
        rounds = int(min(MAX_ROUNDS, max(lo, math.ceil(target / dt))))
        benchmark.extra_info["calibration_s"] = dt
    benchmark.extra_info["rounds_requested"] = int(rounds)
    benchmark.extra_info["warmup_rounds"] = warmup
    return benchmark.pedantic(run, rounds=int(rounds), warmup_rounds=warmup, iterations=1)


def bench_case(benchmark, run: Callable[..., object]) -> None:
    """Benchmark one case: ``run(info)`` fills ``info`` with its statistics (iterations...) and
    ``run()`` is the timed call.  Timed mode: one untimed statistics call (with the CUDA peak
    memory), then ``timed``.  Smoke mode (``--benchmark-disable``): a single call of
    ``run(info)``, which exercises the same code."""
    info: dict = {}
    if not benchmark.enabled:
        benchmark.pedantic(lambda: run(info), rounds=1, warmup_rounds=0, iterations=1)
        return
    _, peak = peak_memory(lambda: run(info))
    info["peak_memory_bytes"] = peak  # CUDA only (None on CPU)
    benchmark.extra_info.update(info)
    timed(benchmark, run)


def peak_memory(fn: Callable[[], object]) -> Tuple[object, Optional[int]]:
    """Run ``fn`` once; return its result and the peak memory above the starting point
    (bytes; CUDA only, None on CPU where torch keeps no allocator statistics)."""
    if not ON_CUDA:
        return fn(), None
    sync()
    torch.cuda.reset_peak_memory_stats(DEVICE)
    base = torch.cuda.memory_allocated(DEVICE)
    out = fn()
    sync()
    return out, int(torch.cuda.max_memory_allocated(DEVICE) - base)


# --------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------
def dynalay_skip_reason(name: str, solver: str = "picard") -> Optional[str]:
    """Why the dynalay backend ``name`` is not benchmarked here (None: it is)."""
    if not ON_CUDA and name == "triton":
        return ("triton on CPU would be the Triton interpreter (TRITON_INTERPRET=1): correctness "
                "only, never benchmarked; run on a CUDA machine")
    reasons = backends.not_supported_reasons(name, DEVICE.type, DTYPE, (solver,))
    if reasons:
        return f"dynalay backend {name!r} cannot run {DEVICE.type}/{solver}: " + "; ".join(reasons)
    return None


def torchdeq_skip_reason() -> Optional[str]:
    return None if HAS_TORCHDEQ else "torchdeq is not installed (pip install torchdeq==0.1.0)"


def param(provider: str, reason: Optional[str], id: Optional[str] = None):
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param(provider, marks=marks, id=id or provider)


def dynalay_params(solver: str = "picard", suffix: str = "") -> List:
    """One ``dynalay_<backend>`` provider per backend, skipped (with the reason) where it
    cannot run on this device."""
    return [param(f"dynalay_{n}{suffix}", dynalay_skip_reason(n, solver)) for n in DYNALAY_BACKENDS]


def backend_of(provider: str) -> str:
    """'dynalay_cpp' / 'dynalay_cpp_anderson' -> 'cpp'."""
    return provider.split("_")[1]


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------
def _spectral_rescale(W: torch.Tensor, norm: float) -> torch.Tensor:
    return norm * W / torch.linalg.matrix_norm(W, 2)[..., None, None]


@lru_cache(maxsize=None)
def fp_problem(kind: str, B: int, H: int, seed: int = 0):
    """(inj, W, G) on DEVICE in DTYPE.

    gauss: W Gaussian rescaled to ||W||_2 = 0.9, inj ~ N(0, 1).
    slow:  W = 0.9 Q diag(linspace(0, 1, H)) Q^T (symmetric, eigenvalues in [0, 0.9]: plain
           iteration needs ~30 steps), inj ~ 0.3 N(0, 1).
    G: the fixed random cotangent of the loss sum(z * G)."""
    g = torch.Generator().manual_seed(seed * 1000003 + B * 7919 + H)
    if kind == "gauss":
        W = _spectral_rescale(torch.randn(H, H, dtype=torch.float64, generator=g), 0.9)
        inj = torch.randn(B, H, dtype=torch.float64, generator=g)
    elif kind == "slow":
        Q, _ = torch.linalg.qr(torch.randn(H, H, dtype=torch.float64, generator=g))
        W = 0.9 * (Q @ torch.diag(torch.linspace(0, 1, H, dtype=torch.float64)) @ Q.t())
        inj = 0.3 * torch.randn(B, H, dtype=torch.float64, generator=g)
    else:
        raise ValueError(kind)
    G = torch.randn(B, H, dtype=torch.float64, generator=g)
    cast = lambda t: t.to(device=DEVICE, dtype=DTYPE).contiguous()  # noqa: E731
    return cast(inj), cast(W), cast(G)


@lru_cache(maxsize=None)
def dispatch_problem(B: int, H: int, L: int = 4, seed: int = 0):
    """(h, U, W, b, G): U ~ N(0, 1/H), each W[l] Gaussian with ||W[l]||_2 = 0.9,
    b ~ 0.1 N(0, 1), h ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed * 1000003 + B * 7919 + H * 31 + L)
    U = torch.randn(L, H, H, dtype=torch.float64, generator=g) / math.sqrt(H)
    W = _spectral_rescale(torch.randn(L, H, H, dtype=torch.float64, generator=g), 0.9)
    b = 0.1 * torch.randn(L, H, dtype=torch.float64, generator=g)
    h = torch.randn(B, H, dtype=torch.float64, generator=g)
    G = torch.randn(B, H, dtype=torch.float64, generator=g)
    cast = lambda t: t.to(device=DEVICE, dtype=DTYPE).contiguous()  # noqa: E731
    return cast(h), cast(U), cast(W), cast(b), cast(G)


@lru_cache(maxsize=None)
def make_actions(B: int, L: int, nop: float, dist: str, seed: int = 0) -> torch.Tensor:
    """(B,) int64 in [0, L] (L = NOP) with exact counts, in random row order.

    round(nop * B) rows choose NOP; the rest are spread evenly over the L layers (uniform) or
    90% of them on layer 0 and the others evenly over layers 1..L-1 (skewed)."""
    n_nop = int(round(nop * B))
    n_act = B - n_nop
    if dist == "uniform":
        counts = [n_act // L + (1 if l < n_act % L else 0) for l in range(L)]
    elif dist == "skewed":
        c0 = int(round(0.9 * n_act))
        rest = n_act - c0
        counts = [c0] + [rest // (L - 1) + (1 if l < rest % (L - 1) else 0) for l in range(L - 1)]
    else:
        raise ValueError(dist)
    counts.append(n_nop)
    a = torch.cat([torch.full((c,), l, dtype=torch.int64) for l, c in enumerate(counts)])
    g = torch.Generator().manual_seed(seed * 1000003 + B * 7919 + int(nop * 1000) + (dist == "skewed"))
    a = a[torch.randperm(B, generator=g)]
    return a.to(DEVICE)


def leaf(t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    """A fresh leaf copy (so gradients of one case never touch another's tensors)."""
    return t.detach().clone().requires_grad_(requires_grad)


# --------------------------------------------------------------------------------------------
# Reference solvers
# --------------------------------------------------------------------------------------------
def eager_solve(inj: torch.Tensor, W: torch.Tensor, tol: float = TOL, max_iter: int = MAX_ITER,
                eps: float = EPS) -> Tuple[torch.Tensor, int]:
    """The plain eager loop: z = tanh(z @ W.T + inj) from z = 0, per-sample relative residual,
    the whole batch stops when the largest residual is < tol (one ``.item()`` per iteration).
    With autograd on, backprop goes through every iteration (unrolled); the residual itself is
    computed without grad.  Returns (z, iterations)."""
    z = torch.zeros_like(inj)
    Wt = W.t()
    k = 0
    for k in range(1, max_iter + 1):
        fz = torch.tanh(z @ Wt + inj)
        with torch.no_grad():
            r = torch.linalg.vector_norm(fz - z, dim=1) / (torch.linalg.vector_norm(fz, dim=1) + eps)
            stop = r.max().item() < tol
        z = fz
        if stop:
            break
    return z, k


TORCHDEQ_SOLVERS = {"torchdeq_fp": "fixed_point_iter", "torchdeq_anderson": "anderson"}


def make_torchdeq(provider: str):
    """torchdeq 0.1.0 configured to the same problem: ``get_deq(core='sliced', ...)`` (the
    default core), forward and backward solver of the same kind, max 50 f-evaluations, stop
    when the batch-max relative residual ||f(z)-z|| / (||f(z)|| + 1e-9) < 1e-4 (``*_stop_mode=
    'rel'``), ``ift=True``: the backward solves g = J^T g + dL/dz with ``b_solver`` under
    ``b_max_iter``/``b_tol``/``b_stop_mode`` (torchdeq.grad.backward_factory's IFTGrad), then
    backprops one differentiable step f(z*) to the parameters.  Anderson uses torchdeq's
    defaults m=6, lam=1e-4 (in both directions: ``b_solver_kwargs`` carries no m/lam)."""
    from torchdeq import get_deq

    solver = TORCHDEQ_SOLVERS[provider]
    return get_deq(core="sliced", f_solver=solver, b_solver=solver, f_max_iter=MAX_ITER, f_tol=TOL,
                   f_stop_mode="rel", ift=True, b_max_iter=MAX_ITER, b_tol=TOL, b_stop_mode="rel")


def last_backward_stats() -> dict:
    """dynalay's statistics of the most recent implicit backward solve."""
    return importlib.import_module("dynalay.ops.fixed_point").last_backward_stats


# --------------------------------------------------------------------------------------------
# Saved-for-backward memory
# --------------------------------------------------------------------------------------------
class _Packed:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


def saved_for_backward(run_forward: Callable[[], object], inputs: Sequence[torch.Tensor]) -> Tuple[object, dict]:
    """Run ``run_forward`` (which builds an autograd graph) and measure what the graph keeps for
    backward once the forward has returned: every tensor packed through
    ``torch.autograd.graph.saved_tensors_hooks`` whose packed object is still alive (tensors
    saved by transient graphs, e.g. input checks, are freed and not counted), deduplicated by
    storage.  ``inputs`` (parameters, injection, cotangent) do not count as activations."""
    packed: List[weakref.ref] = []

    def pack(t):
        p = _Packed(t)
        packed.append(weakref.ref(p))
        return p

    def unpack(p):
        return p.t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = run_forward()
    gc.collect()
    live = [r() for r in packed]
    live = [p.t for p in live if p is not None]
    excluded = {t.untyped_storage().data_ptr() for t in inputs}
    storages: Dict[int, int] = {}
    for t in live:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    total = sum(storages.values())
    act = sum(n for ptr, n in storages.items() if ptr not in excluded)
    return out, {"saved_tensors": len(live), "saved_storages": len(storages), "saved_bytes_total": total,
                 "saved_bytes": act}
