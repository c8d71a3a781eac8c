"""Build of dynalay.

Environment switches (all optional):

  DYNALAY_BUILD_CPP   auto|0|1  C++ CPU ops (dynalay._C).  auto (default): build, and if the
                                build fails, install anyway (the package falls back to the
                                pure-PyTorch backend with a warning).  1: a failure is fatal.
  DYNALAY_BUILD_CUDA  auto|0|1  CUDA ops (dynalay._C_cuda).  auto (default): build when torch is
                                a CUDA build and nvcc is found.  1: required.  0: skip.
  DYNALAY_CUDA_ARCHS  "80;90"   compute capabilities to compile for ("90a" for wgmma/TMA code).
                                Never queried from the GPU: builds work on GPU-less hosts.
  DYNALAY_DEBUG       0|1       -O0 -g (-lineinfo for nvcc).
  MAX_JOBS            parallel compile jobs (default min(2, cpus)); NVCC_THREADS (default 1).
"""
import json
import os
import shutil
import sys
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _mode(name, default="auto"):
    v = os.environ.get(name, default).strip().lower()
    if v not in ("auto", "0", "1"):
        raise SystemExit(f"{name} must be auto, 0 or 1 (got {v!r})")
    return v


os.environ.setdefault("MAX_JOBS", str(min(2, os.cpu_count() or 1)))

ext_modules = []
cmdclass = {}
build_info = {"cpp": False, "cuda": False}

cpp_mode = _mode("DYNALAY_BUILD_CPP")
cuda_mode = _mode("DYNALAY_BUILD_CUDA")
debug = os.environ.get("DYNALAY_DEBUG", "0") == "1"

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - torch is a prerequisite of the build
    torch = None
    if cpp_mode == "1" or cuda_mode == "1":
        raise SystemExit("dynalay: building the C++/CUDA ops needs torch installed first "
                         "(pip install torch, then pip install -e . --no-build-isolation)")

if torch is not None:
    opt = ["-O0", "-g"] if debug else ["-O3"]
    limited = ["-DPy_LIMITED_API=0x030A0000"]
    build_info["torch"] = torch.__version__
    if cpp_mode != "0":
        ext_modules.append(CppExtension(
            "dynalay._C",
            ["csrc/dynalay_ops.cpp", "csrc/cpu/solver_cpu.cpp", "csrc/cpu/model_cpu.cpp"],
            extra_compile_args={"cxx": opt + ["-fopenmp", "-std=c++17"] + limited},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        ))
        build_info["cpp"] = True

    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    want_cuda = cuda_mode == "1" or (cuda_mode == "auto" and torch.version.cuda is not None and bool(nvcc))
    if cuda_mode == "1" and torch.version.cuda is None:
        raise SystemExit("DYNALAY_BUILD_CUDA=1 but this torch is a CPU build")
    if want_cuda:
        archs = os.environ.get("DYNALAY_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
        gencode = []
        for a in [a.strip() for a in archs if a.strip()]:
            gencode.append(f"-gencode=arch=compute_{a},code=sm_{a}")
        last = [a.strip() for a in archs if a.strip()][-1]
        gencode.append(f"-gencode=arch=compute_{last},code=compute_{last}")  # PTX for newer GPUs
        nvcc_flags = opt + gencode + ["-std=c++17", "--use_fast_math", "-Xptxas=-v",
                                      f"--threads={os.environ.get('NVCC_THREADS', '1')}"]
        if debug:
            nvcc_flags.append("-lineinfo")
        kernels = sorted(os.path.join("kernels", f) for f in os.listdir(os.path.join(ROOT, "kernels"))
                         if f.endswith(".cu"))
        ext_modules.append(CUDAExtension(
            "dynalay._C_cuda",
            ["csrc/cuda/ops_cuda.cpp"] + kernels,
            include_dirs=[os.path.join(ROOT, "kernels")],
            extra_compile_args={"cxx": opt + ["-std=c++17"], "nvcc": nvcc_flags},
        ))
        build_info["cuda"] = True
        build_info["cuda_version"] = torch.version.cuda
        build_info["cuda_archs"] = archs

    class _Build(BuildExtension):
        """Optional C++ build: with DYNALAY_BUILD_CPP=auto a failed CPU build is a warning."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                required = (ext.name == "dynalay._C" and cpp_mode == "1") or \
                           (ext.name == "dynalay._C_cuda" and cuda_mode == "1")
                if required:
                    raise
                key = "cpp" if ext.name == "dynalay._C" else "cuda"
                build_info[key] = False
                build_info[f"{key}_error"] = str(e)[:500]
                warnings.warn(f"dynalay: optional extension {ext.name} failed to build ({e}); "
                              "the package will use its fallback backends")

        def run(self):
            super().run()
            info_path = os.path.join(ROOT, "dynalay", "build_info.json")
            with open(info_path, "w") as f:
                json.dump(build_info, f, indent=1)
            if not self.inplace:
                out = os.path.join(self.build_lib, "dynalay", "build_info.json")
                os.makedirs(os.path.dirname(out), exist_ok=True)
                shutil.copyfile(info_path, out)

    cmdclass["build_ext"] = _Build.with_options(use_ninja=bool(shutil.which("ninja")))

setup(
    name="dynalay",
    version="0.1.0",
    description="Fused kernels for DynaLay: fixed-point-iterative layers with per-sample dynamic layer selection",
    packages=find_packages(include=["dynalay", "dynalay.*"]),
    package_data={"dynalay": ["build_info.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton"],
        "train": ["scikit-learn", "mnist1d", "matplotlib", "tqdm"],
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "mnist1d", "matplotlib", "tqdm", "torchdeq==0.1.0"],
    },
    entry_points={"console_scripts": ["dynalay=dynalay.cli:main"]},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
