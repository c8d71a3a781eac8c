"""Evaluation on the test split, ``report.json``, the plot and the printed table.

Every number is measured on the test split at ``eval_batch`` (256) rows per batch:

* ``accuracy``; ``fpi_iters_per_sample``: f-evaluations actually spent per sample (all steps);
  ``flops_per_sample``: :class:`dynalay.models.CostModel` summed over what actually ran;
* ``wall_time_s``: seconds to run the *whole test split* batch by batch on the clock (median over
  ``timing_repeats`` rounds; the configurations are interleaved in every round so that machine
  noise hits all of them alike).  The pool's effective (spectrally bounded) weight is computed
  once before timing, for every configuration alike.

``report.json`` (means over seeds; ``*_std`` fields hold the standard deviation over seeds, and
``seeds`` the per-seed numbers)::

    {"dataset", "models": {name: {"accuracy", "fpi_iters_per_sample", "flops_per_sample",
                                  "wall_time_s", "batch_size"}},
     "pareto": [{"knob", "accuracy", "flops_per_sample", "wall_time_s"}],
     "truncation": [{"budget", ...same fields}], "early_exit": [{"threshold", ...}],
     "difficulty": {...}, "targets": {...},
     "latency": [{"batch_size", "early_exit_threshold", "wall_time_s": {name: s},
                  "vs_static": {name: ratio}, ...}], ...}

``latency`` (``TrainConfig.latency_batches``; not in ``--no-timing`` runs): the same wall time of
the whole test split at other batch sizes, for ``dynalay`` at the default knob, ``static``, the
``early_exit`` threshold nearest to dynalay in FLOPs, and ``mlp`` (median of ``latency_repeats``
interleaved rounds each).  A dynamic network can save FLOPs and no time: at a small batch a
solve's cost is its passes over the layer's weights, whatever the rows.

Curves are compared at matched compute by linear interpolation of the baseline's upper envelope
(best accuracy at no more FLOPs), the frontier that mixing its operating points achieves.
"""
from __future__ import annotations

import gc
import json
import math
import os
import platform
import random
import statistics
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from ..models import DynaLay, MLPBaseline

FIELDS = ("accuracy", "fpi_iters_per_sample", "flops_per_sample", "wall_time_s")


def _batches(x: torch.Tensor, bs: int):
    return [x[i:i + bs] for i in range(0, x.shape[0], bs)]


def _collect(fn: Callable, x: torch.Tensor, y: torch.Tensor, bs: int) -> Dict[str, np.ndarray]:
    logits, flops, iters, steps = [], [], [], []
    for xb in _batches(x, bs):
        o = fn(xb)
        if isinstance(o, torch.Tensor):  # mlp
            logits.append(o)
            continue
        logits.append(o.logits)
        flops.append(o.flops)
        iters.append(o.iters)
        steps.append(o.steps)
    lg = torch.cat(logits).float()
    p = torch.softmax(lg, 1)
    out = dict(correct=(lg.argmax(1) == y).numpy(), conf=p.amax(1).numpy())
    if flops:
        out.update(flops=torch.cat(flops).numpy(), iters=torch.cat(iters).double().numpy(),
                   steps=torch.cat(steps).numpy())
    return out


def time_configs(configs: Dict[str, Callable], x: torch.Tensor, bs: int, repeats: int,
                 seed: int = 0) -> Dict[str, float]:
    """Median seconds to run all of ``x`` at batch ``bs`` for every config (interleaved rounds)."""
    xs = _batches(x, bs)
    names = list(configs)
    times: Dict[str, List[float]] = {n: [] for n in names}
    rng = random.Random(seed)
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()  # as timeit does: a collection landing in one config's round is noise
    try:
        _time_rounds(configs, xs, names, times, rng, repeats)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {n: float(statistics.median(v)) for n, v in times.items()}


def _time_rounds(configs, xs, names, times, rng, repeats) -> None:
    with torch.inference_mode():
        for n in names:  # warm-up
            for xb in xs:
                configs[n](xb)
        for _ in range(max(1, repeats)):
            rng.shuffle(names)
            for n in names:
                t0 = time.perf_counter()
                for xb in xs:
                    configs[n](xb)
                times[n].append(time.perf_counter() - t0)


LATENCY_MODELS = ("dynalay", "static", "early_exit", "mlp")


