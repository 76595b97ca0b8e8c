"""Build the optional Cython hot path; without Cython (or with TIERCACHE_NO_EXTENSIONS=1) the
pure-Python twin is installed alone."""

import os

from setuptools import setup

ext_modules = []
if not os.environ.get("TIERCACHE_NO_EXTENSIONS"):
    try:
        from Cython.Build import cythonize
        from setuptools import Extension
    except ImportError:  # pragma: no cover - build requirement missing
        cythonize = None
    if cythonize is not None:
        ext_modules = cythonize(
            [
                Extension(
                    "tiercache._local",
                    ["ext/_local.pyx"],
                    include_dirs=["ext"],
                    extra_compile_args=["-O3"],
                ),
                Extension("tiercache._wire", ["ext/_wire.pyx"], extra_compile_args=["-O3"]),
            ],
            compiler_directives={
                "language_level": 3,
                "boundscheck": False,
                "wraparound": False,
                "initializedcheck": False,
                "cdivision": True,
                "embedsignature": True,
            },
        )

setup(ext_modules=ext_modules)
