"""How far above early exit can *any* confidence stopping rule get, out of sample?  A diagnostic on
the development set (generated MNIST-1D, ``model_dev_curves.dev_set``; never the test split).

Early exit stops a sample at the first state whose max probability reaches one threshold ``p``.
A richer rule has one threshold per step, ``p_0 .. p_{T-1}`` (the agent can represent it: it sees
the confidence and the step).  This script fits such a rule on one half of the dev set (all
``len(GRID) ** T`` threshold vectors, the most accurate one within a FLOP budget) and measures it on
the other half against early exit's curve there, at matched FLOPs.  It also fits the rule on the
first 800 samples only: what the run's ``val`` split (800 samples) can support.

The FLOPs of a stop at depth ``k`` are those of the static model truncated after ``k`` layers, for
every rule alike (early exit's per-step head evaluations are a few kFLOPs of ~800k per layer).
Usage::

    python benchmarks/stop_rule_ceiling.py RUN_FOLDER [--seeds 0 1 2] [--budgets 0.45 0.5 0.55 0.6]
"""
import argparse
import itertools
import os

import numpy as np
import torch

from dynalay.train.cli import load_trained
from dynalay.train.report import envelope_interp
from model_dev_curves import dev_set, standardise

GRID = [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99, 1.01]


def depth_table(m, x, y):
    """Per sample and depth k = 0..T: correct (n, T+1), max probability (n, T+1), FLOPs (n, T+1)."""
    W = m.inference_weight()
    cor, conf, fl = [], [], []
    with torch.inference_mode():
        for k in range(m.cfg.max_steps + 1):
            o = m.run_static(x, steps=k, W=W)
            cor.append(o.logits.argmax(1) == y)
            conf.append(o.logits.softmax(1).max(1).values)
            fl.append(o.flops)
    return (torch.stack(cor, 1).double().numpy(), torch.stack(conf, 1).double().numpy(),
            torch.stack(fl, 1).double().numpy())


def apply_rules(cor, conf, fl, ths, batch: int = 1024):
    """Accuracy and mean FLOPs of every threshold vector (rows of ``ths``, (K, T)), ``batch`` rules
    at a time (memory: ``batch x n`` stop depths)."""
    K, T = ths.shape
    rows = np.arange(cor.shape[0])[None, :]
    acc, f = np.empty(K), np.empty(K)
    for r0 in range(0, K, batch):
        th = ths[r0:r0 + batch]
        stop = np.full((th.shape[0], cor.shape[0]), T, dtype=np.int8)
        done = np.zeros(stop.shape, dtype=bool)
        for k in range(T):
            s = ~done & (conf[None, :, k] >= th[:, k:k + 1])
            stop[s] = k
            done |= s
        acc[r0:r0 + batch] = cor[rows, stop].mean(1)
        f[r0:r0 + batch] = fl[rows, stop].mean(1)
    return acc, f


def envelope(f_pts, a_pts, f):
    """Early exit's accuracy at FLOPs ``f``: the report's upper envelope (``envelope_interp``),
    held at its end values outside the curve's FLOP range."""
    pts = [dict(flops_per_sample=float(fx), accuracy=float(ac)) for fx, ac in zip(f_pts, a_pts)]
    return envelope_interp(pts, min(max(float(f), float(np.min(f_pts))), float(np.max(f_pts))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.45, 0.5, 0.55, 0.6])
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    x_raw, y = dev_set()
    half = len(y) // 2
    rows = {b: [] for b in args.budgets}
    for seed in args.seeds:
        cfg, data, m, _, _ = load_trained(os.path.join(args.run, f"seed{seed}", "checkpoint.pt"))
        m.eval()
        x = standardise(x_raw, data)
        cor, conf, fl = depth_table(m, x, y)
        T = m.cfg.max_steps
        if len(GRID) ** T > 3_000_000:
            raise SystemExit(f"{len(GRID)}^{T} threshold vectors is too many for an exhaustive fit (max_steps={T})")
        rules = np.array(list(itertools.product(GRID, repeat=T)))
        single = np.repeat(np.linspace(0.3, 1.01, 301)[:, None], T, 1)
        st_fl = fl[:, T].mean()
        A, B, S = slice(0, half), slice(half, None), slice(0, 800)
        aB, fB = apply_rules(cor[B], conf[B], fl[B], rules)
        eB_a, eB_f = apply_rules(cor[B], conf[B], fl[B], single)
        for fit, name in ((A, "half"), (S, "800")):
            aF, fF = apply_rules(cor[fit], conf[fit], fl[fit], rules)
            eF_a, eF_f = apply_rules(cor[fit], conf[fit], fl[fit], single)
            for b in args.budgets:
                i = int(np.argmax(np.where(fF <= b * st_fl, aF, -1.0)))
                rows[b].append(dict(seed=seed, fit=name, rule=rules[i], in_sample=(aF[i] - envelope(eF_f, eF_a, fF[i])) * 100,
                                    held_out=(aB[i] - envelope(eB_f, eB_a, fB[i])) * 100, flops=fB[i] / st_fl))
    print(f"dev set: {len(y)} generated MNIST-1D samples; per-step thresholds fitted on dev[:{half}] ('half') or "
          f"dev[:800] ('800'), the best within the FLOP budget, measured on dev[{half}:] against early exit "
          f"there at matched FLOPs (pt)")
    print("budget  fit   seed  thresholds per step          FLOPs   in-sample  held-out")
    for b, rs in rows.items():
        for r in rs:
            print(f"{b:<7} {r['fit']:<5} {r['seed']:<5} {str(np.round(r['rule'], 2)):<28} {r['flops']:.3f}x  "
                  f"{r['in_sample']:+8.2f}  {r['held_out']:+8.2f}")
        for name in ("half", "800"):
            ho = [r["held_out"] for r in rs if r["fit"] == name]
            ins = [r["in_sample"] for r in rs if r["fit"] == name]
            print(f"{b:<7} {name:<5} mean{'':30}         {np.mean(ins):+8.2f}  {np.mean(ho):+8.2f}")


if __name__ == "__main__":
    main()