def nearest_exit_threshold(res: Dict[str, Dict[str, np.ndarray]], thresholds, flops: float) -> float:
    """The early-exit threshold whose mean FLOPs per sample is nearest ``flops`` (FLOPs do not
    depend on the batch size)."""
    return min(thresholds, key=lambda th: (abs(float(res[f"early_exit:{th}"]["flops"].mean()) - flops), th))


def latency_sweep(configs: Dict[str, Callable], x: torch.Tensor, batch_sizes, repeats: int,
                  seed: int = 0) -> List[dict]:
    """``time_configs`` at every batch size: [{"batch_size", "wall_time_s": {name: s},
    "vs_static": {name: wall / static's}}]."""
    out = []
    for bs in batch_sizes:
        w = time_configs(configs, x, int(bs), repeats, seed=seed)
        out.append(dict(batch_size=int(bs), wall_time_s=w, vs_static={n: v / w["static"] for n, v in w.items()}))
    return out


def _entry(d: Dict[str, np.ndarray], wall: float, bs: int) -> dict:
    return dict(accuracy=float(d["correct"].mean()),
                fpi_iters_per_sample=float(d["iters"].mean()) if "iters" in d else 0.0,
                flops_per_sample=float(d["flops"].mean()) if "flops" in d else None,
                wall_time_s=wall, batch_size=bs)


