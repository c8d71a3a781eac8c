"""``dynalay train`` and ``dynalay eval`` (added to the ``dynalay`` command by ``add_commands``)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import List, Optional

from .reward import ACCURACY_TERMS
from .trainer import AGENT_METHODS, BASELINES, TrainConfig

DEFAULT_SEEDS = 3


def _batch_size(v: str):
    """A ``--latency-batches`` value: a batch size, or ``none`` (no sweep; so is the flag alone)."""
    if v.lower() == "none":
        return None
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a batch size or 'none' (got {v!r})") from None


def _latency_batches(values) -> Optional[List[int]]:
    """The parsed ``--latency-batches``: None (not given), [] (skip: the flag alone or ``none``)."""
    if values is None:
        return None
    if None in values and len(values) > 1:
        raise ValueError("--latency-batches: 'none' cannot be mixed with batch sizes")
    return [b for b in values if b is not None]


def add_commands(sub) -> None:
    t = sub.add_parser("train", help="train DynaLay and its baselines, evaluate, write a report",
                       description="Train DynaLay (FPI layer pool + agent) and the static / truncation / "
                                   "early-exit / MLP baselines on MNIST-1D (default) or digits; write a run "
                                   "folder with checkpoints, report.json, a plot and a table.")
    t.add_argument("--dataset", choices=("mnist1d", "digits"), default="mnist1d")
    t.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help=f"number of seeds (default {DEFAULT_SEEDS})")
    t.add_argument("--seed-base", type=int, default=0, help="first seed (seeds are base, base+1, ...)")
    t.add_argument("--out", default=None, help="run folder (default runs/<dataset>-<time>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoints")
    t.add_argument("--warmup-epochs", type=int, default=None)
    t.add_argument("--agent-epochs", type=int, default=None)
    t.add_argument("--joint-epochs", type=int, default=None)
    t.add_argument("--refit-epochs", type=int, default=None)
    t.add_argument("--mlp-epochs", type=int, default=None)
    t.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every phase's epochs (quick runs)")
    t.add_argument("--hidden", type=int, default=None)
    t.add_argument("--layers", type=int, default=None, help="FPI layers in the pool (L)")
    t.add_argument("--steps", type=int, default=None, help="decisions per sample (T)")
    t.add_argument("--max-iter", type=int, default=None)
    t.add_argument("--tol", type=float, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--lam", type=float, default=None, help="reward: price of compute (lambda)")
    t.add_argument("--agent-method", choices=AGENT_METHODS, default=None,
                   help="the agent's training: 'tree' (exact policy gradient over the enumerated decision tree, "
                        "default) or 'reinforce'")
    t.add_argument("--reward-accuracy", choices=ACCURACY_TERMS, default=None,
                   help="reward's accuracy term (default 'correct'; use 'prob' with --agent-method reinforce)")
    t.add_argument("--baseline", choices=BASELINES, default=None, help="REINFORCE baseline")
    t.add_argument("--knob", type=float, default=None,
                   help="default compute price lambda at inference, reported as 'dynalay' (default: calibrated "
                        "per seed on the val split, see --knob-flops)")
    t.add_argument("--knob-flops", type=float, default=None,
                   help=f"calibrate the default lambda to the most compute within this share of static's val "
                        f"FLOPs (default {TrainConfig.knob_flops}; ignored with --knob)")
    t.add_argument("--timing-repeats", type=int, default=None)
    t.add_argument("--latency-batches", type=_batch_size, nargs="*", default=None, metavar="B",
                   help="batch sizes of the wall-time sweep (default 1 8 32 128 256 1024; 'none' or the flag "
                        "alone: skip it)")
    t.add_argument("--no-timing", action="store_true",
                   help="skip every wall-clock measurement (the batch-256 timing and the sweep; no plot)")
    t.add_argument("--threads", type=int, default=None, help="torch threads (default: available CPUs / ranks)")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--config", default=None, help="JSON file of TrainConfig fields (overridden by flags)")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="re-evaluate a trained run (or one checkpoint) and print its table")
    e.add_argument("--checkpoint", required=True, help="a run folder (all seeds) or a checkpoint.pt")
    e.add_argument("--out", default=None,
                   help="where to write report.json, the plot and the table (default: an eval/ folder next to "
                        "the checkpoint)")
    e.add_argument("--knob", type=float, default=None, help="default lambda (default: the run's)")
    e.add_argument("--knob-flops", type=float, default=None,
                   help="re-calibrate the default lambda on each seed's val split to the most compute within "
                        "this share of static's FLOPs (no retraining; not with --knob)")
    e.add_argument("--timing-repeats", type=int, default=None)
    e.add_argument("--latency-batches", type=_batch_size, nargs="*", default=None, metavar="B",
                   help="batch sizes of the wall-time sweep (default: the run's; 'none' or the flag alone: "
                        "skip it)")
    e.add_argument("--no-timing", action="store_true", help="skip the wall-clock measurements")
    e.add_argument("--threads", type=int, default=None)
    e.set_defaults(fn=cmd_eval)


def _build_config(args):

    base = {}
    if args.config:
        with open(args.config) as f:
            base = json.load(f)
    cfg = TrainConfig.from_dict(dict(base, dataset=args.dataset))
    s = args.epochs_scale

    def ep(v, cur):
        return v if v is not None else max(0 if cur == 0 else 1, int(round(cur * s)))

    cfg.warmup_epochs = ep(args.warmup_epochs, cfg.warmup_epochs)
    cfg.agent_epochs = ep(args.agent_epochs, cfg.agent_epochs)
    cfg.joint_epochs = ep(args.joint_epochs, cfg.joint_epochs)
    cfg.refit_epochs = ep(args.refit_epochs, cfg.refit_epochs)
    cfg.mlp_epochs = ep(args.mlp_epochs, cfg.mlp_epochs)
    for flag, name in (("hidden", "hidden"), ("layers", "num_layers"), ("steps", "max_steps"),
                       ("max_iter", "max_iter"), ("tol", "tol"), ("lr", "lr"), ("baseline", "baseline"),
                       ("agent_method", "agent_method"), ("timing_repeats", "timing_repeats"),
                       ("latency_batches", "latency_batches")):
        v = getattr(args, flag)
        if flag == "latency_batches":
            v = _latency_batches(v)
        if v is not None:
            setattr(cfg, name, v)
    if args.lam is not None:
        cfg.reward.lam = args.lam
    if args.reward_accuracy is not None:
        cfg.reward.accuracy = args.reward_accuracy
    if args.knob is not None:
        cfg.knob = args.knob
    if args.knob_flops is not None:
        cfg.knob_flops = args.knob_flops
    return cfg.validate()


# TrainConfig fields that only change how a run is evaluated or timed: a resume may set them anew
RESUME_FREE = ("timing_repeats", "latency_batches", "latency_repeats", "ckpt_every")


def _resume_mismatch(out: str, cfg, seed_base: int) -> Optional[str]:
    """Why ``--resume`` of the run in ``out`` with ``cfg`` would mix two configurations (None: it
    would not).  A run without ``config.json`` (stopped before writing it) has nothing to match."""
    path = os.path.join(out, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            old = json.load(f)
        stored = dict(old["train_config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its config.json is unreadable ({e})"
    new = cfg.to_dict()
    diff = sorted(k for k in set(stored) | set(new) if k not in RESUME_FREE and stored.get(k) != new.get(k))
    if diff:
        return ("it was started with another configuration: "
                + ", ".join(f"{k} {stored.get(k)!r} there, {new.get(k)!r} here" for k in diff[:6])
                + (" ..." if len(diff) > 6 else ""))
    if old.get("seed_base", 0) != seed_base:
        return f"it was started with --seed-base {old.get('seed_base')}, not {seed_base}"
    return None


def _fmt_time(s: float) -> str:
    return f"{int(s // 60)}m{s % 60:04.1f}s"


def cmd_train(args) -> int:
    import dataclasses

    import torch

    from . import report as R
    from .checkpoint import CheckpointError
    from .data import load_data
    from .trainer import Trainer, TrainingDiverged, init_distributed, set_threads

    t_start = time.perf_counter()
    if args.seeds < 1:
        print("dynalay train: --seeds must be >= 1", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"dynalay train: --threads must be >= 1 (got {args.threads})", file=sys.stderr)
        return 2
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"dynalay train: --out {args.out} exists and is not a folder", file=sys.stderr)
        return 2
    try:
        cfg0 = _build_config(args)
    except (ValueError, TypeError, OSError) as e:
        print(f"dynalay train: bad configuration: {e}", file=sys.stderr)
        return 2
    if args.resume and not args.out:
        print("dynalay train: --resume needs --out RUN_FOLDER", file=sys.stderr)
        return 2
    if args.resume:
        why = _resume_mismatch(args.out, cfg0, args.seed_base)
        if why:
            print(f"dynalay train: cannot resume {args.out}: {why}; nothing was changed", file=sys.stderr)
            return 2
    dist = init_distributed()
    threads = set_threads(args.threads, dist.world)
    log = print if dist.is_main else (lambda *a, **k: None)
    out = args.out or os.path.join("runs", f"{args.dataset}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    if dist.world > 1 and not args.out:  # all ranks must agree on the folder
        obj = [out]
        torch.distributed.broadcast_object_list(obj, 0)
        out = obj[0]
    if dist.is_main:
        if os.path.isdir(out) and os.listdir(out) and not args.resume:
            print(f"dynalay train: {out} is not empty; pass --resume to continue it, or choose another --out",
                  file=sys.stderr)
            code = 2
        else:
            code = 0
            os.makedirs(out, exist_ok=True)
    else:
        code = 0
    if dist.world > 1:
        t = torch.tensor([code])
        torch.distributed.broadcast(t, 0)
        code = int(t)
    if code:
        return code

    data = load_data(cfg0.dataset, cfg0.val_fraction, split_seed=args.seed_base)
    log(f"dynalay train: {data.describe()}; {args.seeds} seed(s); {threads} thread(s) x {dist.world} rank(s); "
        f"run folder {out}")
    if dist.is_main:
        R.write_json(os.path.join(out, "config.json"), dict(train_config=cfg0.to_dict(), seeds=args.seeds,
                                                            seed_base=args.seed_base, world_size=dist.world,
                                                            threads=threads, argv=sys.argv[1:]))
    results = []
    seed_times = []
    for k in range(args.seeds):
        seed = args.seed_base + k
        cfg = dataclasses.replace(cfg0, seed=seed, reward=dataclasses.replace(cfg0.reward))
        sdir = os.path.join(out, f"seed{seed}")
        res_path = os.path.join(sdir, "result.json")
        if args.resume and os.path.exists(res_path):
            with open(res_path) as f:
                results.append(json.load(f))
            log(f"seed {seed}: already done (resumed)")
            continue
        t0 = time.perf_counter()
        data = load_data(cfg.dataset, cfg.val_fraction, split_seed=seed)  # the fit/val split follows the seed
        tr = Trainer(cfg, data, sdir, dist=dist, progress=not args.no_progress, log=log)
        try:
            model, mlp = tr.fit(resume=args.resume)
        except TrainingDiverged as e:
            print(f"dynalay train: {e}", file=sys.stderr)
            return 1
        except CheckpointError as e:
            print(f"dynalay train: cannot resume: {e}", file=sys.stderr)
            return 1
        t_train = time.perf_counter() - t0
        if dist.is_main:
            res = R.evaluate(model, mlp, data, cfg, timing=not args.no_timing)
            res["seed"] = seed
            res["knob_calibration"] = tr.calibration
            res["train_time_s"] = t_train
            res["eval_time_s"] = time.perf_counter() - t0 - t_train
            R.write_json(res_path, res)
            results.append(res)
            m = res["models"]
            log(f"seed {seed}: trained in {_fmt_time(t_train)}, evaluated in {_fmt_time(res['eval_time_s'])}: "
                f"dynalay {m['dynalay']['accuracy'] * 100:.1f}% at "
                f"{m['dynalay']['flops_per_sample'] / m['static']['flops_per_sample']:.2f}x static FLOPs, "
                f"static {m['static']['accuracy'] * 100:.1f}%, mlp {m['mlp']['accuracy'] * 100:.1f}%")
        seed_times.append(time.perf_counter() - t0)
    if dist.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if not dist.is_main:
        return 0
    total = time.perf_counter() - t_start
    rep = R.aggregate(results, meta=dict(command="dynalay " + " ".join(sys.argv[1:]) if sys.argv else "",
                                         total_time_s=total, world_size=dist.world,
                                         date=datetime.datetime.now().isoformat(timespec="seconds"),
                                         train_config=cfg0.to_dict()))
    R.write_json(os.path.join(out, "report.json"), rep)
    if not args.no_timing:
        R.make_plot(rep, os.path.join(out, "accuracy_vs_compute.png"), [r["per_sample_flops"] for r in results])
    table = R.format_table(rep)
    with open(os.path.join(out, "table.txt"), "w") as f:
        f.write(table + "\n")
    print(table)
    plot = "" if args.no_timing else " accuracy_vs_compute.png,"
    print(f"\nwrote {out}/report.json,{plot} table.txt, seed*/checkpoint.pt (total {_fmt_time(total)})")
    return 0


def _checkpoints(path: str) -> List[str]:
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        found = sorted(os.path.join(path, d, "checkpoint.pt") for d in os.listdir(path)
                       if d.startswith("seed") and os.path.isfile(os.path.join(path, d, "checkpoint.pt")))
        if found:
            return found
        if os.path.isfile(os.path.join(path, "checkpoint.pt")):
            return [os.path.join(path, "checkpoint.pt")]
    return []


def load_trained(path: str):
    """(cfg, data, model, mlp, checkpoint) from one checkpoint file."""
    import torch

    from ..models import DynaLay, DynaLayConfig, MLPBaseline
    from .checkpoint import CheckpointError, load_checkpoint
    from .data import load_data
    from .trainer import TrainConfig

    ck = load_checkpoint(path)
    try:
        cfg = TrainConfig.from_dict(ck["train_config"])
        meta = ck["meta"]
        model = DynaLay(DynaLayConfig.from_dict(meta["model"]))
        mlp = MLPBaseline(**meta["mlp"])
        model.load_state_dict(ck["state"]["model"])
        mlp.load_state_dict(ck["state"]["mlp"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path!r} does not describe a model this dynalay can build: {e}") from e
    data = load_data(cfg.dataset, cfg.val_fraction, split_seed=cfg.seed)
    if not (torch.allclose(data.mean, ck["data_mean"]) and torch.allclose(data.std, ck["data_std"])):
        raise CheckpointError(f"checkpoint {path!r} was trained on different {cfg.dataset} data "
                              f"(normalisation statistics differ)")
    model.eval()
    mlp.eval()
    return cfg, data, model, mlp, ck


def cmd_eval(args) -> int:
    from . import report as R
    from .checkpoint import CheckpointError
    from .trainer import calibrate_knob, check_knob_settings, set_threads

    if args.threads is not None and args.threads < 1:
        print(f"dynalay eval: --threads must be >= 1 (got {args.threads})", file=sys.stderr)
        return 2
    try:
        check_knob_settings(args.knob, args.knob_flops)
    except ValueError as e:
        print(f"dynalay eval: bad --knob / --knob-flops: {e}", file=sys.stderr)
        return 2
    if args.knob is not None and args.knob_flops is not None:
        print("dynalay eval: --knob and --knob-flops both set the default lambda: give one", file=sys.stderr)
        return 2
    set_threads(args.threads)
    paths = _checkpoints(args.checkpoint)
    if not paths:
        print(f"dynalay eval: no checkpoint found at {args.checkpoint!r}", file=sys.stderr)
        return 2
    results = []
    knob = args.knob
    for p in paths:
        try:
            cfg, data, model, mlp, ck = load_trained(p)
        except CheckpointError as e:
            print(f"dynalay eval: {e}", file=sys.stderr)
            return 1
        if not ck.get("complete", False):
            print(f"dynalay eval: warning: {p} is from an unfinished run (position {ck.get('position')})",
                  file=sys.stderr)
        if args.timing_repeats is not None:
            cfg.timing_repeats = args.timing_repeats
        try:
            if args.latency_batches is not None:
                cfg.latency_batches = _latency_batches(args.latency_batches)
            cfg.validate()
        except ValueError as e:
            print(f"dynalay eval: bad configuration: {e}", file=sys.stderr)
            return 2
        calibration = ck.get("calibration") if knob is None else dict(mode="eval --knob", lam=knob)
        if args.knob_flops is not None:  # the run's val split (load_trained splits by the run's seed)
            _, calibration = calibrate_knob(model, data.val.x, data.val.y, knob_flops=args.knob_flops)
            calibration["mode"] = "eval --knob-flops"
        res = R.evaluate(model, mlp, data, cfg, default_knob=knob, timing=not args.no_timing)
        res["seed"] = cfg.seed
        res["knob_calibration"] = calibration
        results.append(res)
    rep = R.aggregate(results, meta=dict(command="dynalay " + " ".join(sys.argv[1:]),
                                         date=datetime.datetime.now().isoformat(timespec="seconds"),
                                         checkpoints=paths))
    out = args.out or (args.checkpoint if os.path.isdir(args.checkpoint) else os.path.dirname(args.checkpoint))
    out = os.path.join(out, "eval") if args.out is None else out
    os.makedirs(out, exist_ok=True)
    R.write_json(os.path.join(out, "report.json"), rep)
    if not args.no_timing:
        R.make_plot(rep, os.path.join(out, "accuracy_vs_compute.png"), [r["per_sample_flops"] for r in results])
    print(R.format_table(rep))
    print(f"\nwrote {out}/report.json")
    return 0
