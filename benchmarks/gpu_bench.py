"""GPU benchmark of the fused fixed-point kernels and the grouped dispatch (one call).

Problem (same for every provider): f(z) = tanh(z W^T + inj), ||W||_2 = 0.9 (Gaussian W rescaled),
inj ~ N(0, 1), tol 1e-4 relative per row, max 50 iterations.

Providers (fixed point): triton (dynalay, exact fp32 dot), triton_tf32x3 (dynalay, 3xTF32 tensor
cores), cuda (dynalay CUDA C++), eager (plain PyTorch loop, batch-max stop via .item()), compiled
(the same loop with its step under torch.compile), torchdeq (0.1.0, fixed_point_iter, ift=True).
Dispatch (L=4 layers + NOP): triton / cuda dynamic_step, per_layer_loop (index_select + eager solve
+ index_copy per layer), dense (every layer on the whole batch, then gather).

Times are medians of triton.testing.do_bench (CUDA events).  TFLOP/s counts the row-iterations
actually computed (sum over rows of iters * 2 H^2); the floor is that work at the measured
matmul peak of the card.  Usage: python benchmarks/gpu_bench.py --out DIR [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import signal
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dynalay  # noqa: E402
from dynalay import backends  # noqa: E402

TOL, MAX_ITER = 1e-4, 50


def bench(fn, dev):
    if dev == "cuda":
        import triton.testing
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[2] * 1e3


def graphed(call):
    """Capture ``call`` (forward, or forward+backward: no host sync inside) in a CUDA graph and
    return its replay: the GPU time of the op without the Python/launch overhead of eager mode."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        call()
    torch.cuda.synchronize()
    return g.replay