def evaluate(model: DynaLay, mlp: MLPBaseline, data, cfg, default_knob: Optional[float] = None,
             timing: bool = True) -> dict:
    """All models and curves of one seed on the test split (see the module docstring)."""
    model.eval()
    mlp.eval()
    x, y = data.test.x, data.test.y
    bs = cfg.eval_batch
    if default_knob is None:
        default_knob = model.default_lam
    with torch.inference_mode():
        W = model.inference_weight()
        configs: Dict[str, Callable] = {
            "dynalay": lambda xb: model.run(xb, lam=default_knob, W=W),
            "dynalay_nop_action": lambda xb: model.run(xb, lam=default_knob, W=W, compact=False),
            "static": lambda xb: model.run_static(xb, W=W),
            "mlp": lambda xb: mlp(xb),
        }
        T = model.cfg.max_steps
        for k in range(T + 1):
            configs[f"truncation:{k}"] = (lambda k: lambda xb: model.run_static(xb, steps=k, W=W))(k)
        for th in cfg.exit_thresholds:
            configs[f"early_exit:{th}"] = (lambda th: lambda xb: model.run_static(xb, exit_threshold=th, W=W))(th)
        for kn in cfg.knobs:
            configs[f"pareto:{kn}"] = (lambda kn: lambda xb: model.run(xb, lam=kn, W=W))(kn)
        res = {n: _collect(fn, x, y, bs) for n, fn in configs.items()}
        # consistency: the Python loop with compaction and with NOP actions agree exactly; the
        # default path (the one-call C++ loop on cpp, DynaLay.run(fused=None)) agrees with them
        # on the actions and the compute (its logits to rounding: the head runs in its own loops)
        py = _collect(lambda xb: model.run(xb, lam=default_knob, W=W, fused=False), x, y, bs)
        nop = res["dynalay_nop_action"]
        if not np.array_equal(py["correct"], nop["correct"]) or not np.allclose(py["flops"], nop["flops"]):
            raise RuntimeError("internal error: compact and NOP-action dispatch disagree")
        fu = res["dynalay"]
        if np.mean(py["correct"] != fu["correct"]) > 0.002 or np.mean(~np.isclose(py["flops"], fu["flops"])) > 0.002:
            raise RuntimeError("internal error: the fused inference loop and the Python loop disagree")
        walls = time_configs(configs, x, bs, cfg.timing_repeats, seed=cfg.seed) if timing else \
            {n: float("nan") for n in configs}
        latency = None
        if timing and cfg.latency_batches:
            th = nearest_exit_threshold(res, cfg.exit_thresholds, float(res["dynalay"]["flops"].mean()))
            picked = dict(dynalay=configs["dynalay"], static=configs["static"],
                          early_exit=configs[f"early_exit:{th}"], mlp=configs["mlp"])
            latency = [dict(r, early_exit_threshold=th)
                       for r in latency_sweep(picked, x, cfg.latency_batches, cfg.latency_repeats, seed=cfg.seed)]
    mlp_e = _entry(res["mlp"], walls["mlp"], bs)
    mlp_e["flops_per_sample"] = mlp.flops_per_sample()
    out = dict(
        dataset=data.name,
        models=dict(dynalay=_entry(res["dynalay"], walls["dynalay"], bs),
                    static=_entry(res["static"], walls["static"], bs), mlp=mlp_e),
        pareto=[dict(knob=kn, **_entry(res[f"pareto:{kn}"], walls[f"pareto:{kn}"], bs)) for kn in cfg.knobs],
        truncation=[dict(budget=k, **_entry(res[f"truncation:{k}"], walls[f"truncation:{k}"], bs))
                    for k in range(T + 1)],
        early_exit=[dict(threshold=th, **_entry(res[f"early_exit:{th}"], walls[f"early_exit:{th}"], bs))
                    for th in cfg.exit_thresholds],
        dispatch={"compact_wall_time_s": walls["dynalay"], "nop_action_wall_time_s": walls["dynalay_nop_action"]},
        default_knob=default_knob,
    )
    if latency is not None:
        out["latency"] = latency
    # harder inputs (static wrong / static low confidence) vs the rest: DynaLay's compute
    st, dy = res["static"], res["dynalay"]
    wrong = ~st["correct"].astype(bool)
    low = st["conf"] < np.median(st["conf"])
    f = dy["flops"]

    def mean_or_none(a):
        return float(a.mean()) if a.size else None

    out["difficulty"] = dict(
        flops_static_wrong=mean_or_none(f[wrong]), flops_static_right=mean_or_none(f[~wrong]),
        flops_low_confidence=mean_or_none(f[low]), flops_high_confidence=mean_or_none(f[~low]),
        layers_static_wrong=mean_or_none(dy["steps"][wrong]), layers_static_right=mean_or_none(dy["steps"][~wrong]),
        n_static_wrong=int(wrong.sum()), n_test=int(len(f)),
        steps_histogram=np.bincount(dy["steps"].astype(np.int64), minlength=T + 1).tolist(),
    )
    dd = out["difficulty"]
    dd["harder_get_more"] = bool(dd["flops_static_wrong"] is not None and dd["flops_static_right"] is not None
                                 and dd["flops_static_wrong"] > dd["flops_static_right"]
                                 and dd["flops_low_confidence"] > dd["flops_high_confidence"])
    out["per_sample_flops"] = dict(dynalay=f.tolist(), static=st["flops"].tolist())
    ee_c = [res[f"early_exit:{th}"]["correct"] for th in cfg.exit_thresholds]
    tr_c = [res[f"truncation:{k}"]["correct"] for k in range(T + 1)]
    out["margin_se"] = [dict(knob=p["knob"],
                             vs_truncation_se=envelope_paired_se(res[f"pareto:{p['knob']}"]["correct"],
                                                                 p["flops_per_sample"], out["truncation"], tr_c),
                             vs_early_exit_se=envelope_paired_se(res[f"pareto:{p['knob']}"]["correct"],
                                                                 p["flops_per_sample"], out["early_exit"], ee_c))
                        for p in out["pareto"]]
    out["cost_table"] = model.cost_table()
    return out


# ---------------------------------------------------------------------------------------------
# curves, targets, aggregation
# ---------------------------------------------------------------------------------------------
def envelope_interp(points: List[dict], flops: float) -> Optional[float]:
    """Accuracy of a baseline curve at ``flops``: linear interpolation of its upper envelope
    (best accuracy at no more FLOPs).  None outside the curve's FLOP range."""
    pts = sorted((p["flops_per_sample"], p["accuracy"]) for p in points)
    xs, ys, best = [], [], -1.0
    for fx, ac in pts:
        best = max(best, ac)
        xs.append(fx)
        ys.append(best)
    if flops < xs[0] - 1e-9 or flops > xs[-1] + 1e-9:
        return None
    return float(np.interp(flops, xs, ys))


