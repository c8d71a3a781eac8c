"""Refit a fresh agent on a run's final backbones with other training settings, and print its
curve on the development set (``model_dev_curves.py``: generated MNIST-1D, never the test split).

This is how sessions 9 and 12 compared agent settings without reading the test split: the
backbone (encoder, FPI pool, head) of each seed's checkpoint is kept, the agent is re-initialised
and trained by the run's ``refit`` phase with ``TrainConfig`` overrides, then evaluated.  Usage::

    python benchmarks/agent_refit_dev.py RUN_FOLDER [KEY=VALUE ...] [--seeds 0 1 2] [--dev-agent-data]

``KEY`` is a ``TrainConfig`` field (e.g. ``agent_conf=prob``, ``agent_lr_decay=none``,
``refit_epochs=600``, ``entropy_beta=0.1``) or a ``RewardConfig`` field (``mu_stale=0``).  A refit
of 300 epochs takes about 20 s per seed on 2 cores.

``--dev-agent-data`` (a diagnostic outside the run's data budget): the agent trains on the first
4000 development samples (5x ``val``) in place of ``val`` and is evaluated on the other 4000
(about 100 s per seed).
"""
import argparse
import dataclasses
import os
import time

import torch

from dynalay.train.checkpoint import load_checkpoint
from dynalay.train.data import Split, load_data
from dynalay.train.trainer import PHASES, TrainConfig, Trainer, _gen
from model_dev_curves import LAMS, collect, dev_set, standardise, table


def _config(seed: int, overrides) -> TrainConfig:
    base = TrainConfig(seed=seed)
    kw, rkw = {}, {}
    for item in overrides:
        k, v = item.split("=", 1)
        if hasattr(base, k):
            kw[k] = type(getattr(base, k))(v)
        elif hasattr(base.reward, k):
            rkw[k] = type(getattr(base.reward, k))(v)
        else:
            raise SystemExit(f"{k!r} is neither a TrainConfig nor a RewardConfig field")
    return dataclasses.replace(base, **kw, reward=dataclasses.replace(base.reward, **rkw)).validate()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--dev-agent-data", action="store_true",
                    help="train the agent on dev[:4000] instead of val, evaluate on dev[4000:]")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    x_raw, y = dev_set()
    lams = LAMS
    if args.dev_agent_data:
        lams = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
        agent_x, agent_y, x_raw, y = x_raw[:4000], y[:4000], x_raw[4000:], y[4000:]
    res, t0 = {}, time.perf_counter()
    refit = PHASES.index("refit")
    for seed in args.seeds:
        cfg = _config(seed, args.overrides)
        data = load_data("mnist1d", cfg.val_fraction, split_seed=seed)
        if args.dev_agent_data:
            data.val = Split(standardise(agent_x, data).float(), agent_y)
        tr = Trainer(cfg, data, None, progress=False, log=lambda *a: None)
        ck = load_checkpoint(os.path.join(args.run, f"seed{seed}", "checkpoint.pt"))
        backbone = {k: v for k, v in ck["state"]["model"].items() if not k.startswith(("policy.", "value."))}
        tr.model.load_state_dict(backbone, strict=False)
        spe = tr.plan()[refit][2]
        for e in range(cfg.refit_epochs):  # the refit phase as Trainer.fit runs it
            torch.manual_seed(_gen(seed, refit, e, 1).initial_seed())
            tr._run_epoch("refit", e, spe, _gen(seed, refit, e, 2), _gen(seed, refit, e, 3), 1, None)
        tr._end_agent_phase()
        collect(tr.model, data, x_raw, y, res, lams)
    print(f"refit {' '.join(args.overrides) or '(run defaults)'} on {args.run}, seeds {args.seeds}, "
          f"{time.perf_counter() - t0:.0f} s" + (", agent on dev[:4000], evaluated on dev[4000:]"
                                                   if args.dev_agent_data else "") + "; dev " + table(res, lams))


if __name__ == "__main__":
    main()
