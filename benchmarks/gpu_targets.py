"""The GPU targets of the issues, measured in one fresh process, providers interleaved.

Fixed point (issue "Fused GPU kernels"), B=8192, H=128, fp32, the problem of gpu_bench.py
(||W||_2 = 0.9, tol 1e-4, max 50): the fused forward against the eager loop (>= 10x) and the
compiled loop (>= 3x), forward+backward against eager (>= 5x), the forward against the floor.
Dispatch (issue "Batched dynamic layer dispatch"), B=4096, H=128, L=4: triton against the
per-layer loop (>= 3x) and the realised saving t(50% NOP)/t(0%) <= 0.6, t(90%)/t(0%) <= 0.2.

Why a separate script: these calls are CPU-bound (launches, Python, autograd), and their wall
time drifts between processes and within one (the full table in gpu_bench.py runs torch.compile
early, which changes the process: Triton's ptxas, compile workers).  Here every comparison is
made of ``--rounds`` rounds that time each provider once in turn (do_bench medians); the table
gives the median over rounds.  Phase 1 runs before anything is compiled; phase 2 adds the
compiled loop and torchdeq and re-times eager and the fused ops next to them, so each ratio is
taken within one phase.

``cuda_perop`` is the cuda backend without its two fused entry points (dynamic_step: projection
and solve on one routing; the one-call implicit backward): what DYNALAY_CUDA_FUSED=0 runs, timed
in the same process.  ``*_graph``: the same call captured in a CUDA graph (the GPU time).
Also a kernel count per call (torch.profiler) of the forward+backward cases.

Usage: python benchmarks/gpu_targets.py --out DIR [--rounds 5] [--quick (CPU dry run)]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import statistics
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dynalay  # noqa: E402
from dynalay import backends  # noqa: E402
from gpu_bench import (MAX_ITER, TOL, Stopped, _stop, bench, compiled_solve, dense,  # noqa: E402
                       dispatch_mixes, dispatch_problem, eager_solve, graphed, make_W, measure_peaks, mode_call,
                       per_layer_loop, torchdeq_solver)

FUSED_ATTRS = ("dynamic_step", "implicit_backward")


@contextlib.contextmanager
def per_op_cuda(be_name: str):
    """The backend without its fused entry points (the per-op path), for the duration."""
    be = backends.get(be_name)
    saved = {k: getattr(be, k) for k in FUSED_ATTRS if hasattr(be, k)}
    for k in saved:
        delattr(be, k)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(be, k, v)


def fp_call(p, inj, W, G, mode, names):
    """A zero-argument call of provider ``p`` (fixed point) in ``mode``; ``names`` maps the dynalay
    providers to backends (triton/cuda on a GPU, torch/cpp in a CPU dry run)."""
    if p in ("eager", "compiled", "torchdeq"):
        if p == "eager":
            solve = lambda i, w: eager_solve(i, w)[0]
        elif p == "compiled":
            solve = lambda i, w: compiled_solve(i, w)[0]
        else:
            deq = torchdeq_solver()
            solve = lambda i, w: deq(lambda z: torch.tanh(z @ w.t() + i), torch.zeros_like(i))[0][-1]
    else:
        be = names[p.replace("_graph", "")]

        def solve(i, w):
            return dynalay.fixed_point(i, w, tol=TOL, max_iter=MAX_ITER, backend=be, check="none").z
    return finish(p, mode_call(solve, (inj, W), G, mode), names)


def finish(p, call, names):
    """The call as provider ``p`` runs it: the per-op path for the whole call (forward and
    backward), captured in a CUDA graph for ``*_graph``."""
    if p.startswith("cuda_perop"):
        inner = call

        def call():
            with per_op_cuda(names["cuda_perop"]):
                return inner()
    return graphed(call) if p.endswith("_graph") else call


def step_call(p, h, a, U, W, b, G, mode, names, L):
    if p == "per_layer_loop":
        fn = lambda h_, U_, W_, b_: per_layer_loop(h_, a, U_, W_, b_, L)
    elif p == "dense":
        fn = lambda h_, U_, W_, b_: dense(h_, a, U_, W_, b_, L)
    else:
        be = names[p.replace("_graph", "")]

        def fn(h_, U_, W_, b_):
            return dynalay.dynamic_step(h_, a, U_, W_, b_, tol=TOL, max_iter=MAX_ITER, backend=be, check="none").h
    return finish(p, mode_call(fn, (h, U, W, b), G, mode), names)


def rounds(calls: dict, n: int, dev: str, log) -> dict:
    """``n`` rounds, each timing every call once in turn; {name: [ms per round]} (None: failed)."""
    times = {k: [] for k in calls}
    for _ in range(n):
        for k, c in calls.items():
            if c is None:
                continue
            try:
                times[k].append(bench(c, dev))
            except Exception as e:  # noqa: BLE001 - record and go on
                log(f"{k} failed: {type(e).__name__}: {str(e)[:300]}")
                calls[k] = None
    return times


def make_calls(provs, factory, log):
    calls = {}
    for p in provs:
        try:
            calls[p] = factory(p)
        except Exception as e:  # noqa: BLE001
            log(f"{p}: cannot set up: {type(e).__name__}: {str(e)[:300]}\n{traceback.format_exc()[-800:]}")
            calls[p] = None
    return calls


def kernels_per_call(call, dev, n=5) -> float:
    from torch.profiler import ProfilerActivity, profile
    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            call()
        torch.cuda.synchronize()
    kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(kern) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/gpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="CPU dry run at tiny shapes (torch/cpp stand in)")
    ap.add_argument("--no-compiled", action="store_true", help="skip phase 2 (compiled loop, torchdeq)")
    ap.add_argument("--saving-B", type=int, nargs="*", default=[],
                    help="extra batch sizes for the dispatch's realised saving (triton, graph), for information")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    gpu = dev == "cuda"
    names = ({"triton": "triton", "cuda": "cuda", "cuda_perop": "cuda"} if gpu else
             {"triton": "torch", "cuda": "cpp", "cuda_perop": "cpp"})
    os.makedirs(args.out, exist_ok=True)
    device = torch.cuda.get_device_name(0) if gpu else (platform.processor() or "cpu")
    logf = open(os.path.join(args.out, "targets.log"), "a")

    def log(s):
        print(s, flush=True)
        logf.write(s + "\n")
        logf.flush()

    cmd = "python " + " ".join(sys.argv)
    log(f"# {device} {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')} {cmd}")
    res = {"device": device, "command": cmd, "rounds": args.rounds, "fixed_point": {}, "dispatch": [],
           "kernels": {}}
    B, H = (8192, 128) if gpu else (64, 32)
    g = torch.Generator(device="cpu").manual_seed(B + H)
    inj = torch.randn(B, H, generator=g).to(dev)
    W = make_W(H, dev, torch.float32)
    G = torch.randn(B, H, generator=g).to(dev)
    with torch.no_grad():
        r = dynalay.fixed_point(inj, W, tol=TOL, max_iter=MAX_ITER, check="none",
                                backend=names["cuda"] if gpu else None)
    mean_iters = float(r.iters.float().mean())
    peaks = measure_peaks(dev)
    res.update(B=B, H=H, mean_iters=mean_iters, peaks=peaks,
               floor_ms=mean_iters * B * 2 * H * H / (peaks["fp32"] * 1e12) * 1e3)
    log(f"mean iters {mean_iters:.2f}, fp32 peak {peaks['fp32']:.1f} TFLOP/s, floor {res['floor_ms']:.4f} ms")

    signal.signal(signal.SIGTERM, _stop)  # `timeout`: write what was measured
    try:
        measure(args, res, dev, gpu, names, inj, W, G, log)
    except Stopped:
        log("stopped (SIGTERM): writing what was measured")
    with open(os.path.join(args.out, "targets.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = report(res, gpu)
    with open(os.path.join(args.out, "targets.md"), "w") as f:
        f.write(md)
    print(md)


def measure(args, res, dev, gpu, names, inj, W, G, log):
    # ---- phase 1: nothing compiled yet ---------------------------------------------------------
    p1 = ["eager", "triton", "cuda", "cuda_perop"] + (["triton_graph", "cuda_graph"] if gpu else [])
    for mode in ("fwd", "fwdbwd"):
        calls = make_calls(p1, lambda p: fp_call(p, inj, W, G, mode, names), log)
        t = rounds(calls, args.rounds, dev, log)
        res["fixed_point"][f"phase1/{mode}"] = t
        log(f"fixed point phase 1 {mode}: " + json.dumps({k: [round(x, 4) for x in v] for k, v in t.items()}))
        if gpu and mode == "fwdbwd":
            for p in ("triton", "cuda", "cuda_perop"):
                if calls.get(p) is not None:
                    res["kernels"][f"fixed_point {p} fwdbwd"] = kernels_per_call(calls[p], dev)

    L, Bs, Hs = 4, (4096 if gpu else 128), (128 if gpu else 32)
    pd = ["triton", "cuda", "cuda_perop"] + (["triton_graph", "cuda_graph"] if gpu else []) + \
        ["per_layer_loop", "dense"]
    for Bd in [Bs] + list(args.saving_B):
        (h, U, Wd, bd), Gd, gd = dispatch_problem(Bd, Hs, L, dev)
        provs = pd if Bd == Bs else ["triton", "triton_graph", "per_layer_loop"]
        for skew, nop, a in dispatch_mixes(Bd, L, gd, dev):
            for mode in ("fwd", "fwdbwd"):
                calls = make_calls(provs, lambda p: step_call(p, h, a, U, Wd, bd, Gd, mode, names, L), log)
                t = rounds(calls, max(1, args.rounds - 2), dev, log)
                rec = dict(B=Bd, H=Hs, L=L, actions=skew, nop=nop, mode=mode, times=t)
                res["dispatch"].append(rec)
                log("dispatch " + json.dumps({k: v for k, v in rec.items() if k != "times"}) + " " +
                    json.dumps({k: [round(x, 4) for x in v] for k, v in t.items()}))
                if gpu and mode == "fwdbwd" and skew == "uniform" and nop == 0.0 and Bd == Bs:
                    for p in ("triton", "cuda", "cuda_perop"):
                        if calls.get(p) is not None:
                            res["kernels"][f"dynamic_step {p} fwdbwd"] = kernels_per_call(calls[p], dev)

    # ---- phase 2: the compiled loop and torchdeq, with eager and the fused ops re-timed ----------
    if not args.no_compiled:
        p2 = ["eager", "compiled", "torchdeq", "triton", "cuda"]
        for mode in ("fwd", "fwdbwd"):
            calls = make_calls(p2, lambda p: fp_call(p, inj, W, G, mode, names), log)
            for p, c in calls.items():  # compile (and import torchdeq) outside the timed rounds
                if c is not None:
                    try:
                        c()
                    except Exception as e:  # noqa: BLE001
                        log(f"{p} failed: {type(e).__name__}: {str(e)[:300]}")
                        calls[p] = None
            t = rounds(calls, args.rounds, dev, log)
            res["fixed_point"][f"phase2/{mode}"] = t
            log(f"fixed point phase 2 {mode}: " + json.dumps({k: [round(x, 4) for x in v] for k, v in t.items()}))


def med(v):
    return statistics.median(v) if v else None


def report(res, gpu) -> str:
    fp = res["fixed_point"]
    m = lambda ph, mode, p: med(fp.get(f"{ph}/{mode}", {}).get(p, []))
    fmt = lambda x: "-" if x is None else f"{x:.3f}"
    out = [f"# dynalay GPU targets: {res['device']}", "",
           f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
           f"- command: `{res['command']}`",
           f"- torch {torch.__version__}, python {platform.python_version()}",
           f"- times: median over {res['rounds']} interleaved rounds of do_bench medians (ms)", "",
           f"## Fixed point, B={res['B']}, H={res['H']}, fp32 (mean iterations {res['mean_iters']:.2f}; "
           f"floor {res['floor_ms']:.4f} ms at fp32 peak {res['peaks']['fp32']:.1f} TFLOP/s)", "",
           "| phase | mode | provider | ms (median) | rounds |", "|---|---|---|---|---|"]
    for key, t in fp.items():
        ph, mode = key.split("/")
        for p, v in t.items():
            out.append(f"| {ph} | {mode} | {p} | {fmt(med(v))} | {', '.join(f'{x:.3f}' for x in v)} |")
    out += ["", "### Targets", "", "| target | measured | verdict |", "|---|---|---|"]

    def target(name, goal, ph, mode, num_p, den_p):
        a, b = m(ph, mode, num_p), m(ph, mode, den_p)
        if a is None or b is None:
            out.append(f"| {name} | not measured | - |")
            return
        r = a / b
        out.append(f"| {name} | {den_p} {b:.3f} ms vs {num_p} {a:.3f} ms ({ph}): **{r:.1f}x** | "
                   f"{'met' if r >= goal else 'not met'} |")

    for be in ("cuda", "triton"):
        target(f"{be} forward >= 10x eager", 10, "phase1", "fwd", "eager", be)
        target(f"{be} forward >= 3x compiled", 3, "phase2", "fwd", "compiled", be)
        target(f"{be} forward+backward >= 5x eager", 5, "phase1", "fwdbwd", "eager", be)
        f = m("phase1", "fwd", be)
        if f is not None:
            r = f / res["floor_ms"]
            out.append(f"| {be} forward within 3x of the floor | {f:.3f} ms / {res['floor_ms']:.4f} ms: **{r:.1f}x** | "
                       f"{'met' if r <= 3 else 'not met'} |")
    target("cuda forward+backward >= 5x eager (phase 2)", 5, "phase2", "fwdbwd", "eager", "cuda")
    if res["kernels"]:
        out += ["", "Kernels per call (torch.profiler): " +
                ", ".join(f"{k} {v:.0f}" for k, v in res["kernels"].items())]
    out += ["", "## Dispatch (L=4 + NOP)", "",
            "loop/x: the per-layer loop's time over x's; t/t0: the time at this NOP fraction over the time at 0% "
            "NOP (same provider, actions, mode, batch).", "",
            "| B | actions | NOP | mode | triton | cuda | cuda_perop | triton graph | cuda graph | per-layer loop | "
            "dense | loop/triton | loop/cuda | t/t0 triton | t/t0 cuda | t/t0 triton graph | t/t0 cuda graph |",
            "|" + "---|" * 17]
    base = {}
    for rec in res["dispatch"]:
        k0 = (rec["B"], rec["actions"], rec["mode"])
        meds = {p: med(v) for p, v in rec["times"].items()}
        if rec["nop"] == 0.0:
            base[k0] = meds
        b0 = base.get(k0, {})
        ratio = lambda x, y: "-" if (x is None or y is None) else f"{x / y:.1f}x"
        sav = lambda p: "-" if (meds.get(p) is None or b0.get(p) is None) else f"{meds[p] / b0[p]:.2f}"
        g = lambda p: fmt(meds.get(p))
        out.append(f"| {rec['B']} | {rec['actions']} | {rec['nop']} | {rec['mode']} | {g('triton')} | {g('cuda')} | "
                   f"{g('cuda_perop')} | {g('triton_graph')} | {g('cuda_graph')} | {g('per_layer_loop')} | "
                   f"{g('dense')} | {ratio(meds.get('per_layer_loop'), meds.get('triton'))} | "
                   f"{ratio(meds.get('per_layer_loop'), meds.get('cuda'))} | {sav('triton')} | {sav('cuda')} | "
                   f"{sav('triton_graph')} | {sav('cuda_graph')} |")
    if not gpu:
        out += ["", "(CPU dry run: torch and cpp stand in for triton and cuda.)"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
