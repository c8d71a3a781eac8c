"""Triton backend: launchers for the kernels in ``kernels.py``.

Runs CUDA tensors (fp32/fp16/bf16 inputs, fp32 math), and CPU tensors under
``TRITON_INTERPRET=1`` (fp32/fp64; for correctness tests only).  Solver: Picard.

Matmul precision: ``tl.dot`` runs in exact fp32 ("ieee") unless ``DYNALAY_TRITON_PRECISION``
(or :func:`set_precision`) says ``tf32x3`` (3xTF32 tensor-core passes, about fp32 accuracy) or
``tf32`` (one pass, ~1e-3 relative operand rounding: a tolerance below that may not be met).
"""
from __future__ import annotations

import contextlib
import os
from contextvars import ContextVar
from typing import Optional, Tuple

import torch
from torch import Tensor

from ...ops.dispatch import num_tiles_bound, route_impl
from . import kernels as K

_PRECISIONS = ("ieee", "tf32x3", "tf32")
_precision = os.environ.get("DYNALAY_TRITON_PRECISION", "ieee")
FAST_PATH_MAX_H = 128  # next_pow2(H) up to this keeps W resident on chip


def set_precision(p: str) -> None:
    global _precision
    if p not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS} (got {p!r})")
    _precision = p


def get_precision() -> str:
    if _precision not in _PRECISIONS:
        raise ValueError(f"DYNALAY_TRITON_PRECISION must be one of {_PRECISIONS} (got {_precision!r})")
    return _precision


# Read once, like Triton itself (its kernels are interpreted or compiled from the moment they are
# decorated, i.e. when this package is imported).
_INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interp() -> bool:
    return _INTERP


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if (dtype == torch.float64 or _interp()) else get_precision()


def _np2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


_config_override: dict = {}


def set_solve_config(fast: Optional[Tuple[int, int]] = None, tiled: Optional[Tuple[int, int, int]] = None) -> None:
    """Override the launch configuration (for tuning sweeps and tests): ``fast=(BM, num_warps)``
    for the resident-W path, ``tiled=(BM, BN, num_warps)`` for the tiled path; None restores the
    defaults."""
    _config_override.clear()
    if fast is not None:
        _config_override["fast"] = tuple(fast)
    if tiled is not None:
        _config_override["tiled"] = tuple(tiled)


def _parse_env_config() -> dict:
    """``DYNALAY_TRITON_FAST_CONFIG="64:32,4;128:64,8"`` (BH bucket: BM,num_warps) and
    ``DYNALAY_TRITON_TILED_CONFIG="32,64,4"`` (BM,BN,num_warps) override the defaults."""
    out: dict = {}
    fast = os.environ.get("DYNALAY_TRITON_FAST_CONFIG", "").strip()
    for part in filter(None, fast.split(";")):
        bucket, cfg = part.split(":")
        bm, w = (int(v) for v in cfg.split(","))
        out[("fast", int(bucket))] = (bm, w)
    tiled = os.environ.get("DYNALAY_TRITON_TILED_CONFIG", "").strip()
    if tiled:
        out["tiled"] = tuple(int(v) for v in tiled.split(","))
    return out


_env_config = _parse_env_config()
# Defaults, from the launch-configuration sweeps on an H200 (benchmarks/gpu_tune.py; results in
# benchmarks/results/gpu-h200-2026-11-27/): bucket of next_pow2(H) -> (BM, num_warps); tiled path
# (BM, BN, num_warps) per input dtype: (64, 64, 4) was fastest for fp32 but 10x slower than
# (32, 64, 4) for bf16 inputs.  The resident-W configurations are the ones that stay fast whichever
# ptxas compiles them: torch.compile points TRITON_PTXAS_PATH at torch's own ptxas for the rest of
# the process, and under it (16, 8) at H=128 ran 2.6 ms against 0.14 ms under Triton's ptxas
# (register allocation falls to local memory); (64, 16) ran 0.13 ms under both, and (32, 16) at
# H=64 0.12-0.13 ms under both (session-10 probe: benchmarks/results/gpu-h200-2026-11-27-s10/run3-probe-profile.log).
_FAST_DEFAULT = {64: (32, 16), 128: (64, 16)}
_TILED_DEFAULT = {torch.float32: (64, 64, 4), torch.float64: (64, 64, 4)}
_TILED_LOWP = (32, 64, 4)


