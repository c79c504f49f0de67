"""The optional C extension of kernels.py; everything else is in pyproject.toml.

optional=True: without a C compiler the install goes on, and kernels.py computes the
same thing in torch ops, slower (see the README's Speed section).
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("mnist_vae._kernels", ["src/mnist_vae/_kernels.c"], optional=True,
                             extra_compile_args=["-O3"])])
