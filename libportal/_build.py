"""cffi builder: gathers libportal/include/fayt/*.h and compiles the module.

The headers are the only place a shared layout is written.  cffi's cdef parser
does not read preprocessor conditionals or GNU attributes, so this script
drops include guards and #include lines and strips __attribute__((packed));
every struct the headers declare is packed (or laid out so that packing
changes nothing), so cdef(packed=True) gives gcc's layout.  In API mode cffi
also compiles a check of every field offset against the real headers, so a
drift fails the build rather than a run.
"""
import glob
import os
import re
import runpy

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join(HERE, "include")
HEADERS = ["portal.h", "sharepoint.h", "notification.h", "context.h", "syscall.h", "lock.h",
           "ring.h", "pager.h"]
SOURCES = [os.path.join("libportal", "src", f)
           for f in ("lock.c", "ring.c", "uffd.c", "pager.c", "special.c")]
# The CPython extension libportal._fastpath (setup.py builds it from this list):
# the module (fastpath.c), its objects, and the lock and ring calls they make.
# A change of a header it includes rebuilds it (FASTPATH_DEPENDS).
FASTPATH_SOURCES = [os.path.join("libportal", "src", f)
                    for f in ("fastpath.c", "sharepoint.c", "region.c", "dispatch.c",
                              "transport.c", "lock.c", "ring.c")]
FASTPATH_DEPENDS = sorted(glob.glob(os.path.join("libportal", "src", "*.h"))
                          + glob.glob(os.path.join("libportal", "include", "fayt", "*.h")))
CFFI_ABI = runpy.run_path(os.path.join(HERE, "_versions.py"))["CFFI_ABI"]


def cdef_text(path):
    with open(path) as f:
        text = f.read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = text.replace("\\\n", " ")         # a continued line is one line
    text = re.sub(r"__attribute__\s*\(\(\s*packed\s*\)\)", "", text)
    keep = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#") and not re.match(r"#\s*define\s+\w+\s+\S+\s*$", s):
            continue
        if re.match(r"#\s*define\s+FAYT_\w+_H\s*$", s):
            continue
        keep.append(line)
    return "\n".join(keep)


ffibuilder = FFI()
ffibuilder.cdef("\n".join(cdef_text(os.path.join(INCLUDE, "fayt", h)) for h in HEADERS),
                packed=True)
ffibuilder.cdef("int fayt_cffi_abi(void);")
ffibuilder.set_source(
    "libportal._fayt_cffi",
    "\n".join('#include "fayt/%s"' % h for h in HEADERS)
    + "\nint fayt_cffi_abi(void) { return %d; }\n" % CFFI_ABI,
    sources=SOURCES,
    include_dirs=[INCLUDE],
    extra_compile_args=["-O2", "-Wall"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.dirname(HERE), verbose=False)