def solve_config(H: int, dtype: torch.dtype) -> Tuple[bool, int, int, int]:
    """(fast_path, BM, BH_or_BN, num_warps) for a solve of width H."""
    BH = max(16, _np2(H))
    if BH <= FAST_PATH_MAX_H:
        if "fast" in _config_override:
            bm, warps = _config_override["fast"]
            return True, bm, BH, warps
        bucket = 64 if BH <= 64 else 128
        bm, warps = _env_config.get(("fast", bucket), _FAST_DEFAULT[bucket])
        return True, bm, BH, warps
    if "tiled" in _config_override:
        bm, bn, warps = _config_override["tiled"]
        return False, bm, bn, warps
    bm, bn, warps = _env_config.get("tiled", _TILED_DEFAULT.get(dtype, _TILED_LOWP))
    return False, bm, bn, warps


# Routing of an actions tensor, reused by the launches of one backward pass (the adjoint solve, the
# transposed projection, the weight gradients, every step of a phantom or GMRES backward) inside a
# ``route_scope``.  Outside a scope every launch routes afresh: a cache across calls would have to
# trust the tensor's version counter, which writes through ``.data``, numpy views, DLPack or
# inference tensors do not bump (the same tensor refilled by an RL loop would get stale groups).
# The forward computes its routing once per call and passes it to its launches.  Never read or
# written while a CUDA graph is being captured: the capture must record the routing kernels.
_scope: ContextVar[Optional[dict]] = ContextVar("dynalay_triton_route_scope", default=None)


@contextlib.contextmanager
def route_scope():
    """Within this block, launches on the same ``actions`` tensor (same version) share one routing.
    Nested scopes share the outer one."""
    if _scope.get() is not None:
        yield
        return
    token = _scope.set({})
    try:
        yield
    finally:
        _scope.reset(token)


def _capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _route(actions: Tensor, L: int, BM: int, any_block: bool = False):
    """Routing tables of ``actions`` for ``BM``-row tiles (``any_block``: only perm/offsets are
    needed, so a routing of any tile size will do), shared inside a ``route_scope``."""
    cache = _scope.get()
    if cache is None or _capturing(actions):
        return route_tables(actions, L, BM)
    ver = None if actions.is_inference() else actions._version  # inference tensors have no counter
    ent = cache.get(id(actions))
    if ent is None or ent[0] is not actions or ent[1] != ver:
        ent = (actions, ver, {})  # holds the tensor: its id cannot be reused while the scope lives
        cache[id(actions)] = ent
    tables = ent[2]
    hit = tables.get((L, BM))
    if hit is None and any_block:
        hit = next((r for (l_, _), r in tables.items() if l_ == L), None)
    if hit is None:
        hit = tables[(L, BM)] = route_tables(actions, L, BM)
    return hit


ROUTE_MAX_LP = 256       # L + 1 <= 256 layers (padded to a power of two)
ROUTE_MAX_CHUNKS = 512   # B <= 512 chunks of up to 1024 rows


