"""DIRECT and COW portals, and DMA grants: the client's side.

faytd answers a DIRECT portal with one descriptor per backing object its
frames are in, and the runs: (object, pages, place in the range, offset in
the object).  The range is reserved first (PROT_NONE, anonymous, at
morphology.addr or anywhere), then each run is mapped over it MAP_SHARED |
MAP_FIXED from its offset, and the whole range is marked MADV_DONTFORK, as
every portal is; the descriptors are closed before this returns.  One run
over the whole range (the common case: frames of one object, in order) is
mapped at once, with no reservation.  Mapping with an offset is a plain
mmap(2), reached through cffi's ABI mode: no C of libportal's is needed
for it.

grant(mapping, to, prot, category=...) makes an ANON portal, or a
share-point this process owns, DMA-able: DIRECT of the context (or the
category) it names may map its frames.  See docs/portals.md.
"""
import errno
import fcntl
import os
import struct
from array import array as _array

from cffi import FFI

from . import errors
from ._abi import (ffi, lib, COW_PADDR_REQ, DIRECT_RUN, GRANT_REQ, HANDLE_REQ, PORTAL_REPLY,
                   PORTAL_REQ, PORTAL_REQ_SIZE, portal_reply)
from .portal_req import encode_portal_req, PROT_NONE
from .mapping import Mapping

# libc's mmap(2) and madvise(2) through cffi's ABI mode (a call costs a
# fraction of a ctypes one; nothing is compiled).  Addresses go as intptr_t,
# which every Linux ABI passes as it passes a pointer: no casts.
_libc_ffi = FFI()
_libc_ffi.cdef("intptr_t mmap(intptr_t, size_t, int, int, int, long);"
               "int madvise(intptr_t, size_t, int);")
_libc = _libc_ffi.dlopen(None)
_mmap, _madvise = _libc.mmap, _libc.madvise
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED = 0x01, 0x02, 0x10
_MADV_DONTFORK = 10
_PROT_WRITE = 2
_pack_req = PORTAL_REQ.pack
_unpack_run, _RUN_SIZE = DIRECT_RUN.unpack_from, DIRECT_RUN.size
_MLEN_AT = ffi.offsetof("struct portal_req", "morphology", "length")


def map_fd(addr, length, prot, flags, fd, offset):
    """mmap(2) as it is (addr 0: anywhere): the address, or OSError."""
    p = _mmap(addr, length, prot, flags, fd, offset)
    if p == -1:
        e = _libc_ffi.errno
        raise OSError(e, os.strerror(e))
    return p


def _map_run(addr, pages, prot, flags, fd, offset):
    """One run, at addr (MAP_FIXED) or, addr 0, anywhere: its address.
    A read-only descriptor (a device's register page) under MAP_SHARED is
    mapped without PROT_WRITE, so that a stray store faults."""
    try:
        return map_fd(addr, pages * 4096, prot, flags | (_MAP_FIXED if addr else 0), fd, offset)
    except OSError as e:
        if not (e.errno == errno.EACCES and prot & _PROT_WRITE and flags & _MAP_SHARED
                and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY):
            raise errors.error(e.errno, "portal: mmap of a DIRECT run: " + e.strerror) from None
    return _map_run(addr, pages, prot & ~_PROT_WRITE, flags, fd, offset)


def _map_runs(base, runs, fds, prot, flags):
    for fd_index, pages, at, offset in runs:
        if fd_index >= len(fds):
            raise errors.error(errno.EPROTO, "portal: a DIRECT run names fd %d of %d"
                               % (fd_index, len(fds)))
        _map_run(base + at, pages, prot, flags, fds[fd_index], offset)


