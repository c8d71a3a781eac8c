"""Launch-configuration sweep of the Triton solve kernels and a profile of forward+backward
(GPU).  Prints the timings and the best configuration, and writes env assignments
(DYNALAY_TRITON_FAST_CONFIG / DYNALAY_TRITON_TILED_CONFIG) to --env-out for the next stages.
Usage: python benchmarks/gpu_tune.py --out DIR --env-out FILE"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dynalay  # noqa: E402
from dynalay.backends import triton as tb  # noqa: E402


def bench(fn):
    import triton.testing
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def problem(B, H, dtype=torch.float32):
    g = torch.Generator().manual_seed(B + H)
    W = torch.randn(H, H, generator=g, dtype=torch.float64)
    W = 0.9 * W / torch.linalg.matrix_norm(W, 2)
    return torch.randn(B, H, generator=g).to("cuda", dtype), W.to("cuda", dtype)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--env-out", default="/tmp/dynalay_tuned.env")
    args = ap.parse_args()
    res = {"fast": {}, "tiled": {}}
    ref = {}
    for (B, H) in ((8192, 64), (65536, 64), (8192, 128), (65536, 128)):
        inj, W = problem(B, H)
        ref[(B, H)] = dynalay.fixed_point(inj, W, backend="torch", check="none")
        for cfg in ((16, 4), (16, 8), (32, 4), (32, 8), (64, 4), (64, 8)):
            tb.set_solve_config(fast=cfg)
            try:
                r = dynalay.fixed_point(inj, W, backend="triton", check="none")
                ok = bool((r.z - ref[(B, H)].z).abs().max() < 1e-4)
                ms = bench(lambda: dynalay.fixed_point(inj, W, backend="triton", check="none"))
                res["fast"][f"{B}x{H} BM={cfg[0]} w={cfg[1]}"] = (ms, ok)
                print(f"fast {B}x{H} BM={cfg[0]} warps={cfg[1]}: {ms:.3f} ms ok={ok}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"fast {B}x{H} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    for (B, H) in ((8192, 256), (8192, 512)):
        inj, W = problem(B, H)
        rr = dynalay.fixed_point(inj, W, backend="torch", check="none")
        for cfg in ((32, 64, 4), (64, 64, 4), (64, 64, 8), (32, 32, 4), (128, 64, 8), (64, 32, 4)):
            tb.set_solve_config(tiled=cfg)
            try:
                r = dynalay.fixed_point(inj, W, backend="triton", check="none")
                ok = bool((r.z - rr.z).abs().max() < 1e-4)
                ms = bench(lambda: dynalay.fixed_point(inj, W, backend="triton", check="none"))
                res["tiled"][f"{B}x{H} BM={cfg[0]} BN={cfg[1]} w={cfg[2]}"] = (ms, ok)
                print(f"tiled {B}x{H} {cfg}: {ms:.3f} ms ok={ok}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"tiled {B}x{H} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    tb.set_solve_config()

    def best(prefix_list, kind, cfgs):
        tot = {}
        for c in cfgs:
            ts = []
            for p in prefix_list:
                key = [k for k in res[kind] if k.startswith(p + " ") and k.endswith(c)]
                if not key or not res[kind][key[0]][1]:
                    ts = None
                    break
                ts.append(res[kind][key[0]][0])
            if ts:
                tot[c] = sum(t / res[kind][[k for k in res[kind] if k.startswith(p + " ")][0]][0]
                             for t, p in zip(ts, prefix_list))
        return min(tot, key=tot.get) if tot else None

    try:
        env = choose(best, res)
    except Exception as e:  # noqa: BLE001 - keep the defaults
        print(f"choosing a configuration failed ({e}); keeping the defaults", flush=True)
        env = []
    with open(args.env_out, "w") as f:
        f.write("\n".join(env) + "\n")
    print("chosen:", env, flush=True)
    try:
        profile_fwdbwd(args)
    except Exception as e:  # noqa: BLE001
        print(f"profile failed: {e}", flush=True)


def choose(best, res):
    b64 = best(["8192x64", "65536x64"], "fast", [f"BM={a} w={b}" for a, b in ((16, 4), (16, 8), (32, 4), (32, 8),
                                                                             (64, 4), (64, 8))])
    b128 = best(["8192x128", "65536x128"], "fast", [f"BM={a} w={b}" for a, b in ((16, 4), (16, 8), (32, 4), (32, 8),
                                                                               (64, 4), (64, 8))])
    bt = best(["8192x256", "8192x512"], "tiled", [f"BM={a} BN={b} w={c}" for a, b, c in (
        (32, 64, 4), (64, 64, 4), (64, 64, 8), (32, 32, 4), (128, 64, 8), (64, 32, 4))])
    num = lambda s: [int(x.split("=")[1]) for x in s.split()]
    env = []
    if b64 and b128:
        f64, f128 = num(b64), num(b128)
        env.append(f'export DYNALAY_TRITON_FAST_CONFIG="64:{f64[0]},{f64[1]};128:{f128[0]},{f128[1]}"')
    if bt:
        t = num(bt)
        env.append(f'export DYNALAY_TRITON_TILED_CONFIG="{t[0]},{t[1]},{t[2]}"')
    return env


def profile_fwdbwd(args):
    """Profile of forward+backward at the issue's shape (where does the time go?)."""
    inj, W = problem(8192, 128)
    G = torch.randn_like(inj)

    def fb():
        i_, W_ = inj.detach().requires_grad_(), W.detach().requires_grad_()
        (dynalay.fixed_point(i_, W_, backend="triton", check="none").z * G).sum().backward()

    for _ in range(3):
        fb()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fb()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    print(table)


if __name__ == "__main__":
    main()
