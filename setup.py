"""Build of the softmask_ext._C extension: the torch-free kernel core in csrc/ plus the bindings in python/.

CPU kernels are always built. CUDA kernels are added when the torch being built against has CUDA and a CUDA
toolkit is found (CUDA_HOME or nvcc on PATH); set SOFTMASK_FORCE_CPU=1 to build the CPU kernels only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
# pip shows a build's output only with -v, so the message says how to see progress and how long it takes.
_COMPILING = (
    "compiling the C++ kernels now: about 3 minutes on 2 CPU cores (longer with CUDA); "
    "`pip install -v` shows the compiler's progress"
)


def _sources(folder: str, pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / folder).glob(pattern))


def _extension():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("SOFTMASK_FORCE_CPU") != "1"
    # -fno-trapping-math: the kernels never read floating-point exception flags, and without it GCC keeps the
    # clamp-and-flush selects of the CPU exp pass as branches and leaves its AVX2 build scalar.
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-Wall", "-Wno-unknown-pragmas"]
    sources = _sources("csrc/cpu", "*.cpp") + ["python/ops.cpp", "python/cpu_ops.cpp"]
    common = dict(
        name="softmask_ext._C",
        include_dirs=[str(ROOT / "csrc" / "include"), str(ROOT / "csrc" / "cpu")],
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        print(f"softmask_ext: building CPU and CUDA kernels (CUDA_HOME={CUDA_HOME})", file=sys.stderr)
        print(f"softmask_ext: {_COMPILING}", file=sys.stderr)
        return CUDAExtension(
            sources=sources + _sources("csrc/cuda", "*.cu") + ["python/cuda_ops.cpp"],
            define_macros=[("SOFTMASK_WITH_CUDA", None)],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
            },
            **common,
        )
    print("softmask_ext: building CPU kernels only (no CUDA torch or no CUDA toolkit)", file=sys.stderr)
    print(f"softmask_ext: {_COMPILING}", file=sys.stderr)
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **common)


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(ext_modules=[_extension()], cmdclass={"build_ext": _build_ext()})
