"""Triton kernels of dynalay.

``_fp_solve_kernel``        fixed-point solve of a tile of rows, M = W^T (forward) or W (adjoint),
                            row-major, resident in registers/SMEM
                            (next_pow2(H) <= 128): the whole iteration stays on chip.
``_fp_solve_tiled_kernel``  the same for larger H: N/K tiles per iteration, the iterate
                            ping-pongs through a per-row scratch slab (global memory, L2).
``_grouped_linear_kernel``  y_i = x_i U[a_i]^T + b[a_i]  (or x_i U[a_i]) on the routing tiles.
``_grouped_wgrad_kernel``   out[l] = sum_{i in l} u_i^T x_i, one program per (layer, N, K) tile,
                            rows visited in sorted order: deterministic, no atomics.

Grouping (``GROUPED``): program ``pid`` owns tile ``pid`` of the routing tables built by
``dynalay.ops.dispatch.route_impl``: every tile belongs to one layer, rows are gathered through
``perm`` (index-space padding only, no permuted copy), programs past ``num_tiles`` exit (the
grid is a static upper bound, so there is no host sync).  Math and the iterate are in fp32
(fp64 under the interpreter for fp64 inputs); ``PREC`` is the ``tl.dot`` input precision
("ieee" by default; "tf32"/"tf32x3" only when asked for).
"""
import triton
import triton.language as tl

try:  # libdevice's accurate tanh on GPUs; the interpreter does not implement it
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover
    libdevice = None


@triton.jit
def _tanh(x, USE_LIBDEVICE: tl.constexpr):
    if USE_LIBDEVICE:
        y = libdevice.tanh(x)
    else:
        # interpreter: evaluate in float64 (correctly rounded for fp32 inputs in practice)
        xd = x.to(tl.float64)
        ax = tl.abs(xd)
        e = tl.exp(-2.0 * ax)
        t = (1.0 - e) / (1.0 + e)
        x2 = xd * xd
        p = xd * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
            -0.05396825396825397 + x2 * 0.021869488536155203))))
        y = tl.where(ax < 0.03, p, tl.where(xd < 0, -t, t)).to(x.dtype)
    return y


@triton.jit
def _rel_residual(gg, ff, eps, IS_F64: tl.constexpr):
    """sqrt(gg) / (sqrt(ff) + eps), correctly rounded as in torch: a plain fp32 tl.sqrt and `/`
    compile to approximate instructions on the GPU, and a row whose residual lies within a few
    ulp of tol would then stop one iteration apart from the other backends."""
    if IS_F64:
        r = tl.sqrt(gg) / (tl.sqrt(ff) + eps)
    else:
        r = tl.div_rn(tl.sqrt_rn(gg), tl.sqrt_rn(ff) + eps)
    return r


@triton.jit
def _up(x, IS_F64: tl.constexpr):
    if IS_F64:
        y = x.to(tl.float64)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _tile_rows(pid, B, PERM, TILE_LAYER, TILE_START, OFFSETS, BM: tl.constexpr, GROUPED: tl.constexpr):
    """Rows (int64) of this program's tile, their mask and the tile's layer.  Callers return
    before this for spare tiles (pid >= num_tiles), so the layer is valid."""
    offs = tl.arange(0, BM)
    if GROUPED:
        layer = tl.load(TILE_LAYER + pid)
        start = tl.load(TILE_START + pid).to(tl.int64)
        end = tl.load(OFFSETS + layer + 1)
        pos = start + offs
        rmask = pos < end
        rows = tl.load(PERM + pos, mask=rmask, other=0).to(tl.int64)
    else:
        layer = pid * 0
        rows = pid.to(tl.int64) * BM + offs
        rmask = rows < B
    return rows, rmask, layer


