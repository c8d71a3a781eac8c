"""Curves of a run's checkpoints on a *development* set: fresh MNIST-1D samples generated with
another seed (``mnist1d.data.make_dataset``, seed 1234, 8000 samples), never the test split.

Sessions 9 and 12 chose the agent's training settings and the default knob on this set (see
``benchmarks/results/model/results.md``; ``agent_refit_dev.py`` refits agents with other settings on
a run's backbones and prints the same table).  Usage::

    python benchmarks/model_dev_curves.py RUN_FOLDER [--seeds 0 1 2] [--lams ...] [--nop-bias 0 -0.5 -1]

Prints, for a grid of lambdas (``--lams``; ``--nop-bias`` also sweeps the NOP-logit bias), the mean over seeds of the accuracy, the gap to ``static``, the
FLOP ratio and the margins to the ``early_exit`` and ``truncation`` curves at matched FLOPs.
"""
import argparse
import os

import numpy as np
import torch

from dynalay.train.cli import load_trained
from dynalay.train.report import envelope_interp

LAMS = [0.002, 0.003, 0.005, 0.007, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0]
THRESHOLDS = [0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.01]


def dev_set(n: int = 8000, seed: int = 1234):
    from mnist1d.data import get_dataset_args, make_dataset

    a = get_dataset_args()
    a.seed, a.num_samples = seed, n
    d = make_dataset(a)  # generated locally (never mnist1d.get_dataset, which downloads)
    x = np.concatenate([d["x"], d["x_test"]]).astype(np.float32)
    y = np.concatenate([d["y"], d["y_test"]]).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def standardise(x_raw, data):
    """``x_raw`` with the run's training statistics (constant features left unscaled), as the run
    standardised its own splits."""
    return (x_raw - data.mean) / torch.where(data.std > 1e-6, data.std, torch.ones_like(data.std))


def collect(m, data, x_raw, y, res, lams=LAMS, nop_biases=(0.0,)) -> None:
    """Append the (accuracy, FLOPs) of ``m`` (static, every lambda and NOP-logit bias, early exit,
    truncation) on the dev set, standardised with the run's statistics, to ``res``."""
    x = standardise(x_raw, data)
    m.eval()
    W = m.inference_weight()

    def point(o):
        return float((o.logits.argmax(1) == y).double().mean()), float(o.flops.mean())

    with torch.inference_mode():
        res.setdefault("static", []).append(point(m.run_static(x, W=W)))
        for lam in lams:
            for nb in nop_biases:
                res.setdefault(("lam", lam, nb), []).append(point(m.run(x, lam=lam, nop_bias=nb, W=W)))
        for th in THRESHOLDS:
            res.setdefault(("ee", th), []).append(point(m.run_static(x, exit_threshold=th, W=W)))
        for k in range(m.cfg.max_steps + 1):
            res.setdefault(("tr", k), []).append(point(m.run_static(x, steps=k, W=W)))


def table(res, lams=LAMS, nop_biases=(0.0,)) -> str:
    """The mean over seeds of ``res`` as a table (margins in points)."""
    mean = {k: np.mean(v, 0) for k, v in res.items()}
    st_acc, st_fl = mean["static"]
    ee, tr = ([dict(accuracy=v[0], flops_per_sample=v[1]) for k, v in mean.items()
               if isinstance(k, tuple) and k[0] == kind] for kind in ("ee", "tr"))
    out = [f"static {st_acc * 100:.2f}% at {st_fl / 1e6:.3f} MFLOPs",
           "lambda   " + ("nop_bias  " if len(nop_biases) > 1 else "")
           + "accuracy  gap_vs_static  flops_vs_static  vs_early_exit  vs_truncation"]
    for lam in lams:
        for nb in nop_biases:
            a, f = mean[("lam", lam, nb)]
            e, t = envelope_interp(ee, f), envelope_interp(tr, f)
            fmt = lambda v: "" if v is None else f"{(a - v) * 100:+.2f}"  # noqa: E731
            out.append(f"{lam:<8} " + (f"{nb:<9} " if len(nop_biases) > 1 else "")
                       + f"{a * 100:8.2f}  {(a - st_acc) * 100:+13.2f}  {f / st_fl:15.3f}  {fmt(e):>13}  {fmt(t):>13}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lams", type=float, nargs="+", default=LAMS)
    ap.add_argument("--nop-bias", type=float, nargs="+", default=[0.0],
                    help="also sweep the NOP-logit bias (the second inference knob) at every lambda")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    x_raw, y = dev_set()
    res = {}
    for seed in args.seeds:
        cfg, data, m, mlp, ck = load_trained(os.path.join(args.run, f"seed{seed}", "checkpoint.pt"))
        collect(m, data, x_raw, y, res, args.lams, args.nop_bias)
    print(f"dev set: {len(y)} generated MNIST-1D samples; seeds {args.seeds}; "
          + table(res, args.lams, args.nop_bias))


if __name__ == "__main__":
    main()