def envelope_paired_se(correct: np.ndarray, flops: float, points: List[dict], samples: List[np.ndarray]) \
        -> Optional[float]:
    """Standard error, over test samples, of ``accuracy - envelope_interp(points, flops)``: the
    per-sample difference between ``correct`` (0/1 per sample) and the baseline curve's upper
    envelope at ``flops`` (the two bracketing envelope points' per-sample correctness, weighted as
    the interpolation weights them; ``samples[k]`` belongs to ``points[k]``).  Paired, so it
    measures how much the margin would move on another test set of the same size."""
    order = sorted(range(len(points)), key=lambda k: points[k]["flops_per_sample"])
    xs, src, best, arg = [], [], -1.0, None
    for k in order:
        if points[k]["accuracy"] > best:
            best, arg = points[k]["accuracy"], k
        xs.append(points[k]["flops_per_sample"])
        src.append(arg)
    if flops < xs[0] - 1e-9 or flops > xs[-1] + 1e-9:
        return None
    j = int(np.clip(np.searchsorted(xs, flops, side="right") - 1, 0, len(xs) - 1))
    if j + 1 < len(xs) and xs[j + 1] > xs[j]:
        w = (flops - xs[j]) / (xs[j + 1] - xs[j])
        base = (1 - w) * samples[src[j]].astype(np.float64) + w * samples[src[j + 1]].astype(np.float64)
    else:
        base = samples[src[j]].astype(np.float64)
    d = correct.astype(np.float64) - base
    return float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else None


def targets(rep: dict, dataset: str) -> dict:
    m = rep["models"]
    dy, st = m["dynalay"], m["static"]
    t = dict(
        accuracy_gap_vs_static=dy["accuracy"] - st["accuracy"],
        flops_ratio_vs_static=dy["flops_per_sample"] / st["flops_per_sample"],
        wall_ratio_vs_static=(dy["wall_time_s"] / st["wall_time_s"]) if dy.get("wall_time_s") and st.get(
            "wall_time_s") else None,
    )
    t["within_1pt_of_static"] = t["accuracy_gap_vs_static"] >= -0.01
    t["flops_le_50pct"] = t["flops_ratio_vs_static"] <= 0.5
    t["wall_le_60pct"] = None if t["wall_ratio_vs_static"] is None else t["wall_ratio_vs_static"] <= 0.6
    margins = []
    for i, p in enumerate(rep["pareto"]):
        tr = envelope_interp(rep["truncation"], p["flops_per_sample"])
        ee = envelope_interp(rep["early_exit"], p["flops_per_sample"])
        margins.append(dict(knob=p["knob"], flops_per_sample=p["flops_per_sample"], accuracy=p["accuracy"],
                            vs_truncation=None if tr is None else p["accuracy"] - tr,
                            vs_early_exit=None if ee is None else p["accuracy"] - ee))
        if "margin_se" in rep:  # paired standard errors over test samples (one seed's, or seeds combined)
            margins[-1].update(rep["margin_se"][i])
    t["curve_margins"] = margins
    cmp_tr = [q["vs_truncation"] for q in margins if q["vs_truncation"] is not None]
    cmp_ee = [q["vs_early_exit"] for q in margins if q["vs_early_exit"] is not None]
    t["points_compared"] = dict(truncation=len(cmp_tr), early_exit=len(cmp_ee))
    t["curve_on_or_above_truncation"] = bool(cmp_tr) and min(cmp_tr) >= 0
    t["curve_on_or_above_early_exit"] = bool(cmp_ee) and min(cmp_ee) >= 0
    t["min_margin_truncation"] = min(cmp_tr) if cmp_tr else None
    t["min_margin_early_exit"] = min(cmp_ee) if cmp_ee else None
    t["harder_get_more"] = rep["difficulty"].get("harder_get_more")
    if dataset == "digits":
        t["digits_ge_96"] = dy["accuracy"] >= 0.96
    return t


def _mean_std(vals):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    if len(vals) == 1:
        return float(vals[0]), 0.0
    return float(statistics.mean(vals)), float(statistics.stdev(vals))


def _agg_entries(entries: List[dict], keep: tuple) -> dict:
    out = {k: entries[0][k] for k in keep if k in entries[0]}
    for f in FIELDS:
        m, s = _mean_std([e.get(f) for e in entries])
        out[f] = m
        out[f + "_std"] = s
    if "batch_size" in entries[0]:
        out["batch_size"] = entries[0]["batch_size"]
    return out


