"""Interleaved CPU timing of the issue-2 and issue-4 ratios (the anchors' method: in each round every provider
runs a short back-to-back batch, whose median is that round's time; providers alternate round by
round in one process, so the drift of a noisy VM affects them alike; the result is the median over
rounds).  Prints medians and ratios; writes JSON to --out.
Usage: python benchmarks/interleaved.py [--suite fixed_point|dispatch|all] --out benchmarks/results/cpu-interleaved-<date>.json"""
import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402  (sets TRITON_INTERPRET before dynalay is imported)
import dynalay  # noqa: E402


def interleave(fns, rounds, batch):
    """Median over rounds of each provider's per-round median of `batch` back-to-back calls."""
    times = {k: [] for k in fns}
    for f in fns.values():
        for _ in range(3):
            f()
    for _ in range(rounds):
        for k, f in fns.items():
            f()  # wake the thread pool after the previous provider
            b = []
            for _ in range(batch):
                t = time.perf_counter()
                f()
                b.append((time.perf_counter() - t) * 1e3)
            times[k].append(statistics.median(b))
    return {k: statistics.median(v) for k, v in times.items()}


def dispatch_suite(args):
    """Issue 4 at B=4096, H=128, L=4: dynalay_cpp against the per-layer loop (bench_dispatch's
    providers and problem), every NOP fraction, uniform and skewed, fwd and fwdbwd."""
    import bench_dispatch as bd
    res = {}
    for mode in bd.MODES:
        for dist in bd.DISTS:
            fns = {}
            for nop in bd.NOPS:
                for prov in ("dynalay_cpp", "per_layer_loop"):
                    fns[f"{prov}@{nop}"] = bd.make_runner(prov, 4096, 128, nop, dist, mode)
            med = interleave(fns, args.rounds, args.batch)
            for nop in bd.NOPS:
                d, p = med[f"dynalay_cpp@{nop}"], med[f"per_layer_loop@{nop}"]
                key = f"B=4096 H=128 nop={nop} {dist} {mode}"
                res[key] = {"median_ms": {"dynalay_cpp": d, "per_layer_loop": p},
                            "ratios": {"speed-up vs per_layer_loop": p / d,
                                       "saving t(nop)/t(nop 0)": d / med["dynalay_cpp@0.0"]}}
                print(f"{key}: dynalay_cpp {d:.2f} ms, per_layer_loop {p:.2f} ms, speed-up {p / d:.2f}, "
                      f"saving {d / med['dynalay_cpp@0.0']:.2f}", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--suite", choices=("fixed_point", "dispatch", "all"), default="all")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=7, help="back-to-back calls per provider per round")
    args = ap.parse_args()
    torch.set_num_threads(2)
    res = {}
    if args.suite in ("fixed_point", "all"):
        res["fixed_point"] = fixed_point_suite(args)
    if args.suite in ("dispatch", "all"):
        res["dispatch"] = dispatch_suite(args)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "threads": 2, "rounds": args.rounds, "batch": args.batch, "backend": "auto (cpp)",
            "cpu": benchlib.device_name(), "command": "python " + " ".join(sys.argv)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": res}, f, indent=1)


def fixed_point_suite(args):
    """Issue 2: dynalay (auto backend) against the eager loop and torchdeq, fwd and fwd+bwd."""
    from torchdeq import get_deq
    res = {}
    for B, H in ((64, 64), (512, 256)):
        g = torch.Generator().manual_seed(0)
        W = torch.randn(H, H, generator=g, dtype=torch.float64)
        W = (0.9 * W / torch.linalg.matrix_norm(W, 2)).float()
        inj = torch.randn(B, H, generator=g)
        G = torch.randn(B, H, generator=g)
        deq = get_deq(f_solver="fixed_point_iter", f_max_iter=50, f_tol=1e-4, f_stop_mode="rel", ift=True,
                      b_solver="fixed_point_iter", b_max_iter=50, b_tol=1e-4, b_stop_mode="rel")

        def dyn_fwd():
            with torch.no_grad():
                dynalay.fixed_point(inj, W)

        def dyn_fb():
            i_, W_ = inj.clone().requires_grad_(), W.clone().requires_grad_()
            (dynalay.fixed_point(i_, W_).z * G).sum().backward()

        def eager_fwd():
            with torch.no_grad():
                z = torch.zeros_like(inj)
                for _ in range(50):
                    fz = torch.tanh(z @ W.t() + inj)
                    r = (fz - z).norm(dim=1) / (fz.norm(dim=1) + 1e-12)
                    z = fz
                    if r.max().item() < 1e-4:
                        break

        def deq_fwd():
            deq.eval()
            with torch.no_grad():
                deq(lambda z: torch.tanh(z @ W.t() + inj), torch.zeros_like(inj))

        def deq_fb():
            deq.train()
            i_, W_ = inj.clone().requires_grad_(), W.clone().requires_grad_()
            zs, _ = deq(lambda z: torch.tanh(z @ W_.t() + i_), torch.zeros_like(inj))
            (zs[-1] * G).sum().backward()

        fns = {"dynalay_fwd": dyn_fwd, "dynalay_fwdbwd": dyn_fb, "eager_fwd": eager_fwd, "torchdeq_fwd": deq_fwd,
               "torchdeq_fwdbwd": deq_fb}
        med = interleave(fns, args.rounds, args.batch)
        res[f"{B}x{H}"] = {"median_ms": med, "ratios": {
            "fwd: torchdeq / dynalay": med["torchdeq_fwd"] / med["dynalay_fwd"],
            "fwd: dynalay / eager": med["dynalay_fwd"] / med["eager_fwd"],
            "fwdbwd: torchdeq(IFT) / dynalay(implicit)": med["torchdeq_fwdbwd"] / med["dynalay_fwdbwd"]}}
        print(f"B={B} H={H}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items()))
        print("   " + ", ".join(f"{k} = {v:.2f}" for k, v in res[f'{B}x{H}']["ratios"].items()))
    return res

if __name__ == "__main__":
    main()
