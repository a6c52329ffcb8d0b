"""fayt-portals' C builds; the metadata is in pyproject.toml.

Two cffi modules (libportal._fayt_cffi, faytd._core; their builders say what
they compile) and the CPython extension libportal._fastpath, whose sources
libportal/_build.py lists beside the cffi module's.
"""
import os
import runpy

from setuptools import Extension, setup

_libportal = runpy.run_path(os.path.join("libportal", "_build.py"))

setup(
    cffi_modules=["libportal/_build.py:ffibuilder", "faytd/_build.py:ffibuilder"],
    ext_modules=[
        Extension(
            "libportal._fastpath",
            sources=_libportal["FASTPATH_SOURCES"],
            depends=_libportal["FASTPATH_DEPENDS"],
            include_dirs=["libportal/include"],
            extra_compile_args=["-O2", "-Wall"],
        )
    ],
)
