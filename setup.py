"""Builds the compiled codec, sidecar/protocol/native.pyx; the rest of the package is declared in
pyproject.toml. Needs Cython (a build requirement, fetched by pip), a C compiler and the Python
headers (Debian: build-essential python3-dev)."""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("sidecar.protocol.native", ["sidecar/protocol/native.pyx"])],
        build_dir="build",  # the generated C stays out of the source tree
    )
)
