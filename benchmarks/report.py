#!/usr/bin/env python
"""Markdown report of one pytest-benchmark JSON run of the dynalay benchmarks.

Usage:  python benchmarks/report.py benchmarks/results/<name>.json [-o OUT.md]

Writes benchmarks/results/<name>.md (next to this script, unless -o) with the medians and the
ratios the issues ask for, each computed from this one run (same machine, same session), with
PASS/FAIL against the issue's target:

  "The fixed-point solve as a torch custom op" (bench_fixed_point.py)
    * forward speed-up of dynalay vs torchdeq fixed_point_iter at (512, 256)      >= 2x
    * the same at (64, 64)                                                          >= 4x
    * dynalay forward time / eager-loop forward time (each shape)                  <= 1/0.9
    * fwd+bwd speed-up, dynalay implicit vs torchdeq FP + IFT at (512, 256)        >= 2.5x
    * slow problem: Anderson / Picard iterations                                   <= 0.5
                    Anderson / Picard wall time                                    < 1
    * states of (B, H) kept for backward by dynalay implicit                       <= 2
  "Batched dynamic layer dispatch" (bench_dispatch.py)
    * dynamic_step speed-up vs per_layer_loop at B=4096, H=128                     >= 1.5x
    * dynamic_step speed-up vs dense at B=4096, H=128                              >= 3x
    * realised saving t(NOP 0.5) / t(NOP 0)                                        <= 0.6
                      t(NOP 0.9) / t(NOP 0)                                        <= 0.2

Every dynalay provider in the run (dynalay_cpp, dynalay_torch on CPU; dynalay_triton,
dynalay_cuda on GPU) gets its own rows; the issues' targets were written for the compiled
backends (dynalay_cpp on CPU).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
DYNALAY_ORDER = ["dynalay_cpp", "dynalay_cuda", "dynalay_triton", "dynalay_torch"]
FP_ORDER = DYNALAY_ORDER + ["eager", "torchdeq_fp", "torchdeq_anderson"]
DISPATCH_ORDER = DYNALAY_ORDER + ["per_layer_loop", "dense"]


def ordered(names, order):
    names = set(names)
    return [n for n in order if n in names] + sorted(names - set(order))


def fmt_ms(sec: Optional[float]) -> str:
    if sec is None:
        return "—"
    ms = sec * 1e3
    if ms >= 100:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def fmt_x(v: Optional[float], digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.{digits}f}"


def fmt_it(v) -> str:
    if v is None:
        return "—"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


class Ratios:
    """Rows of (issue, ratio, provider, case, value, target, verdict)."""

    def __init__(self):
        self.rows: List[Tuple[str, ...]] = []
        self.passed = defaultdict(int)  # (issue, provider) -> count
        self.total = defaultdict(int)

    def add(self, issue: str, what: str, provider: str, case: str, value: Optional[float], op: str,
            target: float, target_txt: str):
        if value is None:
            verdict = "n/a (missing)"
        else:
            ok = {">=": value >= target, "<=": value <= target, "<": value < target}[op]
            verdict = "PASS" if ok else "**FAIL**"
            self.total[(issue, provider)] += 1
            self.passed[(issue, provider)] += ok
        self.rows.append((issue, what, provider, case, fmt_x(value), f"{op} {target_txt}", verdict))

    def lines(self) -> List[str]:
        out: List[str] = []
        for issue in dict.fromkeys(r[0] for r in self.rows):
            provs = ordered({p for (i, p) in self.total if i == issue}, DYNALAY_ORDER)
            out += [f"### {issue}", ""]
            out += [f"- **{p}**: {self.passed[(issue, p)]}/{self.total[(issue, p)]} PASS" for p in provs]
            out += ["", "| ratio | provider | case | value | target | result |", "|---|---|---|---|---|---|"]
            out += ["| " + " | ".join(r[1:]) + " |" for r in self.rows if r[0] == issue]
            out.append("")
        return out


def load(path: Path):
    data = json.loads(path.read_text())
    entries = []
    for b in data.get("benchmarks", []):
        ei = dict(b.get("extra_info") or {})
        st = b.get("stats") or {}
        ei["_median"] = st.get("median")
        ei["_iqr"] = st.get("iqr")
        ei["_rounds"] = st.get("rounds")
        ei["_name"] = b.get("name")
        entries.append(ei)
    return data, entries


def header(data: dict, entries: List[dict], json_path: Path) -> List[str]:
    meta = dict(data.get("dynalay") or {})
    if not meta and entries:  # older JSON without the run-wide block: take it from a case
        e = entries[0]
        meta = {k: e.get(k) for k in ("device", "device_name", "torch", "triton", "dynalay", "threads", "dtype")}
    ci = data.get("commit_info") or {}
    commit = ci.get("id")
    commit_txt = f"{commit[:12]}{' (dirty tree)' if ci.get('dirty') else ''}" if commit else "unknown"
    dev = meta.get("device", "?")
    threads = f", {meta.get('threads')} threads" if meta.get("threads") else ""
    return [
        f"# dynalay benchmarks: {json_path.stem}",
        "",
        f"- **device**: {dev} ({meta.get('device_name', '?')}{threads})",
        f"- **date**: {data.get('datetime', '?')}",
        f"- **torch**: {meta.get('torch', '?')}, **triton**: {meta.get('triton', '—')}, "
        f"**dynalay**: {meta.get('dynalay', '?')} (commit {commit_txt}), **dtype**: {meta.get('dtype', '?')}",
        f"- **command**: `{meta.get('command_line', '?')}`"
        + (f" (pytest arguments: `{' '.join(meta['pytest_args'])}`)"
           if meta.get("pytest_args") and not str(meta.get("command_line", "")).startswith("python -m pytest") else ""),
        f"- **source**: `{json_path.name}` (pytest-benchmark {data.get('version', '?')}); times are medians in ms; "
        f"every ratio below comes from this one run",
        f"- **solve**: tol {meta.get('tol', 1e-4)} (relative residual per row), max_iter {meta.get('max_iter', 50)}, "
        f"z0 = 0; iterations are f-evaluations (mean over rows for dynalay, the batch count for the "
        f"eager loop and torchdeq)",
        "",
    ]


def index(entries: List[dict], suite: str, keys: Tuple[str, ...]) -> Dict[tuple, dict]:
    out = {}
    for e in entries:
        if e.get("suite") == suite:
            out[tuple(e.get(k) for k in keys)] = e
    return out


def med(e: Optional[dict]) -> Optional[float]:
    return None if e is None else e.get("_median")


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


# --------------------------------------------------------------------------------------------
# Fixed point
# --------------------------------------------------------------------------------------------
def fixed_point_sections(entries: List[dict], R: Ratios) -> List[str]:
    out: List[str] = []
    ISSUE = "The fixed-point solve as a torch custom op"
    fp = index(entries, "fixed_point", ("provider", "B", "H", "mode"))
    if fp:
        provs = ordered({k[0] for k in fp}, FP_ORDER)
        shapes = sorted({(k[1], k[2]) for k in fp})
        modes = [m for m in ("fwd", "fwdbwd") if any(k[3] == m for k in fp)]
        out += ["## Fixed-point solve (gauss problem): median ms (mean fwd iterations / bwd iterations)", "",
                "| B | H | mode | " + " | ".join(provs) + " |", "|---|---|---|" + "---|" * len(provs)]
        for (B, H) in shapes:
            for m in modes:
                cells = []
                for p in provs:
                    e = fp.get((p, B, H, m))
                    if e is None:
                        cells.append("—")
                        continue
                    its = fmt_it(e.get("iters_fwd_mean"))
                    if m == "fwdbwd" and e.get("iters_bwd_mean") is not None:
                        its += f" / {fmt_it(e.get('iters_bwd_mean'))}"
                    cells.append(f"{fmt_ms(med(e))} ({its})")
                out.append(f"| {B} | {H} | {m} | " + " | ".join(cells) + " |")
        out += ["", "torchdeq fwd runs in eval mode under no_grad (its inference path); fwdbwd in train mode with "
                "`ift=True` (its backward iterations are the b_solver's, reported through `backward_writer`). "
                "eager fwdbwd is unrolled backprop through the loop.", ""]
        for p in [q for q in provs if q.startswith("dynalay_")]:
            for (B, H), tgt in (((512, 256), 2.0), ((64, 64), 4.0)):
                R.add(ISSUE, "fwd speed-up vs torchdeq FP: t(torchdeq_fp) / t(dynalay)", p, f"B={B} H={H}",
                      ratio(med(fp.get(("torchdeq_fp", B, H, "fwd"))), med(fp.get((p, B, H, "fwd")))),
                      ">=", tgt, f"{tgt:g}")
            for (B, H) in shapes:
                R.add(ISSUE, "fwd time / eager-loop fwd time", p, f"B={B} H={H}",
                      ratio(med(fp.get((p, B, H, "fwd"))), med(fp.get(("eager", B, H, "fwd")))),
                      "<=", 1 / 0.9, "1/0.9 = 1.11")
            R.add(ISSUE, "fwd+bwd speed-up vs torchdeq FP + IFT: t(torchdeq_fp) / t(dynalay)", p, "B=512 H=256",
                  ratio(med(fp.get(("torchdeq_fp", 512, 256, "fwdbwd"))), med(fp.get((p, 512, 256, "fwdbwd")))),
                  ">=", 2.5, "2.5")

    slow = index(entries, "fixed_point_slow", ("provider",))
    if slow:
        provs = ordered({k[0] for k in slow}, [f"{d}_{s}" for d in DYNALAY_ORDER for s in ("picard", "anderson")]
                        + ["eager", "torchdeq_fp", "torchdeq_anderson"])
        e0 = next(iter(slow.values()))
        out += [f"## Slow problem (symmetric W, eigenvalues in [0, 0.9], injection x0.3; B={e0.get('B')} "
                f"H={e0.get('H')}, fwd)", "", "| provider | median ms | mean iterations | max iterations |",
                "|---|---|---|---|"]
        for p in provs:
            e = slow[(p,)]
            out.append(f"| {p} | {fmt_ms(med(e))} | {fmt_it(e.get('iters_fwd_mean'))} | "
                       f"{fmt_it(e.get('iters_fwd_max'))} |")
        out.append("")
        for d in DYNALAY_ORDER:
            pic, an = slow.get((f"{d}_picard",)), slow.get((f"{d}_anderson",))
            if pic is None and an is None:
                continue
            it = ratio(an and an.get("iters_fwd_mean"), pic and pic.get("iters_fwd_mean"))
            R.add(ISSUE, "slow problem: Anderson / Picard iterations", d, "slow B=512 H=256", it, "<=", 0.5, "0.5")
            R.add(ISSUE, "slow problem: Anderson / Picard wall time", d, "slow B=512 H=256",
                  ratio(med(an), med(pic)), "<", 1.0, "1")

    mem = index(entries, "memory", ("provider", "problem"))
    if mem:
        provs = ordered({k[0] for k in mem}, DYNALAY_ORDER + ["unrolled", "torchdeq_fp", "torchdeq_anderson"])
        problems = [p for p in ("gauss", "slow") if any(k[1] == p for k in mem)]
        e0 = next(iter(mem.values()))
        sb = e0.get("state_bytes")
        out += [f"## Memory kept for backward after the forward (B={e0.get('B')} H={e0.get('H')}, one state = "
                f"{sb / 1024:.0f} KiB; not timed)", "",
                "KiB of activations the autograd graph holds (saved_tensors_hooks, deduplicated by storage, "
                "excluding the inputs inj/W) and the same in states of (B, H); in brackets the forward iterations.",
                "", "| provider | " + " | ".join(problems) + " |", "|---|" + "---|" * len(problems)]
        for p in provs:
            cells = []
            for pb in problems:
                e = mem.get((p, pb))
                cells.append("—" if e is None else f"{e['saved_bytes'] / 1024:.0f} KiB = "
                             f"{e['saved_states']:.2f} states ({fmt_it(e.get('iters_fwd_mean'))} it)")
            out.append(f"| {p} | " + " | ".join(cells) + " |")
        out.append("")
        for p in [q for q in provs if q.startswith("dynalay_")]:
            for pb in problems:
                e = mem.get((p, pb))
                R.add(ISSUE, "states of (B, H) kept for backward (implicit)", p, f"{pb} B=512 H=256",
                      None if e is None else e.get("saved_states"), "<=", 2.0, "2")
    return out


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------
def dispatch_sections(entries: List[dict], R: Ratios) -> List[str]:
    out: List[str] = []
    ISSUE = "Batched dynamic layer dispatch"
    d = index(entries, "dispatch", ("provider", "B", "H", "nop", "dist", "mode"))
    if not d:
        return out
    provs = ordered({k[0] for k in d}, DISPATCH_ORDER)
    Bs = sorted({k[1] for k in d})
    Hs = sorted({k[2] for k in d})
    nops = sorted({k[3] for k in d})
    dists = [x for x in ("uniform", "skewed") if any(k[4] == x for k in d)]
    modes = [m for m in ("fwd", "fwdbwd") if any(k[5] == m for k in d)]
    e0 = next(iter(d.values()))
    out += [f"## Dynamic dispatch (L={e0.get('L', 4)} + NOP): median ms", "",
            "uniform: active rows spread evenly over the layers; skewed: 90% of the active rows on layer 0. "
            "In brackets: row f-evaluations per row of the batch (the work done).", "",
            "| B | H | NOP | actions | mode | " + " | ".join(provs) + " |",
            "|---|---|---|---|---|" + "---|" * len(provs)]
    for B in Bs:
        for H in Hs:
            for nop in nops:
                for dist in dists:
                    for m in modes:
                        cells = []
                        for p in provs:
                            e = d.get((p, B, H, nop, dist, m))
                            if e is None:
                                cells.append("—")
                                continue
                            re_ = e.get("row_evals_fwd")
                            work = f" ({re_ / B:.1f})" if re_ is not None else ""
                            cells.append(f"{fmt_ms(med(e))}{work}")
                        out.append(f"| {B} | {H} | {nop:g} | {dist} | {m} | " + " | ".join(cells) + " |")
    out.append("")

    dyn = [p for p in provs if p.startswith("dynalay_")]
    big = (4096, 128)
    for p in dyn:
        for m in modes:
            for nop in nops:
                for dist in dists:
                    key = (big[0], big[1], nop, dist, m)
                    t = med(d.get((p,) + key))
                    case = f"B={big[0]} H={big[1]} NOP {nop:g} {dist} {m}"
                    R.add(ISSUE, "speed-up vs per_layer_loop", p, case, ratio(med(d.get(("per_layer_loop",) + key)), t),
                          ">=", 1.5, "1.5")
                    R.add(ISSUE, "speed-up vs dense", p, case, ratio(med(d.get(("dense",) + key)), t), ">=", 3.0, "3")
    # realised saving (dynalay), with the per-layer loop's for comparison
    sav_rows = []
    for p in dyn:
        for B in Bs:
            for H in Hs:
                for dist in dists:
                    for m in modes:
                        base = med(d.get((p, B, H, 0.0, dist, m)))
                        loop_base = med(d.get(("per_layer_loop", B, H, 0.0, dist, m)))
                        for nop, tgt in ((0.5, 0.6), (0.9, 0.2)):
                            if nop not in nops:
                                continue
                            v = ratio(med(d.get((p, B, H, nop, dist, m))), base)
                            case = f"B={B} H={H} {dist} {m}"
                            R.add(ISSUE, f"realised saving t(NOP {nop:g}) / t(NOP 0)", p, case, v, "<=", tgt,
                                  f"{tgt:g}")
                            lv = ratio(med(d.get(("per_layer_loop", B, H, nop, dist, m))), loop_base)
                            sav_rows.append(f"| {p} | {case} | {nop:g} | {fmt_x(v)} | {fmt_x(lv)} | {tgt:g} |")
    if sav_rows:
        out += ["### Realised saving t(NOP f) / t(NOP 0)", "",
                "| provider | case | NOP f | dynalay | per_layer_loop (for comparison) | target |",
                "|---|---|---|---|---|---|"] + sav_rows + [""]
    return out


def adjoint_sections(entries: List[dict]) -> List[str]:
    """bench_fixed_point.py::test_slow_adjoint: the backward's adjoint solvers (informative)."""
    ad = index(entries, "fixed_point_adjoint", ("backend", "backward_solver", "B", "H"))
    if not ad:
        return []
    solvers = [x for x in ("picard", "anderson", "gmres") if any(k[1] == x for k in ad)]
    out = ["## Slow problem, forward+backward by adjoint solver: median ms (mean backward iterations)", "",
           "The forward is Picard in every column; `backward_solver` picks the implicit backward's adjoint solve.",
           "", "| backend | B | H | " + " | ".join(solvers) + " |", "|---|---|---|" + "---|" * len(solvers)]
    for be, B, H in sorted({(k[0], k[2], k[3]) for k in ad}):
        cells = []
        for sv in solvers:
            e = ad.get((be, sv, B, H))
            cells.append("—" if e is None else f"{fmt_ms(med(e))} ({fmt_it(e.get('iters_bwd_mean'))})")
        out.append(f"| {be} | {B} | {H} | " + " | ".join(cells) + " |")
    return out + [""]


