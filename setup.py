"""The optional C extension of kernels.py; everything else is in pyproject.toml.

optional=True: without a C compiler the install goes on, and kernels.py computes the
same thing in torch ops, slower (see the README's Speed section). On Linux it is built
with OpenMP, to share torch's threads (see _kernels.c); a compiler without OpenMP
(clang without libomp) builds it single-threaded instead.
"""
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []


class BuildExt(build_ext):
    def build_extension(self, extension):
        try:
            super().build_extension(extension)
        except Exception:
            if not set(OPENMP) & set(extension.extra_compile_args):
                raise
            print("mnist-vae: the C kernels do not build with OpenMP here; building them single-threaded")
            extension.extra_compile_args = [a for a in extension.extra_compile_args if a not in OPENMP] + [
                "-Wno-unknown-pragmas"]
            extension.extra_link_args = [a for a in extension.extra_link_args if a not in OPENMP]
            super().build_extension(extension)


setup(ext_modules=[Extension("mnist_vae.fast._kernels", ["src/mnist_vae/fast/_kernels.c"], optional=True,
                             extra_compile_args=["-O3", "-fno-math-errno", *OPENMP], extra_link_args=OPENMP)],
      cmdclass={"build_ext": BuildExt})