def route_tables(actions: Tensor, L: int, BM: int):
    """``dynalay.ops.dispatch.route_impl`` in two Triton launches (a per-chunk group count, then
    one pass that places every row stably and writes the tile tables): no sort, no host sync, no
    atomics.  Same outputs for valid actions (tested); an action outside [0, L] (possible only with
    check="none") is routed as NOP."""
    B = actions.shape[0]
    LP = max(2, _np2(L + 1))
    CHUNK = max(16, min(1024, _np2(B), 16384 // LP))
    NCH = triton_cdiv(B, CHUNK)
    # route_impl (a sort; still no host sync) where these kernels do not fit: the place kernel
    # holds (CHUNK, LP) blocks in registers (large L), and each of its programs scans all NCH x LP
    # chunk counts, work that grows as NCH^2 (B beyond ~512 chunks)
    if B == 0 or B >= 2 ** 31 or not (actions.is_cuda or _interp()) or LP > ROUTE_MAX_LP or NCH > ROUTE_MAX_CHUNKS:
        return route_impl(actions, L, BM)
    actions = actions.contiguous()
    dev = actions.device
    T = num_tiles_bound(B, L, BM)
    i32, i64 = torch.int32, torch.int64
    cc = torch.empty(NCH, LP, device=dev, dtype=i32)
    counts = torch.empty(L + 1, device=dev, dtype=i64)
    offsets = torch.empty(L + 2, device=dev, dtype=i64)
    perm = torch.empty(B, device=dev, dtype=i64)
    tile_layer = torch.empty(T, device=dev, dtype=i32)
    tile_start = torch.empty(T, device=dev, dtype=i32)
    num_tiles = torch.empty(1, device=dev, dtype=i32)
    K._route_count_kernel[(NCH,)](actions, cc, B, L, LP=LP, CHUNK=CHUNK, num_warps=4)
    K._route_place_kernel[(max(NCH, triton_cdiv(T, CHUNK)),)](
        actions, cc, counts, offsets, perm, tile_layer, tile_start, num_tiles, B, T, L, NCH, BM=BM, LP=LP,
        CHUNK=CHUNK, NCB=min(64, max(2, _np2(NCH))), num_warps=4)
    return counts, offsets, perm, tile_layer, tile_start, num_tiles


def _launch_solve(C: Tensor, W: Tensor, D: Optional[Tensor], Z0: Optional[Tensor], Z: Tensor, ITERS: Tensor,
                  RES: Tensor, CONV: Tensor, routing, adjoint: bool, tol: float, max_iter: int, damping: float,
                  eps: float, d_is_z: bool = False) -> None:
    B, H = C.shape
    if B == 0:
        return
    if not adjoint:  # the kernels read M row-major: W^T for the forward map (H^2 per layer, once)
        W = W.transpose(1, 2).contiguous()
    is_f64 = C.dtype == torch.float64
    fast, BM, BX, warps = solve_config(H, W.dtype)  # the routing of the caller used the same
    grouped = routing is not None
    if grouped:
        _, offsets, perm, tile_layer, tile_start, num_tiles = routing
        grid = (tile_layer.shape[0],)
    else:
        offsets = perm = tile_layer = tile_start = num_tiles = ITERS  # unused dummies
        grid = (triton_cdiv(B, BM),)
    d = D if D is not None else C
    z0 = Z0 if Z0 is not None else C
    common = dict(ADJOINT=adjoint, HAS_Z0=Z0 is not None, GROUPED=grouped, EXACT=damping == 1.0, IS_F64=is_f64,
                  BM=BM, PREC=_prec(C.dtype), USE_LIBDEVICE=not _interp(), D_IS_Z=d_is_z, num_warps=warps)
    if fast:
        K._fp_solve_kernel[grid](C, W, d, z0, Z, ITERS, RES, CONV, perm, tile_layer, tile_start, offsets,
                                 num_tiles, B, H, float(tol), float(eps), float(damping), int(max_iter),
                                 BH=BX, **common)
    else:
        scr = torch.empty(2, B, H, device=C.device, dtype=torch.float64 if is_f64 else torch.float32)
        K._fp_solve_tiled_kernel[grid](C, W, d, z0, Z, ITERS, RES, CONV, perm, tile_layer, tile_start, offsets,
                                       num_tiles, scr, B, H, float(tol), float(eps), float(damping), int(max_iter),
                                       BN=BX, BK=BX, **common)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _outputs(C: Tensor, out_dtype: torch.dtype, actions: Optional[Tensor], L: int, z_init: Optional[Tensor]):
    B, H = C.shape
    cd = torch.float64 if C.dtype == torch.float64 else torch.float32
    if actions is None:
        Z = torch.empty(B, H, device=C.device, dtype=out_dtype)
        CONV = torch.empty(B, device=C.device, dtype=torch.bool)
    else:  # NOP rows are not in any tile: pre-fill them (z0 or 0, converged, 0 iterations)
        Z = z_init.to(out_dtype).clone() if z_init is not None else torch.zeros(B, H, device=C.device,
                                                                               dtype=out_dtype)
        CONV = actions == L
    # every row of a non-grouped solve is written by the kernel; NOP rows (0 iterations, residual 0)
    # are in no tile
    alloc = torch.empty if actions is None else torch.zeros
    ITERS = alloc(B, device=C.device, dtype=torch.int32)
    RES = alloc(B, device=C.device, dtype=cd)
    return Z, ITERS, RES, CONV


def fp_solve(c: Tensor, W: Tensor, d: Optional[Tensor], actions: Optional[Tensor], z0: Optional[Tensor],
             adjoint: bool, tol: float, max_iter: int, solver: str, damping: float, m: int, lam: float, eps: float,
             d_is_z: bool = False):
    """The grouped solve (see kernels.py).  ``d_is_z``: ``d`` holds the forward's z* (any float
    dtype) and the adjoint uses 1 - z*^2, computed in the kernel (no separate elementwise pass)."""
    if solver != "picard":
        raise RuntimeError("dynalay triton backend: only solver='picard' is implemented")
    c, W = c.contiguous(), W.contiguous()
    d = None if d is None else d.contiguous()
    z0 = None if z0 is None else z0.contiguous()
    L = W.shape[0]
    Z, ITERS, RES, CONV = _outputs(c, c.dtype, actions, L, z0)
    routing = None
    if actions is not None:
        _, BM, _, _ = solve_config(c.shape[1], W.dtype)
        routing = _route(actions, L, BM)
    _launch_solve(c, W, d, z0, Z, ITERS, RES, CONV, routing, adjoint, tol, max_iter, damping, eps, d_is_z)
    return Z, ITERS, RES, CONV


def _launch_linear(x: Tensor, U: Tensor, b: Optional[Tensor], y: Tensor, routing, transpose: bool, BM: int):
    N = U.shape[2] if transpose else U.shape[1]
    Kd = x.shape[1]
    _, offsets, perm, tile_layer, tile_start, num_tiles = routing
    BN = min(64, max(16, _np2(N)))
    BK = min(64, max(16, _np2(Kd)))
    grid = (tile_layer.shape[0], triton_cdiv(N, BN))
    K._grouped_linear_kernel[grid](x, U, b if b is not None else U, y, perm, tile_layer, tile_start, offsets,
                                   num_tiles, N, Kd, HAS_BIAS=b is not None, TRANSPOSE=transpose,
                                   IS_F64=x.dtype == torch.float64, BM=BM, BN=BN, BK=BK, PREC=_prec(x.dtype),
                                   num_warps=4)


def grouped_linear(x: Tensor, U: Tensor, b: Optional[Tensor], actions: Tensor, transpose: bool) -> Tensor:
    x, U = x.contiguous(), U.contiguous()
    b = None if b is None else b.contiguous()
    L = U.shape[0]
    N = U.shape[2] if transpose else U.shape[1]
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.zeros(x.shape[0], N, device=x.device, dtype=cd)
    if x.shape[0]:
        _, BM, _, _ = solve_config(N, x.dtype)  # the solve's tiles: one routing serves both
        _launch_linear(x, U, b, y, _route(actions, L, BM), transpose, BM)
    return y


def grouped_wgrad(u: Tensor, x: Tensor, actions: Optional[Tensor], num_layers: int) -> Tensor:
    if actions is None:  # one layer: a plain GEMM (cuBLAS is deterministic for a fixed shape)
        return (u.t() @ x).unsqueeze(0)
    u, x = u.contiguous(), x.contiguous()
    N, Kd = u.shape[1], x.shape[1]
    out = torch.empty(num_layers, N, Kd, device=u.device, dtype=u.dtype)
    _, offsets, perm, _, _, _ = _route(actions, num_layers, 32, any_block=True)
    BN = min(64, max(16, _np2(N)))
    BK = min(64, max(16, _np2(Kd)))
    grid = (num_layers, triton_cdiv(N, BN), triton_cdiv(Kd, BK))
    K._grouped_wgrad_kernel[grid](u, x, out, perm, offsets, N, Kd, IS_F64=u.dtype == torch.float64, BM=32, BN=BN,
                                  BK=BK, PREC=_prec(u.dtype), num_warps=4)
    return out


def dynamic_step(h: Tensor, actions: Tensor, U: Tensor, W: Tensor, b: Tensor, tol: float, max_iter: int, solver: str,
                 damping: float, m: int, lam: float, eps: float):
    """Fused DynaLay step: one routing, then one grouped-linear launch (inj = U[a] h + b[a]) and one
    solve launch over the tiles of all layers.  NOP rows keep h."""
    if solver != "picard":
        raise RuntimeError("dynalay triton backend: only solver='picard' is implemented")
    h, U, W, b = h.contiguous(), U.contiguous(), W.contiguous(), b.contiguous()
    B, H = h.shape
    L = U.shape[0]
    _, BM, _, _ = solve_config(H, h.dtype)
    routing = _route(actions, L, BM)
    cd = torch.float64 if h.dtype == torch.float64 else torch.float32
    inj = torch.empty(B, H, device=h.device, dtype=cd)  # NOP rows are never read
    _launch_linear(h, U, b, inj, routing, False, BM)
    Z, ITERS, RES, CONV = _outputs(inj, h.dtype, actions, L, h)
    _launch_solve(inj, W, None, None, Z, ITERS, RES, CONV, routing, False, tol, max_iter, damping, eps)
    return Z, ITERS, CONV, RES