@triton.jit
def _fp_solve_kernel(C, W, D, Z0, Z, ITERS, RES, CONV, PERM, TILE_LAYER, TILE_START, OFFSETS, NUM_TILES,
                     B, H, tol, eps, damping, max_iter,
                     ADJOINT: tl.constexpr, HAS_Z0: tl.constexpr, GROUPED: tl.constexpr, EXACT: tl.constexpr,
                     IS_F64: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr,
                     USE_LIBDEVICE: tl.constexpr, D_IS_Z: tl.constexpr):
    pid = tl.program_id(0)
    if GROUPED:
        if pid >= tl.load(NUM_TILES):
            return
    rows, rmask, layer = _tile_rows(pid, B, PERM, TILE_LAYER, TILE_START, OFFSETS, BM, GROUPED)
    cols = tl.arange(0, BH)
    cmask = cols < H
    m2 = rmask[:, None] & cmask[None, :]
    ptrs = rows[:, None] * H + cols[None, :]
    # the layer's matrix M, resident for the whole solve (p = z M).  The launcher passes M itself,
    # row-major: W^T for the forward map, W for the adjoint.  (A transposed load of W gave a layout
    # whose per-iteration conversion for tl.dot cost the forward kernel ~4x the adjoint's time.)
    kk = cols[:, None]
    nn = cols[None, :]
    wbase = W + layer.to(tl.int64) * H * H
    M = _up(tl.load(wbase + kk * H + nn, mask=(kk < H) & (nn < H), other=0.0), IS_F64)
    c = _up(tl.load(C + ptrs, mask=m2, other=0.0), IS_F64)
    if ADJOINT:
        d = _up(tl.load(D + ptrs, mask=m2, other=0.0), IS_F64)
        if D_IS_Z:  # D holds the forward's z*: d = 1 - z*^2, the tanh derivative
            d = 1.0 - d * d
    if HAS_Z0:
        z = _up(tl.load(Z0 + ptrs, mask=m2, other=0.0), IS_F64)
    else:
        z = tl.zeros([BM, BH], dtype=c.dtype)  # not c * 0: an infinite c would start the row at NaN
    active = rmask
    iters = tl.zeros([BM], dtype=tl.int32)
    res = tl.sum(z, axis=1) * 0.0
    conv = rmask & (rows < 0)
    it = tl.full([], 0, tl.int32)
    n_act = tl.sum(active.to(tl.int32), axis=0)
    while (it < max_iter) & (n_act > 0):
        p = tl.dot(z, M, input_precision=PREC)
        if ADJOINT:
            fz = d * (c + p)
        else:
            fz = _tanh(p + c, USE_LIBDEVICE)
        g = fz - z
        r = _rel_residual(tl.sum(g * g, axis=1), tl.sum(fz * fz, axis=1), eps, IS_F64)
        done = r < tol
        iters = tl.where(active, it + 1, iters)
        res = tl.where(active, r, res)
        conv = conv | (active & done)
        if EXACT:
            zn = fz
        else:
            zn = z + damping * g
        z = tl.where(active[:, None], zn, z)
        active = active & (~done)
        it += 1
        n_act = tl.sum(active.to(tl.int32), axis=0)
    tl.store(Z + ptrs, z.to(Z.dtype.element_ty), mask=m2)
    tl.store(ITERS + rows, iters, mask=rmask)
    tl.store(RES + rows, res.to(RES.dtype.element_ty), mask=rmask)
    tl.store(CONV + rows, conv, mask=rmask)