def direct_portal(conn, type, prot, length, addr, paddr, portal_cls, mode=0, identifier=None):
    """portal() for DIRECT and COW (mode: share.type, FAYT_COW_*): see the
    module's docstring.  A COW view at least on write maps its runs
    MAP_PRIVATE (FAYT_PORTAL_REPLY_PRIVATE); a strict snapshot's reply
    lists its own frames.  identifier: a COW source named as a share-point
    (share.identifier; morphology.length 0 and no paddr[] unless paddr is
    given too, which faytd refuses)."""
    if identifier is not None:
        body = encode_portal_req(type, prot, length, identifier=identifier, share_type=mode,
                                 addr=addr, paddr=paddr)
        if not paddr:       # the source is the share-point: morphology.length 0
            body = body[:_MLEN_AT] + bytes(8) + body[_MLEN_AT + 8:]
    else:
        try:    # encode_portal_req's work for DIRECT and COW, inline
            body = _pack_req(type, prot, length, 0, mode, 0, 0, 0, addr,
                             length if length > 0 else 0) + _array("Q", paddr).tobytes()
        except (struct.error, OverflowError, TypeError):
            body = encode_portal_req(type, prot, length, share_type=mode, addr=addr, paddr=paddr)
            # (that raises, naming the field, if the inline one could not)
    data, fds = conn.call(lib.FAYT_SYS_PORTAL, body)
    handle, base, reply = None, 0, None
    try:
        reply = portal_reply(data)
        handle, map_length, nframes = reply.handle, reply.map_length, reply.nframes
        if not reply.flags & lib.FAYT_PORTAL_REPLY_DIRECT:
            raise errors.error(errno.EPROTO, "portal: malformed DIRECT reply from faytd")
        at = PORTAL_REPLY.size + PORTAL_REQ_SIZE + 8 * nframes
        if len(data) - at == _RUN_SIZE:
            runs = (_unpack_run(data, at),)
        else:
            runs = [_unpack_run(data, o) for o in range(at, len(data), _RUN_SIZE)]
        flags = _MAP_PRIVATE if reply.flags & lib.FAYT_PORTAL_REPLY_PRIVATE else _MAP_SHARED
        if (not addr and len(runs) == 1 and runs[0][2] == 0
                and runs[0][1] * 4096 == map_length and runs[0][0] < len(fds)):
            # One run over the whole range, anywhere: one mmap, no reservation.
            fd_index, pages, _, offset = runs[0]
            base = _mmap(0, map_length, prot, flags, fds[fd_index], offset)
            if base == -1:
                base = 0
                base = _map_run(0, pages, prot, flags, fds[fd_index], offset)
        else:
            err = ffi.new("int *")
            base = lib.fayt_map_special(map_length, addr, PROT_NONE, err)
            if not base:
                raise errors.error(err[0], "portal: " + {
                    errno.EEXIST: "morphology.addr %#x is already mapped" % addr}.get(
                        err[0], "mmap failed: " + os.strerror(err[0])))
            _map_runs(base, runs, fds, prot, flags)
        if nframes:
            paddr = struct.unpack_from("<%dQ" % nframes, data, at - 8 * nframes)
        if _madvise(base, map_length, _MADV_DONTFORK):
            e = _libc_ffi.errno
            raise errors.error(e, "portal: madvise(MADV_DONTFORK): " + os.strerror(e))
    except BaseException:
        if base:
            lib.fayt_unmap(base, reply.map_length)
        if handle is not None:
            try:
                conn.call(lib.FAYT_SYS_UNMAP, HANDLE_REQ.pack(handle))
            except OSError:
                pass
        raise
    finally:
        for fd in fds:
            os.close(fd)
    return portal_cls(conn, reply, addr=base, paddr=tuple(paddr), type=type, prot=prot)


def grant(mapping: Mapping, to: int = 0, prot: "int | None" = None, *,
          category: "int | None" = None, revoke: bool = False) -> None:
    """Make `mapping` (an ANON Portal, or a SharePoint this process owns)
    DMA-able: DIRECT portals of context `to` (its context id), or of every
    context of `category` (lp.CATEGORY_DRIVER...), may map its frames, up to
    `prot` (default: the mapping's).  revoke: take that grant back (DIRECT
    mappings already made stay).  The grant lasts while `mapping` does."""
    mapping._check()
    if prot is None:
        prot = mapping.prot
    kind = lib.FAYT_GRANT_CATEGORY if category is not None else lib.FAYT_GRANT_CONTEXT
    who = category if category is not None else to
    mapping.connection.call(lib.FAYT_SYS_GRANT, GRANT_REQ.pack(
        mapping.handle, kind, who, prot, lib.FAYT_GRANT_REVOKE if revoke else 0))


def physical(view: Mapping) -> "list[int]":
    """The physical address of each page of `view`, a COW portal at least on
    write.  A page it has written is a private page of this process (found
    in /proc/self/pagemap: present or swapped, and not a file page); faytd
    gives it a frame of its own the first time it is asked (COW_PADDR), and
    a strict snapshot of that frame copies the page from this process.  The
    other pages keep the source's frames.  Writes are never trapped: ask
    again after more writes.  A view whose source is a share-point named
    by identifier lists no source frames: EINVAL."""
    view._check()
    n = view.map_length // 4096
    if len(view.paddr) != n:
        raise errors.error(errno.EINVAL, "physical: view %d lists no source frames (a COW view "
                           "whose source is a share-point by identifier: its unwritten pages "
                           "are the share-point's paddr from offset 0)" % view.handle)
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(view.addr // 4096 * 8)
        entries = struct.unpack("<%dQ" % n, f.read(8 * n))
    written = [i for i, e in enumerate(entries) if e >> 62 & 3 and not e >> 61 & 1]
    out = list(view.paddr)
    if written:
        data, fds = view.connection.call(lib.FAYT_SYS_COW_PADDR, COW_PADDR_REQ.pack(
            view.handle, view.addr, len(written), 0) + struct.pack("<%dI" % len(written),
                                                                   *written))
        for fd in fds:
            os.close(fd)
        for i, pa in zip(written, struct.unpack("<%dQ" % len(written), data)):
            out[i] = pa
    return out
