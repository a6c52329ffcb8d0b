"""fayt-portals: builds the cffi modules (libportal's, faytd's core) and the _fastpath
extension at install."""
from setuptools import Extension, setup

setup(
    name="fayt-portals",
    version="0.1.0",
    description="FAYT memory portals, share-points and notifications as Linux processes",
    python_requires=">=3.10",
    packages=["libportal", "faytd", "faytd.syscalls", "servers"],
    package_data={"libportal": ["include/fayt/*.h", "src/*.c", "src/*.h"],
                  "faytd": ["core/*.c", "core/*.h"]},
    setup_requires=["cffi>=1.15"],
    install_requires=["cffi>=1.15", "posix_ipc>=1.1", "psutil>=5.9"],
    cffi_modules=["libportal/_build.py:ffibuilder", "faytd/_build.py:ffibuilder"],
    ext_modules=[
        Extension(
            "libportal._fastpath",
            sources=["libportal/src/fastpath.c", "libportal/src/lock.c", "libportal/src/ring.c"],
            include_dirs=["libportal/include"],
            extra_compile_args=["-O2", "-Wall"],
        )
    ],
    entry_points={
        "console_scripts": [
            "faytd = faytd.main:main",
            "fayt = faytd.cli:main",
        ]
    },
)