def aggregate(seed_results: List[dict], meta: Optional[dict] = None) -> dict:
    """Mean (and ``*_std``) over seeds, in the report.json schema."""
    r0 = seed_results[0]
    rep = dict(dataset=r0["dataset"], num_seeds=len(seed_results), seeds=[r.get("seed") for r in seed_results])
    rep["models"] = {n: _agg_entries([r["models"][n] for r in seed_results], ())
                     for n in r0["models"]}
    for curve, key in (("pareto", "knob"), ("truncation", "budget"), ("early_exit", "threshold")):
        rep[curve] = [_agg_entries([r[curve][i] for r in seed_results], (key,)) for i in range(len(r0[curve]))]
    diff = {}
    for k, v in r0["difficulty"].items():
        if isinstance(v, bool):
            diff[k] = [r["difficulty"][k] for r in seed_results]
        elif isinstance(v, (int, float)) or v is None:
            diff[k], diff[k + "_std"] = _mean_std([r["difficulty"][k] for r in seed_results])
        else:
            diff[k] = [r["difficulty"][k] for r in seed_results]
    diff["harder_get_more_all_seeds"] = all(r["difficulty"]["harder_get_more"] for r in seed_results)
    rep["difficulty"] = diff
    rep["dispatch"] = {k: _mean_std([r["dispatch"][k] for r in seed_results])[0] for k in r0["dispatch"]}
    rep["cost_table"] = r0.get("cost_table")
    # the default knob is calibrated per seed (Trainer.calibrate): one lambda per seed
    rep["default_knob"] = [r.get("default_knob") for r in seed_results]
    rep["knob_calibration"] = [r.get("knob_calibration") for r in seed_results]
    if all("margin_se" in r for r in seed_results):  # SE of the mean over seeds: sqrt(sum se^2) / S
        S = len(seed_results)
        rep["margin_se"] = [
            {"knob": q["knob"], **{k: (None if any(r["margin_se"][i][k] is None for r in seed_results) else
                                       math.sqrt(sum(r["margin_se"][i][k] ** 2 for r in seed_results)) / S)
                                   for k in ("vs_truncation_se", "vs_early_exit_se")}}
            for i, q in enumerate(r0["margin_se"])]
    if all("latency" in r for r in seed_results):
        rep["latency"] = aggregate_latency([r["latency"] for r in seed_results])
    rep["targets"] = targets(rep, rep["dataset"])
    rep["targets"]["harder_get_more"] = diff["harder_get_more_all_seeds"]
    rep["targets_per_seed"] = [targets(r, rep["dataset"]) for r in seed_results]
    rep["per_seed"] = [{k: r[k] for k in ("seed", "models", "pareto", "truncation", "early_exit", "difficulty",
                                          "margin_se", "latency")
                        if k in r} for r in seed_results]
    rep["machine"] = machine_info()
    if meta:
        rep.update(meta)
    return rep


def aggregate_latency(per_seed: List[List[dict]]) -> List[dict]:
    """Per batch size: the mean (and ``*_std`` over seeds) of every model's wall time and of its
    ratio to static's (each seed's ratio, then the mean); the seeds' early-exit thresholds."""
    out = []
    for i, row in enumerate(per_seed[0]):
        rows = [p[i] for p in per_seed]
        if any(len(p) != len(per_seed[0]) or r["batch_size"] != row["batch_size"] for p, r in zip(per_seed, rows)):
            raise ValueError("latency: the seeds were timed at different batch sizes")
        e = dict(batch_size=row["batch_size"], early_exit_threshold=[r["early_exit_threshold"] for r in rows])
        for key in ("wall_time_s", "vs_static"):
            ms = {n: _mean_std([r[key][n] for r in rows]) for n in row[key]}
            e[key] = {n: v[0] for n, v in ms.items()}
            e[key + "_std"] = {n: v[1] for n, v in ms.items()}
        out.append(e)
    return out


def machine_info() -> dict:
    from .trainer import available_cpus
    from .._ext import cpu_name
    cpu = cpu_name()
    return dict(cpu=cpu, cpus_available=available_cpus(), torch=torch.__version__,
                torch_threads=torch.get_num_threads(), python=platform.python_version(),
                platform=platform.platform())


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# table and plot
# ---------------------------------------------------------------------------------------------
def _pm(m, s, scale=1.0, fmt="{:.1f}"):
    if m is None:
        return "-"
    out = fmt.format(m * scale)
    if s:
        out += " ± " + fmt.format(s * scale)
    return out


