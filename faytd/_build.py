"""cffi builder of faytd._core, faytd's own C (faytd/core/*.c).

API mode: cffi compiles faytd/core/core.h's declarations (read with
libportal's cdef_text, the one reader of the headers) against the real
header, so that a field that drifts fails the build.  The .c files include
libportal/include/fayt/*.h for the layouts they share with clients, and
fayt/common/*.h for the C helpers they share with libportal's C (futexes,
deadlines, userfaultfd, SCM_RIGHTS); nothing of libportal/src.  No client
loads this module.
"""
import importlib.util
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# libportal/_build.py by its path: importing the package would load its
# compiled module, which may not be built yet.
_spec = importlib.util.spec_from_file_location("_libportal_build",
                                               os.path.join(ROOT, "libportal", "_build.py"))
_lpbuild = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_lpbuild)
cdef_text = _lpbuild.cdef_text

CORE = os.path.join(HERE, "core")
SOURCES = [os.path.join("faytd", "core", f) for f in
           ("core.c", "frames.c", "keeper.c", "names.c", "table.c", "journal.c", "decode.c",
            "serve.c", "timers.c", "sigbus.c", "fault.c", "direct.c")]

ffibuilder = FFI()
ffibuilder.cdef("struct fayt_core_priv;\nstruct fayt_faults;\nstruct fayt_faults_priv;\n"
                + cdef_text(os.path.join(CORE, "core.h"))
                + cdef_text(os.path.join(CORE, "fault.h")), packed=True)
ffibuilder.set_source(
    "faytd._core",
    '#include "core.h"\n#include "fault.h"\n',
    sources=SOURCES,
    include_dirs=[CORE, os.path.join(ROOT, "libportal", "include")],
    extra_compile_args=["-O2", "-Wall"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=ROOT, verbose=False)
