"""Command line: ``dynalay info | demo | bench`` (``python -m dynalay ...``)."""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from typing import List, Optional


def cmd_info(args) -> int:
    import torch

    from . import _ext, backends
    print(f"dynalay {__import__('dynalay').__version__}  python {platform.python_version()}  torch {torch.__version__}")
    try:
        import triton
        tv = triton.__version__
    except Exception as e:  # noqa: BLE001
        tv = f"not importable ({type(e).__name__})"
    print(f"triton {tv}   TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}   "
          f"DYNALAY_BACKEND={os.environ.get('DYNALAY_BACKEND', 'auto')}")
    cuda = torch.cuda.is_available()
    print(f"CUDA device: {torch.cuda.get_device_name(0) if cuda else 'none'}   torch CUDA build: {torch.version.cuda}")
    from .backends import cuda as cuda_backend
    print(f"cuda backend: solve variant DYNALAY_CUDA_SOLVE={os.environ.get('DYNALAY_CUDA_SOLVE') or 'r4w8 (default)'}"
          f"   fused dynamic_step / backward: {'on' if cuda_backend.FUSED else 'off (DYNALAY_CUDA_FUSED=0)'}")
    print(f"build: {_ext.build_info() or 'no build_info.json (extensions not built)'}")
    print(f"CPU threads: {torch.get_num_threads()}")
    print()
    print(f"{'backend':8} {'CPU fp32':10} {'CUDA fp32':10} why not")
    for name, cpu, gpu in backends.describe():
        why = "; ".join(dict.fromkeys(cpu + gpu))
        print(f"{name:8} {'yes' if not cpu else 'no':10} {'yes' if not gpu else 'no':10} {why}")
    print()
    for dev in (["cpu"] + (["cuda"] if cuda else [])):
        for solver in ("picard", "anderson"):
            picks = {op: backends.select(dev, torch.float32, (solver,), op=op)
                     for op in ("fixed_point", "dynamic_step")}
            print(f"auto picks for {dev} fp32 {solver}: fixed_point {picks['fixed_point']}, "
                  f"dynamic_step {picks['dynamic_step']}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(args)


def cmd_bench(args) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench_dir = os.path.join(root, "benchmarks")
    if not os.path.isdir(bench_dir):
        print("dynalay bench needs a source checkout (benchmarks/ next to the package)", file=sys.stderr)
        return 2
    extra = list(args.pytest_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    # a file or folder among the arguments selects the suites; otherwise every suite runs
    chosen = [a for a in extra if not a.startswith("-") and os.path.exists(a)]
    cmd = ([sys.executable, "-m", "pytest"] + ([] if chosen else [bench_dir])
           + ["-q", "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name"] + extra)
    print("+", " ".join(cmd))
    return subprocess.call(cmd)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynalay", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="which backends run here, and why not").set_defaults(fn=cmd_info)
    d = sub.add_parser("demo", help="train a small FPI-layer classifier on digits and report")
    d.add_argument("--epochs", type=int, default=15)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=cmd_demo)
    b = sub.add_parser("bench", help="run the kernel benchmarks (pytest-benchmark)",
                       description="Runs benchmarks/ with pytest-benchmark. Every other argument goes to pytest, "
                                   "options included: dynalay bench -k fixed_point, dynalay bench "
                                   "benchmarks/bench_dispatch.py --benchmark-json out.json.")
    b.add_argument("pytest_args", nargs=argparse.REMAINDER, help="pytest arguments (suites, -k, --benchmark-*)")
    b.set_defaults(fn=cmd_bench)
    try:
        from .train.cli import add_commands
    except ImportError as e:  # e.g. a training dependency (tqdm, scikit-learn, mnist1d) is missing
        print(f"dynalay: `train` and `eval` are unavailable: {e} (pip install 'dynalay[train]')", file=sys.stderr)
    else:
        add_commands(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv[:1] == ["bench"] and argv[1:] not in (["-h"], ["--help"]):  # the rest is pytest's, options included
        args = parser.parse_args(["bench"])
        args.pytest_args = argv[1:]
        return args.fn(args)
    args = parser.parse_args(argv)
    return args.fn(args)