def knob_label(rep: dict) -> str:
    """The default knob(s) of a report: one lambda per seed ("0.0267/0.1022/0.02"); a report
    written before the per-seed calibration holds a single number."""
    k = rep.get("default_knob")
    ks = k if isinstance(k, list) else [k]
    return "/".join("?" if v is None else f"{v:.4g}" for v in ks)


def format_table(rep: dict) -> str:
    m = rep["models"]
    st = m["static"]
    rows = [("model", "accuracy %", "FPI iters/sample", "MFLOPs/sample", "FLOPs vs static", "wall ms (test)",
             "wall vs static")]

    def add(name, e):
        fr = e["flops_per_sample"] / st["flops_per_sample"] if e.get("flops_per_sample") else None
        wr = e["wall_time_s"] / st["wall_time_s"] if e.get("wall_time_s") else None
        rows.append((name, _pm(e["accuracy"], e.get("accuracy_std"), 100), _pm(e["fpi_iters_per_sample"], None,
                                                                                 fmt="{:.2f}"),
                     _pm(e["flops_per_sample"], None, 1e-6, "{:.3f}"), "-" if fr is None else f"{fr:.2f}",
                     _pm(e["wall_time_s"], e.get("wall_time_s_std"), 1e3, "{:.1f}"),
                     "-" if wr is None else f"{wr:.2f}"))

    add(f"dynalay (lambda {knob_label(rep)})", m["dynalay"])
    add("static", st)
    for p in rep["truncation"]:
        add(f"truncation k={p['budget']}", p)
    for p in rep["early_exit"]:
        add(f"early_exit p>={p['threshold']}", p)
    for p in rep["pareto"]:
        add(f"dynalay lambda={p['knob']}", p)
    add("mlp", m["mlp"])
    w = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    t = rep.get("targets", {})
    if t:
        lines.append("")
        lines.append(f"targets: accuracy gap vs static {t['accuracy_gap_vs_static'] * 100:+.2f} pt "
                     f"(within 1 pt: {t['within_1pt_of_static']}), FLOPs {t['flops_ratio_vs_static']:.2f}x "
                     f"(<= 0.5: {t['flops_le_50pct']}), wall {_pm(t['wall_ratio_vs_static'], None, fmt='{:.2f}')}x "
                     f"(<= 0.6: {t['wall_le_60pct']})")
        mt, me = t.get("min_margin_truncation"), t.get("min_margin_early_exit")
        lines.append(f"curve vs truncation: min margin {'-' if mt is None else f'{mt * 100:+.2f} pt'} "
                     f"({t['points_compared']['truncation']} points; on/above: {t['curve_on_or_above_truncation']}); "
                     f"vs early_exit: {'-' if me is None else f'{me * 100:+.2f} pt'} "
                     f"({t['points_compared']['early_exit']} points; on/above: {t['curve_on_or_above_early_exit']})")
        if any("vs_early_exit_se" in q for q in t["curve_margins"]):
            def pm(v, se):
                return "-" if v is None else f"{v * 100:+.2f}" + ("" if se is None else f" ± {se * 100:.2f}")

            lines.append("margins per knob, pt (± paired standard error over test samples): " + "; ".join(
                f"lambda {q['knob']}: truncation {pm(q['vs_truncation'], q.get('vs_truncation_se'))}, "
                f"early_exit {pm(q['vs_early_exit'], q.get('vs_early_exit_se'))}" for q in t["curve_margins"]))
        d = rep["difficulty"]
        lines.append(f"harder inputs get more compute: {t.get('harder_get_more')} (MFLOPs static-wrong "
                     f"{_pm(d.get('flops_static_wrong'), None, 1e-6, '{:.3f}')} vs right "
                     f"{_pm(d.get('flops_static_right'), None, 1e-6, '{:.3f}')}; low-confidence "
                     f"{_pm(d.get('flops_low_confidence'), None, 1e-6, '{:.3f}')} vs high "
                     f"{_pm(d.get('flops_high_confidence'), None, 1e-6, '{:.3f}')})")
        if "digits_ge_96" in t:
            lines.append(f"digits >= 96%: {t['digits_ge_96']}")
    if rep.get("latency"):
        lines += ["", format_latency(rep)]
    return "\n".join(lines)


