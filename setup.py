"""Build of mkfast and its extension mkfast._C.

The C++ CPU sources (csrc/*.cpp) always build. The CUDA sources (csrc/cuda/*.cu)
are added when a CUDA toolkit and a CUDA build of torch are both present; set
MKFAST_BUILD_CUDA=1 to require them (the build fails if either is missing) or
MKFAST_BUILD_CUDA=0 to skip them. Install with --no-build-isolation so the
extension is compiled against the torch already in the environment.
"""

import glob
import os
import re
import shutil
import subprocess

from setuptools import find_packages, setup


def _find_cuda_home():
    """A toolkit root holding bin/nvcc and include/cuda_runtime.h, if any.

    torch guesses CUDA_HOME from `which nvcc`, which is wrong when nvcc on PATH
    is a wrapper script outside the toolkit; check the guess before using it.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")  # the toolkit's standard install location
    for root in candidates:
        if root and os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


CUDA_HOME = _find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME  # read by torch.utils.cpp_extension at import

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
# Ampere (A100) and Hopper (H100/H200, with wgmma/TMA features: sm_90a).
CUDA_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
]


def _toolkit_mismatch():
    """Why the toolkit cannot build for this torch (nvcc's major CUDA version differs), or None.

    torch's build refuses a major-version mismatch outright; found here, it costs only the
    CUDA kernels of an automatic build instead of the whole install.
    """
    try:
        output = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"], capture_output=True,
                                text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return f"nvcc --version failed: {error}"
    found = re.search(r"release (\d+)\.", output)
    if found is None:
        return "nvcc --version printed no release number"
    if found.group(1) != torch.version.cuda.split(".")[0]:
        return f"nvcc is CUDA {found.group(1)}, torch was built with CUDA {torch.version.cuda}"
    return None


def _build_cuda():
    flag = os.environ.get("MKFAST_BUILD_CUDA", "").strip()
    if torch.version.cuda is None:
        reason = "torch is a CPU-only build"
    elif CUDA_HOME is None:
        reason = "no CUDA toolkit (nvcc) was found"
    else:
        reason = _toolkit_mismatch()
    can_build = reason is None
    if flag == "1" and not can_build:
        raise RuntimeError(f"MKFAST_BUILD_CUDA=1 but {reason}")
    if flag == "" and CUDA_HOME is not None and torch.version.cuda is not None and not can_build:
        print(f"mkfast: building without the CUDA kernels: {reason}")
    if flag in ("0", "1"):
        return flag == "1"
    if flag:
        raise RuntimeError(f"MKFAST_BUILD_CUDA must be 0 or 1, got {flag!r}")
    return can_build


def _extension():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    if not _build_cuda():
        return CppExtension(
            "mkfast._C",
            cpp_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    return CUDAExtension(
        "mkfast._C",
        cpp_sources + cuda_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=[("MKFAST_WITH_CUDA", None)],
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", *CUDA_ARCH_FLAGS],
        },
        extra_link_args=["-fopenmp"],
    )


# Metadata, dependencies and the entry point are in pyproject.toml. The package list stays
# here: kernels/ and benchmarks/ are installed as mkfast.kernels and mkfast.benchmarks (so
# `mkfast bench` runs from an installed package), mappings the declarative form cannot add
# to a find_packages result.
setup(
    packages=find_packages(include=["mkfast", "mkfast.*"]) + ["mkfast.kernels", "mkfast.benchmarks"],
    package_dir={"mkfast.kernels": "kernels", "mkfast.benchmarks": "benchmarks"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
