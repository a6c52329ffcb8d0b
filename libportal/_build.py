"""cffi builder: gathers libportal/include/fayt/*.h and compiles the module.

Each C function has one binding (as pynacl's bindings do): the hot ones
belong to the CPython extension _fastpath (FASTPATH_BINDS), the rest to
this cffi module, and the calls only C makes (C_ONLY) to neither; the
headers declare them all, and cdef_text leaves those two lists out of the
cffi module.  tests/test_client_types.py checks that no function is bound
twice and that cffi binds nothing Python does not call.

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
           "ring.h", "pager.h", "queue.h", "stream.h", "device.h"]
SOURCES = [os.path.join("libportal", "src", f)
           for f in ("lock.c", "ring.c", "uffd.c", "pager.c", "special.c", "queue.c",
                     "stream.c", "device.c")]
# The CPython extension libportal._fastpath (setup.py builds it from this list):
# the module (fastpath.c), its objects, and the lock, ring and queue calls they make.
# A change of a header it includes rebuilds it (FASTPATH_DEPENDS).
FASTPATH_SOURCES = [os.path.join("libportal", "src", f)
                    for f in ("fastpath.c", "sharepoint.c", "region.c", "dispatch.c",
                              "sender.c", "producer.c", "transport.c", "lock.c", "ring.c",
                              "queue.c", "inject.c")]
# The C functions _fastpath binds (and which of its calls binds each).
FASTPATH_BINDS = {
    "fayt_ring_post_fault": "SenderRing.post, SenderRing.post_waiting",
    "fayt_ring_wait_return": "SenderRing.wait_return",
    "fayt_queue_put": "QueueProducer.put, QueueProducer.put_raw",
    "fayt_dispatch_step": "dispatch_step",
    "fayt_sp_lock_wait": "SharePointCore.lock",
    "fayt_sp_wake": "SharePointCore.unlock",
    "fayt_sp_wake_all": "SharePointCore._invalidate",
    "fayt_sp_mark_consistent": "SharePointCore.mark_consistent",
    "fayt_map_portal": "call",
}
# Declared in the headers for the C that calls them; Python calls none.
C_ONLY = ("fayt_mmap_at", "fayt_pidfd_signal", "fayt_ring_post", "fayt_ring_clear_doorbell",
          "fayt_ring_return", "fayt_uffd_poison",
          # a C driver's accessors (fayt/device.h); libportal's Device calls
          # fayt_dev_post and fayt_dev_answer, which let its handlers run
          "fayt_dev_write32", "fayt_dev_write64", "fayt_dev_read32", "fayt_dev_read64")
FASTPATH_DEPENDS = sorted(glob.glob(os.path.join("libportal", "src", "*.h"))
                          + glob.glob(os.path.join("libportal", "include", "fayt", "*.h"))
                          + glob.glob(os.path.join("libportal", "include", "fayt", "common",
                                                   "*.h")))
CFFI_ABI = runpy.run_path(os.path.join(HERE, "_versions.py"))["CFFI_ABI"]


def cdef_text(path, leave_out=()):
    """The declarations of the header at path as cffi's cdef reads them,
    without the functions named in leave_out."""
    with open(path) as f:
        text = f.read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    for name in leave_out:
        text = re.sub(r"^[^;{}#]*\b%s\s*\([^;]*\);" % name, "", text, flags=re.M)
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
ffibuilder.cdef("\n".join(cdef_text(os.path.join(INCLUDE, "fayt", h),
                                    leave_out=list(FASTPATH_BINDS) + list(C_ONLY))
                          for h in HEADERS), packed=True)
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