def format_latency(rep: dict) -> str:
    """The wall time of the test split by batch size, and each model's ratio to static's."""
    lat = rep["latency"]
    ths = sorted(set(lat[0]["early_exit_threshold"]))
    names = dict(dynalay=f"dynalay (lambda {knob_label(rep)})", static="static",
                 early_exit="early_exit p>=" + "/".join(str(t) for t in ths), mlp="mlp")
    n_test = (rep.get("difficulty") or {}).get("n_test")
    head = "wall ms for the test split" + (f" ({n_test:.0f} samples)" if n_test else "")
    rows = [("batch",) + tuple(names[n] for n in LATENCY_MODELS)]
    for e in lat:
        rows.append((str(e["batch_size"]),) + tuple(
            f"{e['wall_time_s'][n] * 1e3:.1f} ({e['vs_static'][n]:.2f}x)" for n in LATENCY_MODELS))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{head} by batch size (x static; median of interleaved rounds, mean over seeds):"]
    lines += ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(2, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def make_plot(rep: dict, path: str, per_sample: Optional[List[dict]] = None) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = rep.get("latency")
    fig, axes = plt.subplots(1, 4 if lat else 3, figsize=(22 if lat else 17, 5))
    m = rep["models"]
    for ax, key, scale, xlabel in ((axes[0], "flops_per_sample", 1e-6, "MFLOPs / sample"),
                                   (axes[1], "wall_time_s", 1e3, f"wall ms for the test split (batch "
                                                                 f"{m['static']['batch_size']})")):
        for curve, style, label in (("truncation", "s--", "truncation (k steps)"),
                                    ("early_exit", "^--", "early exit (confidence)"),
                                    ("pareto", "o-", "DynaLay (knob: lambda)")):
            pts = sorted(rep[curve], key=lambda p: p[key])
            ax.errorbar([p[key] * scale for p in pts], [p["accuracy"] * 100 for p in pts],
                        yerr=[(p.get("accuracy_std") or 0) * 100 for p in pts], fmt=style, capsize=2, label=label)
        for name, mk in (("dynalay", "*"), ("static", "D"), ("mlp", "P")):
            e = m[name]
            ax.errorbar([e[key] * scale], [e["accuracy"] * 100], yerr=[(e.get("accuracy_std") or 0) * 100],
                        fmt=mk, markersize=12, capsize=3, label=f"{name}" + (" (default knob)" if name == "dynalay"
                                                                             else ""))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy %")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    axes[0].set_title(f"{rep['dataset']}: accuracy vs FLOPs ({rep.get('num_seeds', 1)} seeds)")
    axes[1].set_title("accuracy vs measured wall time")
    ax = axes[2]
    if per_sample:
        dy = np.concatenate([np.asarray(p["dynalay"]) for p in per_sample]) * 1e-6
        stf = np.concatenate([np.asarray(p["static"]) for p in per_sample]) * 1e-6
        bins = np.linspace(0, max(dy.max(), stf.max()) * 1.05, 40)
        ax.hist(dy, bins=bins, alpha=0.7, label=f"DynaLay (mean {dy.mean():.3f})")
        ax.hist(stf, bins=bins, alpha=0.5, label=f"static (mean {stf.mean():.3f})")
        ax.set_xlabel("MFLOPs spent on a test sample")
        ax.set_ylabel("test samples (all seeds)")
        ax.legend(fontsize=8)
    d = rep["difficulty"]
    ax.set_title("compute per test sample; static-wrong "
                 f"{(d.get('flops_static_wrong') or 0) * 1e-6:.3f} vs right "
                 f"{(d.get('flops_static_right') or 0) * 1e-6:.3f} MFLOPs", fontsize=9)
    if lat:
        ax = axes[3]
        bss = [e["batch_size"] for e in lat]
        for n, mk in (("dynalay", "o-"), ("early_exit", "^--"), ("mlp", "P:")):
            ax.errorbar(bss, [e["vs_static"][n] for e in lat], yerr=[e["vs_static_std"][n] or 0 for e in lat],
                        fmt=mk, capsize=2, label=n)
        fr = m["dynalay"]["flops_per_sample"] / m["static"]["flops_per_sample"]
        ax.axhline(fr, color="gray", ls="--", lw=1, label=f"dynalay FLOPs / static ({fr:.2f})")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("wall time / static's")
        ax.set_title("wall time vs static by batch size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
