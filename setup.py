"""Builds torchdrr's C++/CUDA extension (``torchdrr._C``) with ``torch.utils.cpp_extension``.

The CPU kernels are always built. The CUDA kernels are built when the installed torch has CUDA and nvcc is found.
Environment switches:

* ``TORCHDRR_CUDA=auto`` (default) | ``1`` (force; fail if impossible) | ``0`` (CPU only).
* ``TORCH_CUDA_ARCH_LIST``: the GPU architectures to build for. Default: Volta to Hopper
  (``7.0 7.5 8.0 8.6 8.9 9.0+PTX``; CUDA 13 dropped Volta, so there it starts at 7.5).
* ``MAX_JOBS``: parallel compile jobs (ninja).
"""

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def _nvcc_version() -> tuple[int, int] | None:
    nvcc = Path(CUDA_HOME or "", "bin", "nvcc")
    if not nvcc.exists():
        return None
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _want_cuda() -> bool:
    switch = os.environ.get("TORCHDRR_CUDA", "auto").strip().lower()
    if switch not in {"auto", "1", "0", "on", "off", "true", "false"}:
        sys.exit(f"TORCHDRR_CUDA must be auto, 1 or 0, got {switch!r}")
    possible = torch.version.cuda is not None and _nvcc_version() is not None
    if switch in {"0", "off", "false"}:
        return False
    if switch in {"1", "on", "true"}:
        if not possible:
            sys.exit(
                "TORCHDRR_CUDA=1 but the CUDA kernels cannot be built: "
                f"torch.version.cuda={torch.version.cuda!r}, nvcc under CUDA_HOME={CUDA_HOME!r}: "
                f"{'found' if _nvcc_version() else 'not found'}"
            )
        return True
    return possible


def _default_arch_list() -> str:
    version = _nvcc_version() or (0, 0)
    archs = ["7.5", "8.0", "8.6", "8.9", "9.0+PTX"]
    if version < (13, 0):  # CUDA 13 removed Volta (sm_70)
        archs.insert(0, "7.0")
    return ";".join(archs)


def _check_cxx_links_libstdcxx_dynamically() -> None:
    """Stops the build when the C++ compiler can only link libstdc++ statically.

    Such an extension carries its own copy of libstdc++ beside the one torch uses; the two disagree on locale
    facets, and the first error message that formats a number crashes the process (seen with a GCC that had no
    libstdc++.so on a GPU machine). A compiler that finds libstdc++.so prints its full path here.
    """
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    try:
        found = subprocess.run(
            [*cxx.split(), "-print-file-name=libstdc++.so"], capture_output=True, text=True, timeout=60
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return  # not a GCC-style driver; nothing to check
    if found and os.sep not in found:
        sys.exit(
            f"The C++ compiler {cxx!r} has no libstdc++.so, so it would link libstdc++ statically into torchdrr._C, "
            "which crashes at run time next to torch's own libstdc++. Build with a compiler that links it "
            "dynamically, e.g. CC=/usr/bin/gcc CXX=/usr/bin/g++."
        )


def extensions():
    if sys.platform.startswith("linux"):
        _check_cxx_links_libstdcxx_dynamically()
    sources = [str(p.relative_to(ROOT)) for p in sorted(CSRC.rglob("*.cpp"))]
    with_cuda = _want_cuda()
    cxx_flags = ["-O3", "-std=c++17", f'-DTORCHDRR_TORCH_VERSION="{torch.__version__}"']
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for expands OpenMP pragmas inline: without -fopenmp the CPU kernel would run on one thread.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if not with_cuda:
        return [
            CppExtension(
                "torchdrr._C",
                sources,
                include_dirs=[str(CSRC)],
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=link_flags,
            )
        ]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _default_arch_list())
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    defines = ["-DTORCHDRR_WITH_CUDA=1", f'-DTORCHDRR_CUDA_ARCHS="{archs}"']
    sources += [str(p.relative_to(ROOT)) for p in sorted(CSRC.rglob("*.cu"))]
    return [
        CUDAExtension(
            "torchdrr._C",
            sources,
            include_dirs=[str(CSRC)],
            extra_compile_args={
                "cxx": cxx_flags + defines,
                "nvcc": ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"] + defines,
            },
            extra_link_args=link_flags,
        )
    ]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtension})