def func_sections(entries: List[dict]) -> List[str]:
    """bench_func.py: the batching rules against a loop per slice (no issue target: informative)."""
    ps = index(entries, "func", ("case", "provider", "backend", "N", "mode"))
    if not ps:
        return []
    out = ["## torch.func: batching rules (one folded call) vs a loop per slice: median ms", ""]
    rows = sorted({(k[2], k[3]) for k in ps if k[0] == "per_sample_grad"})
    if rows:
        out += ["Per-sample gradients, `vmap(grad(f))` over N samples of a `fixed_point` layer (H = 64, shared W) "
                "against loops over the samples:", "",
                "| backend | N | vmap(grad) | loop of grad | loop of autograd.grad | loops / vmap |",
                "|---|---|---|---|---|---|"]
        for be, N in rows:
            v, lp, la = (med(ps.get(("per_sample_grad", p, be, N, None))) for p in ("vmap", "loop", "loop_autograd"))
            out.append(f"| {be} | {N} | {fmt_ms(v)} | {fmt_ms(lp)} | {fmt_ms(la)} | "
                       f"{fmt_x(ratio(lp, v), 1)} / {fmt_x(ratio(la, v), 1)} |")
        out.append("")
    modes = sorted({k[4] for k in ps if k[0] == "ensemble_step"})
    if modes:
        e = next(x for x in entries if x.get("case") == "ensemble_step")
        out += [f"`vmap` of `dynamic_step` over an ensemble of E = {e.get('E')} layer sets (U, W, b mapped; "
                f"B = {e.get('B')} rows each, H = {e.get('H')}, L = {e.get('L')}, cpp) against a loop over the members:",
                "", "| mode | vmap | loop | loop / vmap |", "|---|---|---|---|"]
        for m in modes:
            v, lp = med(ps.get(("ensemble_step", "vmap", "cpp", None, m))), med(ps.get(("ensemble_step", "loop", "cpp",
                                                                                      None, m)))
            out.append(f"| {m} | {fmt_ms(v)} | {fmt_ms(lp)} | {fmt_x(ratio(lp, v))} |")
        out.append("")
    return out


def build_report(json_path: Path) -> str:
    data, entries = load(json_path)
    R = Ratios()
    body = header(data, entries, json_path)
    sections = (fixed_point_sections(entries, R) + dispatch_sections(entries, R) + adjoint_sections(entries)
                + func_sections(entries))
    if not entries:
        body += ["**No benchmark entries in this file** (was it written with --benchmark-disable?)", ""]
    body += ["## Ratios the issues ask for", ""]
    if R.rows:
        body += R.lines()
    else:
        body += ["(none: the cases they need are missing from this run)", ""]
    body += sections
    return "\n".join(body) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", type=Path, help="pytest-benchmark JSON (--benchmark-json output)")
    ap.add_argument("-o", "--out", type=Path, default=None,
                    help="output markdown (default: benchmarks/results/<json stem>.md)")
    args = ap.parse_args(argv)
    text = build_report(args.json)
    out = args.out or (HERE / "results" / f"{args.json.stem}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
