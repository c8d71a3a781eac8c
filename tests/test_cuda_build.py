"""Compile check of the pure-CUDA kernel files (kernels/*.cu) with nvcc, on machines without a GPU.

Every kernels/*.cu is compiled for sm_80 and sm_90a (in parallel), with the flags setup.py gives
nvcc plus the half/bfloat16 macros torch's extension build adds; any compile error fails the test.
The ptxas report (registers, shared memory, spills per kernel) is printed (see it with
``pytest -s`` or ``-rA``).  Also checks that kernels/dynalay_kernels.cuh, which the torch glue
includes, is valid host C++.  Skipped only when nvcc is not on PATH.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "kernels")
ARCHS = ("compute_80,code=sm_80", "compute_90a,code=sm_90a")
# torch.utils.cpp_extension adds these to every nvcc command line; setup.py adds --use_fast_math.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA kernels cannot be compile-checked here")
    return nvcc


def _sources():
    return sorted(f for f in os.listdir(KERNELS) if f.endswith(".cu"))


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return names
    try:
        r = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, timeout=30)
        out = r.stdout.splitlines()
        return out if r.returncode == 0 and len(out) == len(names) else names
    except (OSError, subprocess.SubprocessError):
        return names


def _summarize(log: str) -> str:
    """One line per kernel: registers, shared memory, stack and spills, name."""
    rows, name, spill = [], None, ""
    for ln in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(\w+)'", ln)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", ln)
        if m:
            spill = f"stack {m.group(1)} B, spill st/ld {m.group(2)}/{m.group(3)} B"
            continue
        m = re.search(r"Used (\d+) registers", ln)
        if m and name:
            sm = re.search(r"(\d+) bytes smem", ln)
            rows.append((m.group(1), sm.group(1) if sm else "0", spill, name))
            name, spill = None, ""
    names = _demangle([r[3] for r in rows])
    names = [n.replace("dynalay::(anonymous namespace)::", "").replace("dynalay::", "") for n in names]
    return "\n".join(f"  {r:>3} regs, {s:>5} B smem, {sp}  {n}" for (r, s, sp, _), n in zip(rows, names))


def test_kernels_compile_with_nvcc(capsys):
    nvcc = _nvcc()
    sources = _sources()
    assert sources, "kernels/ holds no .cu file"
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for src in sources:
            for arch in ARCHS:
                obj = os.path.join(tmp, f"{src}.{arch.split('=')[-1]}.o")
                cmd = [nvcc, "-c", "-o", obj, "-std=c++17", "-O3", "-Xptxas=-v", f"-gencode=arch={arch}",
                       "-I", KERNELS, "--use_fast_math", *TORCH_NVCC_DEFINES, os.path.join(KERNELS, src)]
                jobs.append((src, arch, cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                              text=True)))
        failures, report = [], []
        for src, arch, cmd, proc in jobs:
            out, _ = proc.communicate(timeout=600)
            sm = arch.split("=")[-1]
            report.append(f"== {src} [{sm}] ==\n{_summarize(out)}")
            spills = [int(s) for s in re.findall(r"(\d+) bytes spill stores", out)]
            if any(spills):
                report.append(f"  NOTE: {sum(1 for s in spills if s)} kernel(s) spill registers")
            warnings = [ln for ln in out.splitlines() if "warning" in ln.lower()]
            if warnings:
                report.append("  warnings:\n    " + "\n    ".join(warnings))
            if proc.returncode != 0:
                failures.append(f"{src} [{sm}] failed (exit {proc.returncode}):\n{' '.join(cmd)}\n{out[-4000:]}")
    text = "ptxas report (registers, shared memory, spills):\n" + "\n".join(report)
    print(text)
    assert not failures, "\n\n".join(failures)


def _host_cxx_and_cuda_include():
    nvcc = _nvcc()
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    cuda_include = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include")
    if not os.path.exists(os.path.join(cuda_include, "cuda_runtime_api.h")):
        for cand in ("/usr/local/cuda/include",):
            if os.path.exists(os.path.join(cand, "cuda_runtime_api.h")):
                cuda_include = cand
                break
        else:
            pytest.skip("cuda_runtime_api.h not found next to nvcc")
    return cxx, cuda_include


def test_launcher_header_is_host_cpp():
    """The glue includes kernels/dynalay_kernels.cuh with the host compiler: no device code may leak."""
    cxx, cuda_include = _host_cxx_and_cuda_include()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "use_header.cpp")
        with open(src, "w") as f:
            f.write('#include "dynalay_kernels.cuh"\n'
                    "int main() { DynalayFpSolveParams p{}; (void)p; return dynalay_fp_solve_block_m(64) > 0 ? 0 : 1; }\n")
        r = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-I", KERNELS, "-I", cuda_include, src],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr


# c10/cuda/impl/cuda_cmake_macros.h is generated by a CUDA build of torch; a CPU wheel ships the
# other c10/cuda headers without it.  Its whole content in a shared-library build:
CMAKE_MACROS_SHIM = "#pragma once\n#ifndef C10_CUDA_BUILD_SHARED_LIBS\n#define C10_CUDA_BUILD_SHARED_LIBS\n#endif\n"


def test_cuda_glue_compiles_against_torch_headers():
    """csrc/cuda/ops_cuda.cpp (the torch glue of the CUDA backend, built only on a CUDA machine)
    type-checks with the host compiler against this torch's headers, the CUDA runtime headers and
    kernels/dynalay_kernels.cuh: a glue error then fails here, not on a lent GPU.  C++20: this
    torch's headers use C++20 features (setup.py's C++17 suits the torch 2.11 of the GPU
    machines, where the glue is really built)."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    cxx, cuda_include = _host_cxx_and_cuda_include()
    incs = include_paths()
    with tempfile.TemporaryDirectory() as tmp:
        if not any(os.path.exists(os.path.join(i, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for i in incs):
            os.makedirs(os.path.join(tmp, "c10", "cuda", "impl"))
            with open(os.path.join(tmp, "c10", "cuda", "impl", "cuda_cmake_macros.h"), "w") as f:
                f.write(CMAKE_MACROS_SHIM)
        cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-I", tmp] + [f"-I{i}" for i in incs] + \
            ["-I", cuda_include, "-I", KERNELS, "-I", sysconfig.get_paths()["include"],
             os.path.join(ROOT, "csrc", "cuda", "ops_cuda.cpp")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    errors = [ln for ln in (r.stdout + r.stderr).splitlines() if "error" in ln or "warning" in ln]
    assert r.returncode == 0 and not errors, "\n".join(errors[:40]) or (r.stdout + r.stderr)[-4000:]
