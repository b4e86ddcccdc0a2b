"""Builds ops._C: the C++ CPU kernels always, the CUDA kernels where torch has CUDA and nvcc exists."""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _build_cuda() -> bool:
    if os.environ.get("MOE_FUSION_CPU_ONLY") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp"))
    # OpenMP: at::parallel_for is serial without it. No trapping math: lets NaN-aware selects
    # vectorise (the kernels never rely on floating-point exceptions).
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    link_flags = ["-fopenmp"]
    if not _build_cuda():
        return CppExtension("ops._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    # H100/H200 by default; set TORCH_CUDA_ARCH_LIST for other cards.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    if os.environ.get("MOE_FUSION_PTXAS_VERBOSE") == "1":
        nvcc_flags.append("-Xptxas=-v")
    return CUDAExtension(
        "ops._C",
        sources + sorted(glob.glob("csrc/*.cu")),
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension})
