"""faytd's C core (faytd._core, built from faytd/core/ by faytd/_build.py),
checked at import, and the one struct fayt_core of this faytd process.

Every C function of the core takes `core` (its state: the frame
allocator, the name index, the C path's records, the keeper and the object
pool); faytd's Python passes it, and reads and sets its fields (limits,
counters, the journal's descriptor).  Clients never import this module.
"""
from ._core import ffi, lib

CORE_ABI = 10

if lib.fayt_core_abi() != CORE_ABI:
    raise ImportError("faytd's compiled core does not match its Python code: "
                      "reinstall fayt-portals (pip install -e .)")

core = ffi.new("struct fayt_core *")
if lib.fayt_core_init(core):
    raise MemoryError("faytd: the core's tables")