@triton.jit
def _fp_solve_tiled_kernel(C, W, D, Z0, Z, ITERS, RES, CONV, PERM, TILE_LAYER, TILE_START, OFFSETS, NUM_TILES,
                           SCR, B, H, tol, eps, damping, max_iter,
                           ADJOINT: tl.constexpr, HAS_Z0: tl.constexpr, GROUPED: tl.constexpr,
                           EXACT: tl.constexpr, IS_F64: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           BK: tl.constexpr, PREC: tl.constexpr, USE_LIBDEVICE: tl.constexpr, D_IS_Z: tl.constexpr):
    """Large H: per iteration, loop over N tiles (and K tiles inside); the iterate of the tile's
    rows lives in a (2, B, H) ping-pong scratch ``SCR`` (fp32) that only this program touches."""
    pid = tl.program_id(0)
    if GROUPED:
        if pid >= tl.load(NUM_TILES):
            return
    rows, rmask, layer = _tile_rows(pid, B, PERM, TILE_LAYER, TILE_START, OFFSETS, BM, GROUPED)
    wbase = W + layer.to(tl.int64) * H * H
    half = (tl.full([], 0, tl.int64) + B) * H
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    # scratch[0] <- z0 (or 0)
    for n0 in range(0, H, BN):
        cn = n0 + offs_n
        m2 = rmask[:, None] & (cn < H)[None, :]
        ptrs = rows[:, None] * H + cn[None, :]
        if HAS_Z0:
            zi = _up(tl.load(Z0 + ptrs, mask=m2, other=0.0), IS_F64)
        else:
            zi = _up(tl.zeros([BM, BN], dtype=tl.float32), IS_F64)
        tl.store(SCR + ptrs, zi, mask=m2)
    tl.debug_barrier()
    active = rmask
    iters = tl.zeros([BM], dtype=tl.int32)
    res = _up(tl.zeros([BM], dtype=tl.float32), IS_F64)
    conv = rmask & (rows < 0)
    it = tl.full([], 0, tl.int32)
    n_act = tl.sum(active.to(tl.int32), axis=0)
    while (it < max_iter) & (n_act > 0):
        cur = SCR + (it % 2).to(tl.int64) * half
        nxt = SCR + ((it + 1) % 2).to(tl.int64) * half
        num = _up(tl.zeros([BM], dtype=tl.float32), IS_F64)
        den = _up(tl.zeros([BM], dtype=tl.float32), IS_F64)
        for n0 in range(0, H, BN):
            cn = n0 + offs_n
            nmask = cn < H
            acc = _up(tl.zeros([BM, BN], dtype=tl.float32), IS_F64)
            for k0 in range(0, H, BK):
                ck = k0 + offs_k
                kmask = ck < H
                zk = tl.load(cur + rows[:, None] * H + ck[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
                mk = tl.load(wbase + ck[:, None] * H + cn[None, :], mask=kmask[:, None] & nmask[None, :], other=0.0)
                acc += tl.dot(zk, _up(mk, IS_F64), input_precision=PREC)
            m2 = rmask[:, None] & nmask[None, :]
            ptrs = rows[:, None] * H + cn[None, :]
            cv = _up(tl.load(C + ptrs, mask=m2, other=0.0), IS_F64)
            if ADJOINT:
                dv = _up(tl.load(D + ptrs, mask=m2, other=0.0), IS_F64)
                if D_IS_Z:
                    dv = 1.0 - dv * dv
                fz = dv * (cv + acc)
            else:
                fz = _tanh(acc + cv, USE_LIBDEVICE)
            zc = tl.load(cur + ptrs, mask=m2, other=0.0)
            g = fz - zc
            num += tl.sum(g * g, axis=1)
            den += tl.sum(fz * fz, axis=1)
            if EXACT:
                zn = fz
            else:
                zn = zc + damping * g
            tl.store(nxt + ptrs, tl.where(active[:, None], zn, zc), mask=m2)
        r = _rel_residual(num, den, eps, IS_F64)
        done = r < tol
        iters = tl.where(active, it + 1, iters)
        res = tl.where(active, r, res)
        conv = conv | (active & done)
        active = active & (~done)
        it += 1
        n_act = tl.sum(active.to(tl.int32), axis=0)
        tl.debug_barrier()
    fin = SCR + (it % 2).to(tl.int64) * half
    for n0 in range(0, H, BN):
        cn = n0 + offs_n
        m2 = rmask[:, None] & (cn < H)[None, :]
        ptrs = rows[:, None] * H + cn[None, :]
        zf = tl.load(fin + ptrs, mask=m2, other=0.0)
        tl.store(Z + ptrs, zf.to(Z.dtype.element_ty), mask=m2)
    tl.store(ITERS + rows, iters, mask=rmask)
    tl.store(RES + rows, res.to(RES.dtype.element_ty), mask=rmask)
    tl.store(CONV + rows, conv, mask=rmask)


@triton.jit
def _grouped_linear_kernel(X, U, Bias, Y, PERM, TILE_LAYER, TILE_START, OFFSETS, NUM_TILES, N, K,
                           HAS_BIAS: tl.constexpr, TRANSPOSE: tl.constexpr, IS_F64: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid >= tl.load(NUM_TILES):
        return
    rows, rmask, layer = _tile_rows(pid, 0, PERM, TILE_LAYER, TILE_START, OFFSETS, BM, True)
    cn = pid_n * BN + tl.arange(0, BN)
    nmask = cn < N
    offs_k = tl.arange(0, BK)
    ubase = U + layer.to(tl.int64) * N * K
    acc = _up(tl.zeros([BM, BN], dtype=tl.float32), IS_F64)
    for k0 in range(0, K, BK):
        ck = k0 + offs_k
        kmask = ck < K
        xk = _up(tl.load(X + rows[:, None] * K + ck[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0),
                 IS_F64)
        if TRANSPOSE:  # U[l] is (K, N): y = x U
            uk = tl.load(ubase + ck[:, None] * N + cn[None, :], mask=kmask[:, None] & nmask[None, :], other=0.0)
        else:          # U[l] is (N, K): y = x U^T
            uk = tl.load(ubase + cn[None, :] * K + ck[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc += tl.dot(xk, _up(uk, IS_F64), input_precision=PREC)
    if HAS_BIAS:
        acc += _up(tl.load(Bias + layer.to(tl.int64) * N + cn, mask=nmask, other=0.0), IS_F64)[None, :]
    tl.store(Y + rows[:, None] * N + cn[None, :], acc.to(Y.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _grouped_wgrad_kernel(Ug, X, OUT, PERM, OFFSETS, N, K, IS_F64: tl.constexpr, BM: tl.constexpr,
                          BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    layer = tl.program_id(0)
    cn = tl.program_id(1) * BN + tl.arange(0, BN)
    ck = tl.program_id(2) * BK + tl.arange(0, BK)
    nmask = cn < N
    kmask = ck < K
    start = tl.load(OFFSETS + layer)
    end = tl.load(OFFSETS + layer + 1)
    acc = _up(tl.zeros([BN, BK], dtype=tl.float32), IS_F64)
    offs = tl.arange(0, BM)
    for s in range(start, end, BM):
        pos = s + offs
        rmask = pos < end
        rows = tl.load(PERM + pos, mask=rmask, other=0).to(tl.int64)
        u = _up(tl.load(Ug + rows[:, None] * N + cn[None, :], mask=rmask[:, None] & nmask[None, :], other=0.0),
                IS_F64)
        x = _up(tl.load(X + rows[:, None] * K + ck[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0),
                IS_F64)
        acc += tl.dot(tl.trans(u), x, input_precision=PREC)
    out = OUT + layer.to(tl.int64) * N * K
    tl.store(out + cn[:, None] * K + ck[None, :], acc.to(OUT.dtype.element_ty),
             mask=nmask[:, None] & kmask[None, :])


# ------------------------------------------------------------------------------------------------
# Routing (dynalay.ops.dispatch.route_impl in two launches, no host sync, no atomics)
# ------------------------------------------------------------------------------------------------
@triton.jit
def _route_chunk_onehot(A, c, B, L, LP: tl.constexpr, CHUNK: tl.constexpr):
    """Rows of chunk ``c``, their validity, and the (CHUNK, LP) one-hot of their group (an action
    outside [0, L], possible only with check="none", counts as NOP: perm stays a permutation)."""
    i = c * CHUNK + tl.arange(0, CHUNK)
    valid = i < B
    a = tl.load(A + i, mask=valid, other=0)
    a = tl.where((a < 0) | (a > L), L, a).to(tl.int32)
    lanes = tl.arange(0, LP)
    onehot = ((a[:, None] == lanes[None, :]) & valid[:, None]).to(tl.int32)
    return i, valid, onehot


@triton.jit
def _route_count_kernel(A, CC, B, L, LP: tl.constexpr, CHUNK: tl.constexpr):
    """CC[c, l] = rows of chunk c in group l."""
    c = tl.program_id(0)
    _, _, onehot = _route_chunk_onehot(A, c, B, L, LP, CHUNK)
    tl.store(CC + c * LP + tl.arange(0, LP), tl.sum(onehot, axis=0))


@triton.jit
def _route_place_kernel(A, CC, COUNTS, OFFSETS, PERM, TILE_LAYER, TILE_START, NUM_TILES, B, T, L, NCH,
                        BM: tl.constexpr, LP: tl.constexpr, CHUNK: tl.constexpr, NCB: tl.constexpr):
    """Program p: the group totals and chunk p's base (sums over CC, fixed order), then the stable
    positions of chunk p's rows (perm), the entries of tiles [p*CHUNK, p*CHUNK+CHUNK), and (p == 0)
    counts, offsets and the number of tiles in use."""
    p = tl.program_id(0)
    lanes = tl.arange(0, LP)
    cb = tl.arange(0, NCB)
    tot = tl.zeros([LP], dtype=tl.int32)
    before = tl.zeros([LP], dtype=tl.int32)
    for c0 in range(0, NCH, NCB):
        cc = c0 + cb
        blk = tl.load(CC + cc[:, None] * LP + lanes[None, :], mask=(cc < NCH)[:, None], other=0)
        tot += tl.sum(blk, axis=0)
        before += tl.sum(tl.where((cc < p)[:, None], blk, 0), axis=0)
    excl = tl.cumsum(tot, axis=0) - tot  # offsets[l] = rows in groups < l
    if p < NCH:
        i, valid, onehot = _route_chunk_onehot(A, p, B, L, LP, CHUNK)
        rank = tl.cumsum(onehot, axis=0) - onehot
        pos = tl.sum((rank + (excl + before)[None, :]) * onehot, axis=1)
        tl.store(PERM + pos, i.to(tl.int64), mask=valid)
    tiles_per = tl.where(lanes < L, (tot + BM - 1) // BM, 0)
    tend = tl.cumsum(tiles_per, axis=0)
    tstart = tend - tiles_per
    t = p * CHUNK + tl.arange(0, CHUNK)
    if p * CHUNK < T:
        layer = tl.sum(((tend[None, :] <= t[:, None]) & (lanes[None, :] < L)).to(tl.int32), axis=1)
        inuse = layer < L
        sel = lanes[None, :] == layer[:, None]
        off_l = tl.sum(tl.where(sel, excl[None, :], 0), axis=1)
        ts_l = tl.sum(tl.where(sel, tstart[None, :], 0), axis=1)
        tmask = t < T
        tl.store(TILE_LAYER + t, tl.where(inuse, layer, -1), mask=tmask)
        tl.store(TILE_START + t, tl.where(inuse, off_l + (t - ts_l) * BM, 0), mask=tmask)
    if p == 0:
        tl.store(COUNTS + lanes, tot.to(tl.int64), mask=lanes <= L)
        tl.store(OFFSETS + lanes, excl.to(tl.int64), mask=lanes <= L)
        tl.store(OFFSETS + L + 1, (tl.sum(tot, axis=0)).to(tl.int64))
        tl.store(NUM_TILES, tl.sum(tiles_per, axis=0))
