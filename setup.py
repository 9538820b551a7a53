"""Builds pycomm._C: the torch-free core in csrc/ plus the torch bindings.

CUDA sources (csrc/**/*.cu) are compiled when the installed torch is a CUDA build
and nvcc is found; PYCOMM_CUDA=1 forces them, PYCOMM_CUDA=0 leaves them out.
No GPU is needed to build or import either way.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("PYCOMM_CUDA")
    if flag is not None:
        return flag.strip() not in ("", "0", "false", "no")
    import torch

    if not torch.version.cuda:
        return False
    home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME
    return bool(home and (shutil.which("nvcc") or os.path.exists(os.path.join(home, "bin", "nvcc"))))


def _sources(pattern: str) -> list:
    return sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", pattern), recursive=True)
    )


use_cuda = _want_cuda()
if use_cuda and not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
    # torch guesses CUDA_HOME from the nvcc on PATH, which can be a wrapper.
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
    cpp_extension.CUDA_HOME = "/usr/local/cuda"

sources = _sources("*.cc") + _sources("*.cpp")
define_macros = []
cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden", "-Wall", "-Wno-unused-function"]
extra = {"cxx": cxx_flags}
include_dirs = [os.path.join(ROOT, "csrc")]
if use_cuda:
    # torch's CUDA headers include cuSPARSE/cuBLAS headers that a bare toolkit may lack;
    # the pip wheels torch depends on (nvidia-*) ship them.
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    include_dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    include_dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "*", "include")))
    sources += _sources("*.cu")
    define_macros.append(("PYCOMM_WITH_CUDA", "1"))
    extra["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-DPYCOMM_WITH_CUDA=1"]
    Ext = cpp_extension.CUDAExtension
else:
    Ext = cpp_extension.CppExtension

ext = Ext(
    name="pycomm._C",
    sources=sources,
    include_dirs=include_dirs,
    define_macros=define_macros,
    extra_compile_args=extra,
    extra_link_args=["-lrt", "-pthread"],
)

setup(
    name="pycomm",
    version="0.1.0",
    description="Collective communication for PyTorch: ring collectives, gradient compression, overlap",
    packages=find_packages(include=["pycomm", "pycomm.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch", "numpy", "tqdm"],
    # pycomm-bench train: the digits data (scikit-learn) and the report's plots (matplotlib).
    extras_require={"eval": ["scikit-learn", "matplotlib"]},
    entry_points={"console_scripts": ["pycomm-bench=pycomm.bench:main"]},
)
