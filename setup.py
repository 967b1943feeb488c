"""Builds sparseinfer._C, the compiled kernels. Everything else lives in pyproject.toml.

CPU sources always build. CUDA sources build when a CUDA build of torch and nvcc are both present,
or when SPARSEINFER_CUDA=1 forces them (SPARSEINFER_CUDA=0 forbids them). Whether a GPU is visible
right now is deliberately not consulted: a build machine often has none.
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _build_cuda() -> bool:
    forced = os.environ.get("SPARSEINFER_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp is what makes at::parallel_for parallel: ATen's OpenMP backend is a header template that
    # compiles to a plain serial loop in a translation unit built without it. torch already links libgomp.
    cxx_flags = ["-O3", "-std=c++17", "-fvisibility=hidden", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if _build_cuda():
        return CUDAExtension(
            "sparseinfer._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            extra_link_args=link_flags,
        )
    return CppExtension(
        "sparseinfer._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
    )


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