def mode_call(fn, args, G, mode):
    """A zero-argument call of ``fn(*args)`` in ``mode``: "fwd" under no_grad (returns fn's result);
    "fwdbwd" on fresh leaf copies of the float args, then ``(out * G).sum().backward()`` (``out``:
    fn's result, or its first element when fn returns a tuple)."""
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(*args)
        return call

    def call():
        leaves = [a.detach().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        out = fn(*leaves)
        (((out[0] if isinstance(out, tuple) else out)) * G).sum().backward()
    return call


def make_W(H, dev, dtype, L=None, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (L, H, H) if L else (H, H)
    W = torch.randn(*shape, generator=g, dtype=torch.float64)
    W = 0.9 * W / torch.linalg.matrix_norm(W, 2)[..., None, None]
    return W.to(dev, dtype)


def eager_solve(inj, W, tol=TOL, max_iter=MAX_ITER):
    z = torch.zeros_like(inj)
    it = 0
    for it in range(1, max_iter + 1):
        fz = torch.tanh(z @ W.t() + inj)
        r = (fz - z).float().norm(dim=1) / (fz.float().norm(dim=1) + 1e-12)
        z = fz
        if r.max().item() < tol:
            break
    return z, it


_compiled_step = None


def compiled_solve(inj, W, tol=TOL, max_iter=MAX_ITER):
    global _compiled_step
    if _compiled_step is None:
        def step(z, W, inj):
            fz = torch.tanh(z @ W.t() + inj)
            r = (fz - z).float().norm(dim=1) / (fz.float().norm(dim=1) + 1e-12)
            return fz, r.max()
        _compiled_step = torch.compile(step, dynamic=True)
    z = torch.zeros_like(inj)
    it = 0
    for it in range(1, max_iter + 1):
        z, rmax = _compiled_step(z, W, inj)
        if rmax.item() < tol:
            break
    return z, it


def torchdeq_solver():
    from torchdeq import get_deq
    return get_deq(f_solver="fixed_point_iter", f_max_iter=MAX_ITER, f_tol=TOL, f_stop_mode="rel", ift=True,
                   b_solver="fixed_point_iter", b_max_iter=MAX_ITER, b_tol=TOL, b_stop_mode="rel")


def fp_provider(name, dev):
    if name in ("triton", "triton_tf32x3", "cuda", "torch", "triton_graph", "cuda_graph"):
        be = "triton" if name.startswith("triton") else name.replace("_graph", "")

        def run(inj, W):
            r = dynalay.fixed_point(inj, W, tol=TOL, max_iter=MAX_ITER, backend=be, check="none")
            return r.z, r.iters
        return run
    if name == "eager":
        return lambda inj, W: eager_solve(inj, W)
    if name == "compiled":
        return lambda inj, W: compiled_solve(inj, W)
    if name == "torchdeq":
        deq = torchdeq_solver()

        def run(inj, W):
            zs, info = deq(lambda z: torch.tanh(z @ W.t() + inj), torch.zeros_like(inj))
            return zs[-1], int(info["nstep"].max()) if "nstep" in info else -1
        return run
    raise ValueError(name)


def measure_peaks(dev):
    peaks = {}
    if dev != "cuda":
        return {"fp32": 1.0, "tf32": 1.0, "bf16": 1.0}
    n = 8192
    for key, dt, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True), ("bf16", torch.bfloat16,
                                                                                             False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(n, n, device=dev, dtype=dt)
        b = torch.randn(n, n, device=dev, dtype=dt)
        ms = bench(lambda: a @ b, dev)
        peaks[key] = 2 * n ** 3 / (ms * 1e-3) / 1e12
        del a, b
    torch.backends.cuda.matmul.allow_tf32 = False
    return peaks


def run_fixed_point(args, dev, log, rows):
    from dynalay.backends import triton as tb
    peaks = measure_peaks(dev)
    log(f"measured matmul peaks (TFLOP/s, 8192^3): {json.dumps({k: round(v, 1) for k, v in peaks.items()})}")
    Bs = args.B or ([1024, 8192, 65536] if not args.quick else [64, 256])
    Hs = args.H or ([64, 128, 256, 512] if not args.quick else [32, 160])
    dtypes = [torch.float32, torch.bfloat16] if dev == "cuda" else [torch.float32]
    provs = ["triton", "triton_tf32x3", "cuda", "triton_graph", "cuda_graph", "eager", "compiled", "torchdeq"] \
        if dev == "cuda" else ["torch", "eager", "compiled", "torchdeq"]
    avail = {p: not backends.not_supported_reasons("triton" if p.startswith("triton") else p.replace("_graph", ""),
                                                   dev, torch.float32)
             for p in ("triton", "triton_tf32x3", "cuda", "torch", "triton_graph", "cuda_graph")}
    for dt in dtypes:
        for H in Hs:
            for B in Bs:
                g = torch.Generator(device="cpu").manual_seed(B + H)
                inj = torch.randn(B, H, generator=g).to(dev, dt)
                W = make_W(H, dev, dt)
                G = torch.randn(B, H, generator=g).to(dev, dt)
                ref_iters = None
                for p in provs:
                    if p in avail and not avail[p]:
                        continue
                    if p == "torchdeq" and dt != torch.float32:
                        continue
                    for mode in ("fwd", "fwdbwd"):
                        rec = dict(kind="fixed_point", provider=p, B=B, H=H, dtype=str(dt).split(".")[-1], mode=mode)
                        try:
                            tb.set_precision("tf32x3" if p == "triton_tf32x3" else "ieee")
                            call = mode_call(fp_provider(p, dev), (inj, W), G, mode)
                            out = call() if mode == "fwd" else None
                            ms = bench(graphed(call) if p.endswith("_graph") else call, dev)
                            rec["ms"] = ms
                            if mode == "fwd" and out is not None:
                                its = out[1]
                                if torch.is_tensor(its):
                                    rec["mean_iters"] = float(its.float().mean())
                                    rec["max_iters"] = int(its.max())
                                    work = float(its.double().sum()) * 2 * H * H
                                    if p == "triton" and ref_iters is None:
                                        ref_iters = rec["mean_iters"]
                                else:
                                    rec["batch_iters"] = its
                                    work = its * B * 2 * H * H
                                rec["tflops"] = work / (ms * 1e-3) / 1e12
                                mi = ref_iters if ref_iters is not None else rec.get("mean_iters")
                                if mi is not None:
                                    peak = peaks["tf32"] / 3 if p == "triton_tf32x3" else peaks["fp32"]
                                    rec["floor_ms"] = mi * B * 2 * H * H / (peak * 1e12) * 1e3
                        except Exception as e:  # noqa: BLE001 - record and go on
                            rec["error"] = f"{type(e).__name__}: {e}"[:300]
                            log(traceback.format_exc()[-1500:])
                        finally:
                            tb.set_precision("ieee")
                        rows.append(rec)
                        log(json.dumps(rec))
                del inj, W, G
                if dev == "cuda":
                    torch.cuda.empty_cache()
    return peaks


def per_layer_loop(h, a, U, W, b, L):
    out = h.clone()
    for layer in range(L):
        rows = (a == layer).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        inj = h.index_select(0, rows) @ U[layer].t() + b[layer]
        z, _ = eager_solve(inj, W[layer])
        out = out.index_copy(0, rows, z)
    return out


def dense(h, a, U, W, b, L):
    outs = [eager_solve(h @ U[layer].t() + b[layer], W[layer])[0] for layer in range(L)]
    outs.append(h)
    stacked = torch.stack(outs, 0)
    return stacked.gather(0, a.view(1, -1, 1).expand(1, -1, h.shape[1])).squeeze(0)


def dispatch_problem(B, H, L, dev):
    """The dispatch benchmark's step (h, U, W, b), loss weights G, and its generator (which then
    draws the actions of every mix, in the order of ``dispatch_mixes``)."""
    g = torch.Generator(device="cpu").manual_seed(7 + H)
    h = torch.randn(B, H, generator=g).to(dev)
    U = (torch.randn(L, H, H, generator=g) / math.sqrt(H)).to(dev)
    W = make_W(H, dev, torch.float32, L=L, seed=H)
    b = (0.1 * torch.randn(L, H, generator=g)).to(dev)
    G = torch.randn(B, H, generator=g).to(dev)
    return (h, U, W, b), G, g


def dispatch_mixes(B, L, g, dev):
    """(actions kind, NOP fraction, actions) for uniform and skewed (90% on layer 0) layers, with
    NOP fractions 0, 0.5, 0.9."""
    for skew in ("uniform", "skew"):
        for nop in (0.0, 0.5, 0.9):
            r = torch.rand(B, generator=g)
            layer = torch.randint(0, L, (B,), generator=g)
            if skew == "skew":
                layer = torch.where(torch.rand(B, generator=g) < 0.9, torch.zeros_like(layer), layer)
            yield skew, nop, torch.where(r < nop, torch.full_like(layer, L), layer).to(dev)


def run_dispatch(args, dev, log, rows):
    L = 4
    Bs = [4096] if not args.quick else [128]
    Hs = [64, 128] if not args.quick else [32]
    provs = (["triton", "cuda", "triton_graph", "cuda_graph"] if dev == "cuda" else ["torch", "cpp"]) + \
        ["per_layer_loop", "dense"]
    for H in Hs:
        for B in Bs:
            (h, U, W, b), G, g = dispatch_problem(B, H, L, dev)
            for skew, nop, a in dispatch_mixes(B, L, g, dev):
                for p in provs:
                    be = p.replace("_graph", "")
                    if be in ("triton", "cuda", "cpp") and backends.not_supported_reasons(be, dev, torch.float32):
                        continue
                    for mode in ("fwd", "fwdbwd"):
                        rec = dict(kind="dispatch", provider=p, B=B, H=H, L=L, nop=nop, actions=skew, mode=mode)
                        try:
                            if be in ("triton", "cuda", "torch", "cpp"):
                                fn = lambda h_, U_, W_, b_, be=be: dynalay.dynamic_step(
                                    h_, a, U_, W_, b_, tol=TOL, max_iter=MAX_ITER, backend=be, check="none").h
                            elif p == "per_layer_loop":
                                fn = lambda h_, U_, W_, b_: per_layer_loop(h_, a, U_, W_, b_, L)
                            else:
                                fn = lambda h_, U_, W_, b_: dense(h_, a, U_, W_, b_, L)
                            call = mode_call(fn, (h, U, W, b), G, mode)
                            rec["ms"] = bench(graphed(call) if p.endswith("_graph") else call, dev)
                        except Exception as e:  # noqa: BLE001
                            rec["error"] = f"{type(e).__name__}: {e}"[:300]
                            log(traceback.format_exc()[-1500:])
                        rows.append(rec)
                        log(json.dumps(rec))


class Stopped(BaseException):
    """Raised in the main thread by SIGTERM (a stage timeout): the script writes what it has.  A
    BaseException, so that the per-provider `except Exception` clauses let it through."""


def _stop(signum, frame):
    raise Stopped()


def table(rows, peaks, device, cmd):
    def get(**kw):
        for r in rows:
            if all(r.get(k) == v for k, v in kw.items()) and "ms" in r:
                return r
        return None

    out = [f"# dynalay GPU benchmark: {device}", "",
           f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
           f"- command: `{cmd}`",
           f"- torch {torch.__version__}, triton {getattr(__import__('triton'), '__version__', '?')}, "
           f"python {platform.python_version()}",
           f"- measured matmul peaks (TFLOP/s, 8192^3): " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()),
           "- problem: tanh(z W^T + inj), ||W||_2 = 0.9, tol 1e-4 relative per row, max 50; medians of "
           "triton.testing.do_bench", ""]
    f = lambda r: f"{r['ms']:.3f}" if r else "-"
    out += ["## Fixed point", "",
            "Eager-mode providers: triton, tf32x3 (opt-in 3xTF32), cuda; *graph* columns replay the same call "
            "captured in a CUDA graph (GPU time without the Python and launch overhead; the eager and compiled "
            "loops read the residual back every iteration and cannot be captured).  best = the faster of triton "
            "and cuda in eager mode at the default (exact fp32 dot) precision.", "",
            "| dtype | B | H | mode | triton ms | tf32x3 ms | cuda ms | triton graph ms | cuda graph ms | eager ms | "
            "compiled ms | torchdeq ms | eager/triton | eager/cuda | eager/best | compiled/best | best TFLOP/s | "
            "floor ms | best/floor | mean iters |",
            "|" + "---|" * 20]
    keys = sorted({(r["dtype"], r["H"], r["B"], r["mode"]) for r in rows if r["kind"] == "fixed_point"},
                  key=lambda k: (k[0], k[1], k[2], k[3]))
    for dt, H, B, mode in keys:
        c = {p: get(kind="fixed_point", provider=p, dtype=dt, H=H, B=B, mode=mode)
             for p in ("triton", "triton_tf32x3", "cuda", "triton_graph", "cuda_graph", "eager", "compiled",
                       "torchdeq")}
        cands = [r for r in (c["triton"], c["cuda"]) if r]
        best = min(cands, key=lambda r: r["ms"]) if cands else None
        fw = get(kind="fixed_point", provider="triton", dtype=dt, H=H, B=B, mode="fwd") or \
            get(kind="fixed_point", provider="cuda", dtype=dt, H=H, B=B, mode="fwd")
        ratio = lambda r, t: f"{r['ms'] / t['ms']:.1f}x" if (r and t) else "-"
        tfl = f"{best['tflops']:.1f}" if (best and "tflops" in best) else "-"
        floor = f"{fw['floor_ms']:.3f}" if (fw and "floor_ms" in fw and mode == "fwd") else "-"
        tf = f"{best['ms'] / fw['floor_ms']:.1f}x" if (best and fw and "floor_ms" in fw and mode == "fwd") else "-"
        mi = f"{fw['mean_iters']:.1f}" if (fw and "mean_iters" in fw) else "-"
        out.append(f"| {dt} | {B} | {H} | {mode} | {f(c['triton'])} | {f(c['triton_tf32x3'])} | {f(c['cuda'])} | "
                   f"{f(c['triton_graph'])} | {f(c['cuda_graph'])} | {f(c['eager'])} | {f(c['compiled'])} | "
                   f"{f(c['torchdeq'])} | {ratio(c['eager'], c['triton'])} | {ratio(c['eager'], c['cuda'])} | "
                   f"{ratio(c['eager'], best)} | {ratio(c['compiled'], best)} | {tfl} | {floor} | {tf} | {mi} |")
    provs = ("triton", "cuda", "triton_graph", "cuda_graph")
    # a CPU dry run has torch / cpp in the columns of triton / cuda
    on_gpu = any(r.get("provider") == "triton" and r["kind"] == "dispatch" for r in rows)
    p1, p2 = ("triton", "cuda") if on_gpu else ("torch", "cpp")
    out += ["", "## Grouped dispatch (L=4 + NOP)", "",
            "t(NOP)/t(0): the time at this NOP fraction over the time at 0% NOP (same provider, actions, mode).", "",
            f"| H | B | actions | NOP | mode | {p1} ms | {p2} ms | triton graph ms | cuda graph ms | "
            f"per-layer loop ms | dense ms | loop/{p1} | loop/{p2} | dense/best | t(NOP)/t(0) {p1} | {p2} | "
            "triton graph | cuda graph |", "|" + "---|" * 18]
    seen = set()
    for r0 in rows:
        if r0["kind"] != "dispatch":
            continue
        q = dict(kind="dispatch", B=r0["B"], H=r0["H"], actions=r0["actions"], nop=r0["nop"], mode=r0["mode"])
        key = tuple(sorted(q.items()))
        if key in seen:
            continue
        seen.add(key)
        c = {p: get(provider=p, **q) for p in provs + ("torch", "cpp", "per_layer_loop", "dense")}
        base = {p: get(provider=p, **dict(q, nop=0.0)) for p in provs}
        cands = [c[p] for p in ("triton", "cuda", "torch", "cpp") if c[p]]
        best = min(cands, key=lambda r: r["ms"]) if cands else None
        rr = lambda r, t: f"{r['ms'] / t['ms']:.1f}x" if (r and t) else "-"
        base.update({p: get(provider=p, **dict(q, nop=0.0)) for p in ("torch", "cpp")})
        sv = lambda p: f"{c[p]['ms'] / base[p]['ms']:.2f}" if (c[p] and base[p]) else "-"
        tri = c["triton"] or c["torch"]
        cu = c["cuda"] or c["cpp"]
        out.append(f"| {r0['H']} | {r0['B']} | {r0['actions']} | {r0['nop']} | {r0['mode']} | {f(tri)} | {f(cu)} | "
                   f"{f(c['triton_graph'])} | {f(c['cuda_graph'])} | {f(c['per_layer_loop'])} | {f(c['dense'])} | "
                   f"{rr(c['per_layer_loop'], tri)} | {rr(c['per_layer_loop'], cu)} | {rr(c['dense'], best)} | "
                   f"{sv(p1)} | {sv(p2)} | {sv('triton_graph')} | {sv('cuda_graph')} |")
    errs = [r for r in rows if "error" in r]
    if errs:
        out += ["", "## Errors", ""] + [f"- {r['provider']} {r.get('B')}x{r.get('H')} {r.get('dtype', '')} "
                                         f"{r['mode']}: {r['error']}" for r in errs]
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a dry run of the script)")
    ap.add_argument("--only", choices=["fixed_point", "dispatch"], default=None)
    ap.add_argument("--B", type=int, nargs="*", help="batch sizes of the fixed-point table")
    ap.add_argument("--H", type=int, nargs="*", help="widths of the fixed-point table")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(args.out, exist_ok=True)
    device = torch.cuda.get_device_name(0) if dev == "cuda" else platform.processor() or "cpu"
    stamp = datetime.date.today().isoformat()
    tag = device.replace(" ", "-") + args.tag
    logf = open(os.path.join(args.out, f"gpu-bench-{tag}-{stamp}.log"), "a")

    def log(s):
        print(s, flush=True)
        logf.write(s + "\n")
        logf.flush()

    rows = []
    peaks = {}
    signal.signal(signal.SIGTERM, _stop)  # `timeout`: keep the rows measured so far
    try:
        if args.only in (None, "fixed_point"):
            peaks = run_fixed_point(args, dev, log, rows)
        if args.only in (None, "dispatch"):
            run_dispatch(args, dev, log, rows)
    except Stopped:
        log(f"stopped (SIGTERM) after {len(rows)} rows: writing those")
    cmd = "python " + " ".join(sys.argv)
    with open(os.path.join(args.out, f"gpu-bench-{tag}-{stamp}.json"), "w") as f:
        json.dump({"device": device, "peaks": peaks, "rows": rows, "command": cmd}, f, indent=1)
    md = table(rows, peaks, device, cmd)
    with open(os.path.join(args.out, f"{tag}-{stamp}.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
