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
from dynalay import backends  # noqa: E402
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
    ap.add_argument("--tiled", action="store_true", help="also sweep the tiled (H > 128) configurations")
    args = ap.parse_args()
    res = {"fast": {}, "tiled": {}}
    ref = {}
    for (B, H) in ((8192, 64), (8192, 128), (65536, 128)):
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
    for (B, H) in ((8192, 256), (8192, 512)) if args.tiled else ():
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
    if not backends.not_supported_reasons("cuda", "cuda", torch.float32):
        cuda_variants(env)
    with open(args.env_out, "w") as f:
        f.write("\n".join(env) + "\n")
    print("chosen:", env, flush=True)
    try:
        profile_fwdbwd(args)
    except Exception as e:  # noqa: BLE001
        print(f"profile failed: {e}", flush=True)


def choose(best, res):
    b64 = best(["8192x64"], "fast", [f"BM={a} w={b}" for a, b in ((16, 4), (16, 8), (32, 4), (32, 8),
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


CUDA_VARIANTS = ("block", "r8w8", "r4w8", "r8w4", "r16w4")


def cuda_one():
    """(In a subprocess, DYNALAY_CUDA_SOLVE set) time the cuda solve and check it against torch."""
    out = {}
    for (B, H, dt) in ((8192, 64, torch.float32), (8192, 128, torch.float32), (65536, 128, torch.float32),
                       (8192, 128, torch.bfloat16), (1000, 100, torch.float32)):
        inj, W = problem(B, H, dt)
        G = torch.randn_like(inj)
        key = f"{B}x{H} {str(dt).split('.')[-1]}"
        try:
            grads = {}
            for be in ("torch", "cuda"):
                i_, W_ = inj.detach().float().requires_grad_(), W.detach().float().requires_grad_()
                if be == "cuda":
                    i_ = inj.detach().requires_grad_()
                    W_ = W.detach().requires_grad_()
                r = dynalay.fixed_point(i_, W_, backend=be, check="none")
                (r.z.float() * G.float()).sum().backward()
                grads[be] = (r, i_.grad.float(), W_.grad.float())
            rt, rc = grads["torch"][0], grads["cuda"][0]
            tol = 1e-4 if dt == torch.float32 else 2e-2
            zerr = float((rt.z.float() - rc.z.float()).abs().max())
            it_eq = float((rt.iters == rc.iters).float().mean())
            gerr = max(float((grads["torch"][k] - grads["cuda"][k]).abs().max() / (grads["torch"][k].abs().max()
                                                                                  + 1e-12)) for k in (1, 2))
            ok = zerr < tol and gerr < (1e-3 if dt == torch.float32 else 5e-2) and (it_eq > 0.99 or dt != torch.float32)
            ms = bench(lambda: dynalay.fixed_point(inj, W, backend="cuda", check="none"))
            out[key] = dict(ms=ms, ok=ok, zerr=zerr, iters_equal=it_eq, grad_rel_err=gerr)
        except Exception as e:  # noqa: BLE001
            out[key] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
    print("CUDA_ONE " + json.dumps(out), flush=True)


def cuda_variants(env_lines):
    """Sweep the CUDA solve variants (DYNALAY_CUDA_SOLVE is read once per process: one subprocess
    each); choose the fastest that passes every check at B=8192/65536, H=128 and 64."""
    import subprocess
    res = {}
    for v in CUDA_VARIANTS:
        env = dict(os.environ, DYNALAY_CUDA_SOLVE=v)
        try:
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--cuda-one"], env=env,
                               capture_output=True, text=True, timeout=120)
            line = [ln for ln in r.stdout.splitlines() if ln.startswith("CUDA_ONE ")]
            res[v] = json.loads(line[0][9:]) if line else {"error": (r.stderr or r.stdout)[-500:]}
        except Exception as e:  # noqa: BLE001
            res[v] = {"error": str(e)[:300]}
        print(f"cuda variant {v}: {json.dumps(res[v])}", flush=True)
    score = {}
    for v, r in res.items():
        keys = [k for k in r if isinstance(r[k], dict)]
        if "error" in r or not keys or not all(r[k].get("ok") for k in keys):
            continue
        base = res.get("block", {})
        score[v] = sum(r[k]["ms"] / base[k]["ms"] if isinstance(base.get(k), dict) and "ms" in base[k] else r[k]["ms"]
                       for k in ("8192x64 float32", "8192x128 float32", "65536x128 float32"))
    if score:
        v = min(score, key=score.get)
        env_lines.append(f'export DYNALAY_CUDA_SOLVE="{v}"')
        print(f"cuda chosen: {v} (scores {json.dumps({k: round(x, 3) for k, x in score.items()})})", flush=True)
    return res


def profile_fwdbwd(args):
    """Where the time goes, per call: wall (do_bench), GPU kernel time and kernel count (profiler),
    adjoint iterations; fixed point 8192x128 and dynamic_step 4096x128 (L=4, uniform), fp32."""
    from torch.profiler import ProfilerActivity, profile
    stats = dynalay.ops.last_backward_stats
    inj, W = problem(8192, 128)
    G = torch.randn_like(inj)
    L, B, H = 4, 4096, 128
    g = torch.Generator().manual_seed(3)
    h = torch.randn(B, H, generator=g).cuda()
    U = (torch.randn(L, H, H, generator=g) / H ** 0.5).cuda()
    Wl = torch.randn(L, H, H, generator=g, dtype=torch.float64)
    Wl = (0.9 * Wl / torch.linalg.matrix_norm(Wl, 2)[:, None, None]).float().cuda()
    bb = (0.1 * torch.randn(L, H, generator=g)).cuda()
    Gh = torch.randn(B, H, generator=g).cuda()
    for be in ("triton", "cuda"):
        a0 = torch.randint(0, L, (B,), generator=g).cuda()
        cases = {
            "fp fwd": lambda: dynalay.fixed_point(inj, W, backend=be, check="none"),
            "fp fwdbwd": lambda: (dynalay.fixed_point(inj.detach().requires_grad_(), W.detach().requires_grad_(),
                                                      backend=be, check="none").z * G).sum().backward(),
            "step fwd": lambda: dynalay.dynamic_step(h, a0, U, Wl, bb, backend=be, check="none"),
            "step fwdbwd": lambda: (dynalay.dynamic_step(*[x.detach().requires_grad_() if i != 1 else x for i, x in
                                                           enumerate((h, a0, U, Wl, bb))], backend=be,
                                                         check="none").h * Gh).sum().backward(),
        }
        for name, fn in cases.items():
            try:
                if name.endswith("fwd"):
                    def call(fn=fn):
                        with torch.no_grad():
                            return fn()
                else:
                    call = fn
                ms = bench(call)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        call()
                    torch.cuda.synchronize()
                kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
                gpu_ms = sum(e.device_time for e in kern) / 5 / 1e3
                info = ""
                if name.endswith("fwdbwd") and stats:
                    it = stats["iters"].float()
                    conv = stats["converged"].float()
                    info = (f"adjoint iters mean {float(it.mean()):.1f} max {int(it.max())} "
                            f"converged {float(conv.mean()):.3f}")
                print(f"PROFILE {be:6s} {name:12s} wall {ms:.3f} ms  gpu {gpu_ms:.3f} ms  kernels/call "
                      f"{len(kern) / 5:.0f}  {info}", flush=True)
                if name in ("fp fwdbwd", "step fwdbwd"):
                    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"PROFILE {be} {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


PROBE_FAST = ((16, 4), (16, 8), (32, 8), (16, 16), (32, 16), (64, 16))
PROBE_TILED = ((32, 64, 4), (64, 64, 4), (64, 64, 8), (32, 128, 4), (64, 128, 8), (16, 128, 4))


def probe_one():
    """(In a subprocess) time the Triton solve at B=8192, H=64/128 fp32 for resident-W and forced
    tiled configurations with the ptxas this process was given (TRITON_PTXAS_PATH)."""
    out = {}
    for H in (64, 128):
        inj, W = problem(8192, H)
        ref = dynalay.fixed_point(inj, W, backend="torch", check="none")
        for kind, cfgs in (("fast", PROBE_FAST), ("tiled", PROBE_TILED)):
            for cfg in cfgs:
                tb.FAST_PATH_MAX_H = 128 if kind == "fast" else 8
                tb.set_solve_config(**{kind: cfg})
                key = f"{H} {kind} {cfg}"
                try:
                    r = dynalay.fixed_point(inj, W, backend="triton", check="none")
                    ok = bool((r.z - ref.z).abs().max() < 1e-4)
                    call = lambda: dynalay.fixed_point(inj, W, backend="triton", check="none")
                    out[key] = (round(bench(call), 4), ok)
                except Exception as e:  # noqa: BLE001
                    out[key] = (None, f"{type(e).__name__}: {str(e)[:120]}")
        tb.FAST_PATH_MAX_H = 128
        tb.set_solve_config()
    print("PROBE_ONE " + json.dumps(out), flush=True)


def probe_ptxas():
    """The same Triton kernels compiled by Triton's bundled ptxas and by torch's (which
    torch.compile installs in-process through TRITON_PTXAS_PATH), each in a fresh cache."""
    import subprocess
    import tempfile
    tp = os.path.join(os.path.dirname(torch.__file__), "bin", "ptxas")
    for name, path in (("triton", None), ("torch", tp if os.path.exists(tp) else None)):
        if name == "torch" and path is None:
            print("PROBE torch/bin/ptxas not found", flush=True)
            continue
        env = {k: v for k, v in os.environ.items() if k != "TRITON_PTXAS_PATH"}
        env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"tc_{name}_")
        if path:
            env["TRITON_PTXAS_PATH"] = path
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--probe-one"], env=env, capture_output=True,
                           text=True, timeout=300)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE_ONE ")]
        res = json.loads(line[0][10:]) if line else {"error": (r.stderr or r.stdout)[-800:]}
        for k, v in res.items():
            print(f"PROBE ptxas={name} {k}: {v}", flush=True)


if __name__ == "__main__":
    if "--cuda-one" in sys.argv:
        cuda_one()
    elif "--probe-one" in sys.argv:
        probe_one()
    elif "--probe" in sys.argv:
        probe_ptxas()
        try:
            profile_fwdbwd(None)
        except Exception as e:  # noqa: BLE001
            print(f"profile failed: {e}", flush=True)
    else:
        main()
