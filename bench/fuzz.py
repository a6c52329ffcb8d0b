"""Fuzz faytd at scale: mutated system calls and scribbled shared memory
from several uids at once, an honest client checking answers throughout,
and at the end faytd's state back at its baseline.

    python -m bench.fuzz [--requests N] [--seed S] [--uids 0,65534] [--procs P]
                         [--socket PATH] [--json FILE]

Without --socket it starts a faytd of its own (FUZZ_CONFIG: a socket every
uid may reach, uid 65534 in a category with every class but MMIO windows,
notification handlers, any notify target and the chains "fz*").  With
--socket it fuzzes that faytd (its pid from SO_PEERCRED), which must let
the fuzzing uids connect.  Run as root for several uids; otherwise only
the caller's own uid fuzzes.

What runs, each a process forked from this one (os.setuid in the child):
- per uid, P request fuzzers: valid requests of every system call,
  mutated (bit flips, fields set to edge values, truncated, oversized,
  random bodies, unknown ops and flags), some with descriptors of the
  wrong kind attached through SCM_RIGHTS (a pipe, an eventfd, a socket, a
  directory, a memfd, /dev/null, or more descriptors than faytd takes);
  until --requests requests have been sent in all;
- per uid, one scribbler: episodes in short-lived children that take each
  shared structure a client or a chain server can write (the context
  page's lock records, stack records and notification state, a
  share-point's meta page, rings as sender and as target, the target's
  hint, faytd's notice ring, notification stacks, a chain channel with its
  request slots), write random bytes over it, make the calls that have
  faytd read it, and die, often without cleaning up;
- an honest pair (root, or the caller): share-point create/attach/write/
  read/lock/add/destroy round trips and notifications with a return, each
  checked byte for byte, while hostile senders scribble on rings into the
  honest target.

The end: the fuzzers stop, the honest pair makes its last checked round,
faytd must still run and answer HELLO, a create and a notification, and
its descriptor count, the keeper's sealed objects, /dev/shm's fayt*
entries, its contexts, share-points and free frames must equal the
baseline taken before the start.  Exit status 0 if so and nothing was
found, 1 otherwise; the findings (each with the worker, its seed and the
request's bytes in hex) are printed.  A run is reproducible per worker:
worker w of a run with seed S draws from random.Random("S/w").
"""
import argparse
import array
import collections
import ctypes
import errno
import faulthandler
import json
import mmap
import os
import random
import select
import signal
import socket
import struct
import sys
import tempfile
import time
import traceback
import uuid

import libportal as lp
from libportal import rings as _rings  # noqa: F401 (imported before any fork)
from libportal import special as _special  # noqa: F401
from libportal._abi import (ffi, lib, REQ_HDR, REP_HDR, HELLO_REQ, HELLO_REPLY, HANDLE_REQ,
                            LIST_REQ, PORTAL_REPLY, NOTIFY_INSTALL, NOTIFY_OPEN, RING_REPLY,
                            STACK_REQ, STACK_REPLY, NOTIFY_SUBSCRIBE, CHAIN_JOIN,
                            CHAIN_JOIN_REPLY, CHAIN_LEAVE, CHAIN_BACK, CHAIN_BACK_REPLY,
                            GRANT_REQ, COW_PADDR_REQ, PORTAL_REQ_SIZE)
from libportal.portal_req import encode_portal_req

NOBODY = 65534
PAGE = 4096
REPLY_WAIT = 30.0           # seconds without a reply that count as a hang
HONEST_WAIT = 10.0          # the honest client's notification timeout

FUZZ_CONFIG = {
    "socket_mode": "0666",
    "pager_timeout": 1,
    "policy": {
        "categories": {
            "core": {"classes": ["SHARE", "DIRECT", "ANON", "COW", "SPECIAL"],
                     "notify_handlers": True, "mmio": ["*"], "chains": ["*"], "notify": ["*"]},
            "hostile": {"classes": ["SHARE", "DIRECT", "ANON", "COW", "SPECIAL"],
                        "notify_handlers": True,
                        "chains": ["fz*"], "notify": ["*"]},
        },
        "rules": [{"uid": 0, "category": "core"}, {"uid": "$owner", "category": "core"}],
        "default": "hostile",
    },
}

OPS = [lib.FAYT_SYS_HELLO, lib.FAYT_SYS_PORTAL, lib.FAYT_SYS_UNMAP, lib.FAYT_SYS_SHARE_DESTROY,
       lib.FAYT_SYS_LIST_SHARE, lib.FAYT_SYS_LIST_CONTEXTS, lib.FAYT_SYS_UNMAP_DESTROY,
       lib.FAYT_SYS_NOTIFY_INSTALL, lib.FAYT_SYS_NOTIFY_REMOVE, lib.FAYT_SYS_NOTIFY_OPEN,
       lib.FAYT_SYS_NOTIFY_FETCH, lib.FAYT_SYS_NOTIFY_STACK_ALLOC,
       lib.FAYT_SYS_NOTIFY_STACK_FREE, lib.FAYT_SYS_NOTIFY_PROVIDER,
       lib.FAYT_SYS_NOTIFY_SUBSCRIBE, lib.FAYT_SYS_NOTIFY_CLOSE, lib.FAYT_SYS_NOTIFY_HINT,
       lib.FAYT_SYS_NOTIFY_RING, lib.FAYT_SYS_NOTIFY_RELEASE, lib.FAYT_SYS_CHAIN_JOIN,
       lib.FAYT_SYS_CHAIN_LEAVE, lib.FAYT_SYS_CHAIN_BACK, lib.FAYT_SYS_CHAIN_UNBACK,
       lib.FAYT_SYS_STATS, lib.FAYT_SYS_GRANT, lib.FAYT_SYS_COW_PADDR]
OP_NAMES = {getattr(lib, n): n[len("FAYT_SYS_"):].lower()
            for n in dir(lib) if n.startswith("FAYT_SYS_")}
EDGE32 = [0, 1, 2, 0x7f, 0x80, 0xff, 0x1000, 0x7fff, 0xffff, 0x7fffffff, 0x80000000,
          0xfffffffe, 0xffffffff]
EDGE64 = EDGE32 + [1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 0xfffffffffffff000]
FD_KINDS = ["pipe", "eventfd", "socket", "dir", "memfd", "devnull", "many", "mixed"]

# -- the shared board: counters and ids the processes publish ----------------
#
# One anonymous shared mapping made before any fork: per worker slot, the
# requests it sent; a stop word; the honest target's context id; the
# scribblers' current target ids.

BOARD_SLOTS = 64
_OFF_STOP = 0
_OFF_HONEST_TARGET = 8
_OFF_TARGETS = 16            # 8 uint32 ids of hostile targets
_OFF_COUNTS = 64             # BOARD_SLOTS uint64 counters


class Board:
    def __init__(self):
        self.m = mmap.mmap(-1, PAGE)

    def _get(self, off, fmt):
        return struct.unpack_from(fmt, self.m, off)[0]

    def _put(self, off, fmt, v):
        struct.pack_into(fmt, self.m, off, v)

    stop = property(lambda s: s._get(_OFF_STOP, "<Q"), lambda s, v: s._put(_OFF_STOP, "<Q", v))
    honest_target = property(lambda s: s._get(_OFF_HONEST_TARGET, "<I"),
                             lambda s, v: s._put(_OFF_HONEST_TARGET, "<I", v))

    def target(self, i):
        return self._get(_OFF_TARGETS + 4 * (i % 8), "<I")

    def set_target(self, i, v):
        self._put(_OFF_TARGETS + 4 * (i % 8), "<I", v)

    def add(self, slot, n=1):
        off = _OFF_COUNTS + 8 * slot
        self._put(off, "<Q", self._get(off, "<Q") + n)

    def count(self, slot):
        return self._get(_OFF_COUNTS + 8 * slot, "<Q")


# -- wrong-kind descriptors ------------------------------------------------------

def wrong_fds(rng, kind):
    """Descriptors of the kind asked for (closed by the caller)."""
    if kind == "pipe":
        r, w = os.pipe()
        return [r, w]
    if kind == "eventfd":
        return [os.eventfd(0)]
    if kind == "socket":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return [a.detach(), b.detach()]
    if kind == "dir":
        return [os.open("/", os.O_RDONLY | os.O_DIRECTORY)]
    if kind == "memfd":
        fd = os.memfd_create("fuzz", 0)
        os.ftruncate(fd, rng.choice([0, 1, PAGE, 3 * PAGE]))
        return [fd]
    if kind == "devnull":
        return [os.open("/dev/null", os.O_RDWR)]
    if kind == "many":
        n = rng.choice([9, 16, 64, 200])
        fd = os.open("/dev/null", os.O_RDONLY)
        out = [fd] + [os.dup(fd) for _ in range(n - 1)]
        return out
    out = []
    for k in rng.sample(FD_KINDS[:6], 3):
        out.extend(wrong_fds(rng, k))
    return out


def close_all(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# -- raw connections ----------------------------------------------------------

class Lost(Exception):
    """faytd closed the connection (a protocol violation, as documented)."""


class Hang(Exception):
    pass


class Raw:
    """A raw SOCK_SEQPACKET connection: requests as bytes, replies parsed."""

    def __init__(self, path, hello=True):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.s.connect(path)
        self.seq = 0
        self.context_id = 0
        self.noreply = set()
        self.history = collections.deque(maxlen=6)   # (hex of the request, reply wanted)
        if hello:
            err, body, fds = self.call(lib.FAYT_SYS_HELLO, HELLO_REQ.pack(lib.FAYT_WIRE_ABI, 0))
            close_all(fds)
            if err:
                raise OSError(err, body.decode("utf-8", "replace"))
            self.context_id = HELLO_REPLY.unpack_from(body)[0]

    def close(self):
        self.s.close()

    def header(self, op, flags=0):
        self.seq = (self.seq + 1) & 0xffffffff
        return REQ_HDR.pack(lib.FAYT_REQ_MAGIC, op, flags, self.seq, threading_tid())

    def send(self, msg, fds=()):
        try:
            if fds:
                self.s.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", fds))])
            else:
                self.s.send(msg)
        except OSError as e:
            if e.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                raise Lost() from None
            if e.errno in (errno.EMSGSIZE, errno.ETOOMANYREFS, errno.EINVAL):
                return False
            raise
        return True

    def recv(self, timeout):
        """(op, seq, err, body, fds) of the next reply."""
        r, _, _ = select.select([self.s], [], [], timeout)
        if not r:
            raise Hang()
        try:
            data, anc, flags, _ = self.s.recvmsg(lib.FAYT_MSG_MAX + 1,
                                                 socket.CMSG_SPACE(256 * 4))
        except (ConnectionResetError, BrokenPipeError):
            raise Lost() from None
        fds = []
        for level, typ, cdata in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(cdata[:len(cdata) - len(cdata) % 4])
                fds.extend(a)
        if not data:
            close_all(fds)
            raise Lost()
        if len(data) < REP_HDR.size:
            close_all(fds)
            raise WrongAnswer("reply of %d bytes" % len(data))
        magic, op, nfds, seq, err = REP_HDR.unpack_from(data)
        if magic != lib.FAYT_REP_MAGIC:
            close_all(fds)
            raise WrongAnswer("reply magic %#x" % magic)
        if nfds != len(fds):
            close_all(fds)
            raise WrongAnswer("reply says %d fds, carried %d" % (nfds, len(fds)))
        return op, seq, err, data[REP_HDR.size:], fds

    def exchange(self, msg, fds=(), expect_reply=True, timeout=REPLY_WAIT):
        """Send msg; its reply (err, body, fds), or None when none is due."""
        seq = REQ_HDR.unpack_from(msg)[3] if len(msg) >= REQ_HDR.size else None
        self.history.append((msg[:64].hex(), len(msg), len(fds), expect_reply))
        if not self.send(msg, fds):
            return None
        if not expect_reply:
            if seq is not None:
                self.noreply.add(seq)
            return None
        while True:
            op, rseq, err, body, rfds = self.recv(timeout)
            if rseq == seq:
                self.noreply.clear()
                return err, body, rfds
            close_all(rfds)
            if rseq in self.noreply:
                self.noreply.discard(rseq)
                continue
            raise WrongAnswer("reply seq %d, expected %s" % (rseq, seq))

    def call(self, op, body=b"", flags=0, fds=()):
        return self.exchange(self.header(op, flags) + body, fds)


class WrongAnswer(Exception):
    pass


def threading_tid():
    return _TID[0] or _set_tid()


_TID = [0]


def _set_tid():
    _TID[0] = threading_get_native_id()
    return _TID[0]


def threading_get_native_id():
    import threading
    return threading.get_native_id()


# -- request generation ---------------------------------------------------------

class Memory:
    """What a request fuzzer learned from replies, fed back into requests."""

    def __init__(self):
        self.handles = collections.deque(maxlen=64)
        self.names = collections.deque(maxlen=32)
        self.rings = collections.deque(maxlen=16)
        self.stacks = collections.deque(maxlen=16)
        self.chains = collections.deque(maxlen=8)
        self.chains_ids = collections.deque(maxlen=8)
        self.contexts = collections.deque(maxlen=16)
        self.paddrs = collections.deque(maxlen=64)


def _name(rng, prefix="fz"):
    n = rng.choice([1, 4, 8, 12, 40, 255, 256, 300])
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789._-/"
    return prefix + "".join(rng.choice(alphabet) for _ in range(max(0, n - len(prefix))))


def _pick(rng, seq, fallback):
    return rng.choice(seq) if seq and rng.random() < 0.8 else fallback


def valid_request(rng, op, mem, ctx_id):
    """(body, flags) of a plausible request of op."""
    pages = rng.choice([1, 1, 2, 3, 8, 64])
    if op == lib.FAYT_SYS_HELLO:
        return HELLO_REQ.pack(rng.choice([lib.FAYT_WIRE_ABI, 0, 2]), 0), 0
    if op == lib.FAYT_SYS_PORTAL:
        kind = rng.randrange(7)
        if kind == 0:
            return encode_portal_req(lp.ANON, lp.PROT_RW, pages * PAGE), 0
        if kind in (1, 2):
            if kind == 1 or not mem.names:
                name = _name(rng)
                mem.names.append(name)
                return encode_portal_req(lp.SHARE | lp.ANON, lp.PROT_RW, pages * PAGE,
                                         identifier=name, create=1), 0
            return encode_portal_req(lp.SHARE | lp.ANON, rng.choice([1, 3]), 0,
                                     identifier=rng.choice(mem.names), create=0), 0
        if kind == 3:
            return encode_portal_req(lp.SPECIAL, lp.PROT_READ, pages * PAGE,
                                     chain=_pick(rng, mem.chains, "fzchain"),
                                     message="m%d" % rng.randrange(100)), 0
        if kind == 4:
            return encode_portal_req(lp.SPECIAL | lp.SHARE, lp.PROT_RW, pages * PAGE,
                                     identifier=_name(rng), create=1, chain="fzchain",
                                     message="x"), 0
        if kind == 5:
            cls = rng.choice([lp.DIRECT, lp.COW, lp.DIRECT | lp.SHARE])
            paddr = list(mem.paddrs)[-pages:] if len(mem.paddrs) >= pages and rng.random() < 0.7 \
                else [0x100000 + PAGE * rng.randrange(1 << 16) for _ in range(pages)]
            return encode_portal_req(cls, rng.choice([lp.PROT_READ, lp.PROT_RW]), pages * PAGE,
                                     identifier=_name(rng) if cls & lp.SHARE else None,
                                     create=1 if cls & lp.SHARE else 0,
                                     share_type=rng.choice([0, 1]) if cls == lp.COW else 0,
                                     paddr=paddr), 0
        return encode_portal_req(rng.randrange(0x40), rng.randrange(8),
                                 rng.choice([0, PAGE, -PAGE, 1, 1 << 30]),
                                 identifier=_name(rng), create=rng.randrange(3),
                                 share_type=rng.randrange(3)), 0
    if op in (lib.FAYT_SYS_UNMAP, lib.FAYT_SYS_SHARE_DESTROY, lib.FAYT_SYS_UNMAP_DESTROY):
        flags = lib.FAYT_REQ_NOREPLY if op != lib.FAYT_SYS_SHARE_DESTROY and \
            rng.random() < 0.3 else 0
        return HANDLE_REQ.pack(_pick(rng, mem.handles, rng.randrange(1 << 20))), flags
    if op in (lib.FAYT_SYS_LIST_SHARE, lib.FAYT_SYS_LIST_CONTEXTS):
        return (b"" if rng.random() < 0.3 else LIST_REQ.pack(rng.randrange(64))), 0
    if op in (lib.FAYT_SYS_NOTIFY_INSTALL, lib.FAYT_SYS_NOTIFY_REMOVE,
              lib.FAYT_SYS_NOTIFY_PROVIDER):
        return NOTIFY_INSTALL.pack(rng.choice([0, 1, 5, 63, 64, -1, -2]), 0,
                                   rng.choice([0, 1, rng.randrange(1 << 64)])), 0
    if op in (lib.FAYT_SYS_NOTIFY_OPEN, lib.FAYT_SYS_NOTIFY_CLOSE):
        return NOTIFY_OPEN.pack(_pick(rng, mem.contexts, max(0, ctx_id + rng.randrange(-8, 8))),
                                0), 0
    if op == lib.FAYT_SYS_NOTIFY_FETCH:
        return LIST_REQ.pack(rng.randrange(16)), 0
    if op == lib.FAYT_SYS_NOTIFY_STACK_ALLOC:
        return STACK_REQ.pack(rng.choice([0, PAGE, 2 * PAGE, 1 << 20, (1 << 20) + PAGE, 17]),
                              0), 0
    if op == lib.FAYT_SYS_NOTIFY_STACK_FREE:
        return HANDLE_REQ.pack(_pick(rng, mem.stacks, rng.randrange(1 << 16))), 0
    if op == lib.FAYT_SYS_NOTIFY_SUBSCRIBE:
        return NOTIFY_SUBSCRIBE.pack(rng.choice([1, 2, 3, 0, 4]), rng.choice([0, 7, 63, -1, 64]),
                                     _pick(rng, mem.contexts, 0), 0), 0
    if op == lib.FAYT_SYS_NOTIFY_HINT:
        return b"", 0
    if op == lib.FAYT_SYS_NOTIFY_RING:
        return HANDLE_REQ.pack(_pick(rng, mem.contexts, ctx_id)), 0
    if op == lib.FAYT_SYS_NOTIFY_RELEASE:
        return HANDLE_REQ.pack(_pick(rng, mem.rings, rng.randrange(64))), 0
    if op == lib.FAYT_SYS_CHAIN_JOIN:
        name = rng.choice(["fzchain", "fz%d" % rng.randrange(4), "other", _name(rng)])
        return CHAIN_JOIN.pack(rng.choice([0, 1, 8, 64, 65]),
                               rng.choice([0, PAGE, 65536, 4096 * 1024, 4096 * 1024 + PAGE, 5]),
                               rng.choice([0, 1, 2]), rng.choice([0, 1, 100, 0xffffffff]),
                               name.encode()[:255]), 0
    if op == lib.FAYT_SYS_CHAIN_LEAVE:
        return CHAIN_LEAVE.pack(_pick(rng, mem.chains_ids, rng.randrange(8)), 0), 0
    if op in (lib.FAYT_SYS_CHAIN_BACK, lib.FAYT_SYS_CHAIN_UNBACK):
        msg = ("m%d" % rng.randrange(100)).encode()
        return CHAIN_BACK.pack(_pick(rng, mem.chains_ids, rng.randrange(8)),
                               rng.choice([len(msg), 0, 4095, 4096, 0xffffffff]),
                               0 if op == lib.FAYT_SYS_CHAIN_UNBACK else
                               _pick(rng, mem.handles, rng.randrange(64)), msg), 0
    if op == lib.FAYT_SYS_STATS:
        return b"", 0
    if op == lib.FAYT_SYS_GRANT:
        kind = rng.choice([1, 2, 0, 3])
        to = _pick(rng, mem.contexts, ctx_id) if kind == 1 else rng.choice([1, 2, 3, 0, 9])
        return GRANT_REQ.pack(_pick(rng, mem.handles, rng.randrange(64)), kind, to,
                              rng.choice([1, 3, 7, 0, -1]), rng.choice([0, 0, 1, 2])), 0
    if op == lib.FAYT_SYS_COW_PADDR:
        n = rng.choice([0, 1, 2, 8, 100])
        return COW_PADDR_REQ.pack(_pick(rng, mem.handles, rng.randrange(64)),
                                  rng.choice([0, 0x7f0000000000, rng.randrange(1 << 47) & ~4095]),
                                  n, 0) + struct.pack("<%dI" % n, *(rng.randrange(16)
                                                                    for _ in range(n))), 0
    return bytes(rng.randrange(256) for _ in range(rng.randrange(32))), 0


def mutate(rng, hdr, body):
    """A mutated (header, body): what kind of mutation, the bytes."""
    k = rng.random()
    if k < 0.12:
        return "valid", hdr, body
    if k < 0.40 and body:
        b = bytearray(body)
        for _ in range(rng.choice([1, 1, 2, 4, 8])):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return "bitflip", hdr, bytes(b)
    if k < 0.62 and len(body) >= 4:
        b = bytearray(body)
        w = rng.choice([4, 8]) if len(b) >= 8 else 4
        i = rng.randrange(0, len(b) - w + 1)
        i -= i % w if rng.random() < 0.7 else 0
        v = rng.choice(EDGE64 if w == 8 else EDGE32)
        b[i:i + w] = v.to_bytes(w, "little")
        return "field", hdr, bytes(b)
    if k < 0.72:
        return "truncated", hdr, body[:rng.randrange(len(body) + 1)] if body else b""
    if k < 0.80:
        extra = rng.choice([1, 3, 8, 64, 4096])
        if rng.random() < 0.03:
            extra = lib.FAYT_MSG_MAX - len(hdr) - len(body) + rng.choice([0, 1, 100])
        return "extended", hdr, body + bytes(rng.randrange(256) for _ in range(min(extra, 64))) \
            + bytes(max(0, extra - 64))
    if k < 0.88:
        n = rng.choice([0, 1, 4, 8, 16, 40, 64, 300])
        return "random", hdr, bytes(rng.randrange(256) for _ in range(n))
    if k < 0.94:
        h = bytearray(hdr)
        # op, flags or tid (not the magic nor the seq: those only disconnect)
        field = rng.choice([(4, 2), (6, 2), (12, 4)])
        v = rng.choice(EDGE32)
        h[field[0]:field[0] + field[1]] = (v & ((1 << (8 * field[1])) - 1)).to_bytes(
            field[1], "little")
        return "header", bytes(h), body
    if k < 0.97:
        h = bytearray(hdr)
        # any byte but the seq's: a flipped seq may repeat an earlier
        # request's, and then two replies answer one seq (both right)
        h[rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15])] ^= 1 << rng.randrange(8)
        return "header-flip", bytes(h), body
    return "short", hdr[:rng.randrange(len(hdr))], b""


def learn(mem, op, err, body, own_id):
    """Feed ids from a successful reply back into later requests."""
    if err:
        return
    try:
        if op == lib.FAYT_SYS_PORTAL and len(body) >= PORTAL_REPLY.size:
            mem.handles.append(PORTAL_REPLY.unpack_from(body)[0])
            nframes = PORTAL_REPLY.unpack_from(body)[4]
            at = PORTAL_REPLY.size + PORTAL_REQ_SIZE
            for i in range(min(nframes, 8)):
                if at + 8 * i + 8 <= len(body):
                    mem.paddrs.append(struct.unpack_from("<Q", body, at + 8 * i)[0])
        elif op == lib.FAYT_SYS_NOTIFY_OPEN and len(body) >= RING_REPLY.size:
            rid, sender, target = RING_REPLY.unpack_from(body)[:3]
            mem.rings.append(rid)
        elif op == lib.FAYT_SYS_NOTIFY_FETCH:
            for i in range(len(body) // RING_REPLY.size):
                mem.rings.append(RING_REPLY.unpack_from(body, i * RING_REPLY.size)[0])
        elif op == lib.FAYT_SYS_NOTIFY_STACK_ALLOC and len(body) >= STACK_REPLY.size:
            mem.stacks.append(STACK_REPLY.unpack_from(body)[0])
        elif op == lib.FAYT_SYS_CHAIN_JOIN and len(body) >= CHAIN_JOIN_REPLY.size:
            mem.chains_ids.append(CHAIN_JOIN_REPLY.unpack_from(body)[0])
        elif op == lib.FAYT_SYS_LIST_CONTEXTS:
            for c in json.loads(body).get("contexts", [])[:16]:
                if c.get("id") and c["id"] != own_id:
                    mem.contexts.append(c["id"])
        elif op == lib.FAYT_SYS_LIST_SHARE:
            for s in json.loads(body)[:8]:
                if isinstance(s.get("identifier"), str):
                    mem.names.append(s["identifier"])
    except (ValueError, KeyError, TypeError, AttributeError):
        pass


class Findings:
    def __init__(self, worker, seed):
        self.worker, self.seed = worker, seed
        self.items = []

    def add(self, what, **kw):
        if len(self.items) < 50:
            kw.update(worker=self.worker, seed=self.seed, what=what)
            self.items.append(kw)


# -- the request fuzzer -----------------------------------------------------------

def request_fuzzer(path, board, slot, wseed, quota_share, out):
    rng = random.Random(wseed)
    # A raw client that installs, subscribes or fetches has told faytd its
    # runtime handles the doorbell (docs/notifications.md): this one ignores it.
    signal.signal(_rings.DOORBELL, signal.SIG_IGN)
    mem = Memory()
    find = Findings("requests/%d uid %d" % (slot, os.getuid()), wseed)
    stats = collections.Counter()
    errs = collections.Counter()
    conn = None
    sent = 0
    since_connect = 0
    while not board.stop:
        if conn is None:
            try:
                conn = Raw(path, hello=rng.random() < 0.95)
                stats["connections"] += 1
                since_connect = 0
            except OSError as e:
                stats["connect_refused_" + errno.errorcode.get(e.errno, str(e.errno))] += 1
                time.sleep(0.01)
                continue
        op = rng.choice(OPS) if rng.random() < 0.97 else rng.choice([0, 20, 31, 39, 255,
                                                                      0xffff])
        body, flags = valid_request(rng, op, mem, conn.context_id)
        hdr = conn.header(op, flags)
        how, hdr, body = mutate(rng, hdr, body)
        fds = []
        if rng.random() < 0.15:
            fds = wrong_fds(rng, rng.choice(FD_KINDS))
            stats["fds_" + ("many" if len(fds) > 8 else "some")] += 1
        msg = hdr + body
        stats["mut_" + how] += 1
        try:
            mop = struct.unpack_from("<H", msg, 4)[0] if len(msg) >= 6 else None
            mflags = struct.unpack_from("<H", msg, 6)[0] if len(msg) >= 8 else 0
            expect = not (mflags == lib.FAYT_REQ_NOREPLY and
                          mop in (lib.FAYT_SYS_UNMAP, lib.FAYT_SYS_UNMAP_DESTROY))
            if len(msg) < REQ_HDR.size or struct.unpack_from("<I", msg)[0] != \
                    lib.FAYT_REQ_MAGIC:
                expect = False      # faytd disconnects: the next recv says so
            got = conn.exchange(msg, fds, expect_reply=expect)
            sent += 1
            if got is None:
                if not expect:
                    # a disconnect or a late failure is read with the next call
                    r, _, _ = select.select([conn.s], [], [], 0)
                    if r and len(msg) < REQ_HDR.size:
                        raise Lost()
            else:
                err, rbody, rfds = got
                close_all(rfds)
                errs[(OP_NAMES.get(mop, "op_%s" % mop), errno.errorcode.get(err, str(err))
                      if err else "ok")] += 1
                learn(mem, mop, err, rbody, conn.context_id)
                if err and not 0 < err < 4096:
                    find.add("reply err %d" % err, op=mop, request=msg.hex())
                if not err and mop == lib.FAYT_SYS_HELLO and since_connect > 0:
                    pass
        except Lost:
            stats["disconnected"] += 1
            conn.close()
            conn = None
        except Hang:
            find.add("no reply within %.0fs" % REPLY_WAIT, op=mop, mutation=how,
                     request=msg.hex()[:2048], fds=len(fds))
            conn.close()
            conn = None
        except WrongAnswer as e:
            find.add("wrong answer: %s" % e, op=mop, mutation=how, request=msg.hex()[:2048],
                     history=list(conn.history))
            conn.close()
            conn = None
        finally:
            close_all(fds)
        board.add(slot)
        since_connect += 1
        if conn is not None and (since_connect > rng.choice([50, 200, 1000])
                                 and rng.random() < 0.02):
            conn.close()            # the context goes, with what it held
            conn = None
    if conn is not None:
        conn.close()
    out.update(kind="requests", uid=os.getuid(), sent=sent, stats=dict(stats),
               errors={"%s %s" % k: v for k, v in errs.items()}, findings=find.items)


# -- the scribbler ------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def scribble(rng, addr, length, n=None):
    """Write random bytes, edge words or zeros over [addr, addr+length)."""
    buf = ffi.buffer(ffi.cast("char *", addr), length)
    for _ in range(n or rng.choice([1, 2, 4, 16, 64])):
        k = rng.random()
        off = rng.randrange(length)
        if k < 0.4:
            w = rng.choice([1, 4, 8])
            off -= off % w
            if off + w > length:
                continue
            v = rng.choice(EDGE64) & ((1 << (8 * w)) - 1)
            buf[off:off + w] = v.to_bytes(w, "little")
        elif k < 0.8:
            m = min(length - off, rng.choice([1, 4, 16, 64]))
            buf[off:off + m] = bytes(rng.randrange(256) for _ in range(m))
        else:
            m = min(length - off, rng.choice([16, 256, PAGE]))
            buf[off:off + m] = bytes(m)


def _field(cdata_type, field):
    return ffi.offsetof(cdata_type, field)


def scribble_context(rng, conn, sps):
    """The context page: lock records (with ids of share-points it maps and
    others), stack records, notify state, ring records, saved states."""
    page = conn.context_page
    size = ffi.sizeof("struct fayt_context_page")
    t = "struct fayt_context_page"
    held = page + _field(t, "held")
    buf = ffi.buffer(ffi.cast("char *", page), size)
    for i in range(rng.randrange(1, 64)):
        sp_id = rng.choice([s.sp_id for s in sps] + [0, 1, rng.randrange(1 << 32)]) \
            if sps else rng.randrange(1 << 32)
        state = rng.choice([0, 1, 2, 3, 4, 0xffffffff])
        j = rng.randrange(64)
        struct.pack_into("<II", buf, held - page + 8 * j, sp_id, state)
    for part in ("notify", "rings", "stacks", "saved", "actions"):
        if rng.random() < 0.5:
            off = _field(t, part)
            ln = ffi.sizeof(ffi.typeof(getattr(ffi.cast("struct fayt_context_page *", page),
                                               part)))
            scribble(rng, page + off, ln)
    if rng.random() < 0.2:
        scribble(rng, page, 16)             # magic, version, pid, context id


def sp_meta_scribble(rng, sp):
    scribble(rng, sp.addr, min(PAGE, sp.map_length) if hasattr(sp, "map_length") else PAGE)


def episode(path, rng, board, role, uid_index):
    """One scribbling episode, in a child that dies at its end."""
    conn = lp.Connection(path, faytd_uid=0)
    sps = []
    if role in ("share", "context", "stacks"):
        for i in range(rng.randrange(1, 4)):
            name = "fzs-%s" % uuid.uuid4().hex[:10]
            try:
                sps.append(lp.share_create(name, rng.choice([PAGE, 2 * PAGE, 10 * PAGE]),
                                           connection=conn))
            except OSError:
                pass
        for sp in list(sps):
            try:
                sps.append(lp.share_attach(sp.identifier, connection=conn))
            except OSError:
                pass
        for sp in sps:
            try:
                sp.lock(timeout=0.01)
            except OSError:
                pass
            if rng.random() < 0.5:
                break
    if role == "share":
        for sp in sps:
            scribble(rng, sp.addr, PAGE)
            # Bounded calls only: a fused call waits for the lock without a
            # deadline, and the scribble may have left it looking held.
            try:
                got = sp.try_lock()
                if got == errno.EBUSY:
                    got = sp.lock(timeout=0.01)
                if got == errno.EOWNERDEAD:
                    sp.mark_consistent()
                sp.unlock()
                if sp.try_lock() == 0:      # free: the fused calls take it at once
                    sp.unlock()
                    sp.write(0, b"x")
                    sp.read(0, 1)
                    sp.add(0, 1)
            except (OSError, ValueError, RuntimeError):
                pass
        scribble_context(rng, conn, sps)
    elif role == "context":
        scribble_context(rng, conn, sps)
        try:
            conn.stats()
        except OSError:
            pass
    elif role == "stacks":
        stacks = []
        for _ in range(rng.randrange(1, 5)):
            try:
                stacks.append(lp.notification_stack_alloc(rng.choice([0, PAGE, 2 * PAGE]),
                                                          connection=conn))
            except OSError:
                pass
        scribble_context(rng, conn, sps)
        rt = lp.notification.runtime(conn)
        for st in list(rt.stacks.values()):
            scribble(rng, st.addr, st.size)
        for h in stacks:
            try:
                lp.notification_stack_free(h if rng.random() < 0.7 else rng.randrange(1 << 20),
                                           connection=conn)
            except (OSError, TypeError):
                pass
    elif role == "sender":
        target = board.honest_target if rng.random() < 0.5 else board.target(
            rng.randrange(8))
        if target:
            try:
                r = lp.rings.Ring.open(conn, target)
            except OSError:
                r = None
            if r is not None:
                for _ in range(rng.randrange(1, 4)):
                    try:
                        fl = rng.choice([0, lib.FAYT_NOTIFY_NOWAIT, lib.FAYT_NOTIFY_IMMEDIATE])
                        r.port.post_waiting(rng.randrange(64), b"hostile", fl, 1000000)
                    except OSError:
                        pass
                    scribble(rng, r.addr, r.length)
                    if r.hint:
                        scribble(rng, r.hint, PAGE, 2)
                    try:
                        conn.call(lib.FAYT_SYS_NOTIFY_RING, HANDLE_REQ.pack(target))
                    except OSError:
                        pass
                if rng.random() < 0.5:
                    try:
                        conn.call(lib.FAYT_SYS_NOTIFY_CLOSE, NOTIFY_OPEN.pack(target, 0))
                    except OSError:
                        pass
                r.close()
            # libportal's own sender on the (maybe) scribbled pair
            try:
                lp.notify(target, rng.randrange(4), b"p", nowait=True, timeout=0.05,
                          connection=conn)
            except (OSError, ValueError):
                pass
    elif role == "target":
        slot = rng.randrange(8)
        try:
            for i in (1, 2, 3):
                lp.install_handler(i, lambda p, i, s: 0, connection=conn)
            lp.subscribe(lp.PEER_DIED, 2, 0, connection=conn)
            lp.subscribe(lp.SP_DESTROYED, 3, 0, connection=conn)
        except OSError:
            pass
        board.set_target(slot, conn.context_id)
        rt = lp.notification.runtime(conn)
        deadline = time.monotonic() + rng.choice([0.05, 0.2, 0.5])
        while time.monotonic() < deadline and not board.stop:
            try:
                lp.notification_wait(timeout=0.02, connection=conn)
            except OSError:
                pass
            try:
                sp = lp.share_create("fzd-%s" % uuid.uuid4().hex[:10], PAGE, connection=conn)
                sp.destroy()        # an SP_DESTROYED notice to ourselves
            except OSError:
                pass
            for r in list(rt.rings_in.values()):    # both senders' and faytd's notice rings
                if rng.random() < 0.5 and r.addr:
                    scribble(rng, r.addr, r.length, rng.choice([1, 4]))
            if rt.hint and rng.random() < 0.3:
                scribble(rng, rt.hint, PAGE, 2)
            for rid in list(rt.rings_in)[:1]:
                if rng.random() < 0.2:
                    try:
                        conn.call(lib.FAYT_SYS_NOTIFY_RELEASE, HANDLE_REQ.pack(rid))
                    except OSError:
                        pass
        if rng.random() < 0.5:
            scribble_context(rng, conn, [])
        board.set_target(slot, 0)
    elif role == "chain":
        chain_episode(path, rng, conn, uid_index)
    if rng.random() < 0.3:
        conn.close()
    os.kill(os.getpid(), signal.SIGKILL)   # die as a crash would: faytd cleans up


def _toucher(path, chain, npages):
    """A SPECIAL client of `chain` (in its own child, which may die of SIGBUS)."""
    try:
        conn = lp.Connection(path, faytd_uid=0)
        p = lp.portal(lp.SPECIAL, lp.PROT_READ, npages * PAGE, chain=chain, message="fz",
                      connection=conn)
        for i in range(npages):
            p.read(i * PAGE, 8)
    except BaseException:
        pass
    os._exit(0)


def chain_episode(path, rng, conn, uid_index):
    chain = "fz%d-%s" % (uid_index, uuid.uuid4().hex[:6])
    try:
        srv = lp.chain_join(chain, slots=rng.choice([1, 2, 8]), run_max=rng.choice([PAGE, 65536]),
                            timeout=0.3, connection=conn)
    except OSError:
        return
    kids = []
    for _ in range(rng.randrange(1, 3)):
        pid = os.fork()
        if pid == 0:
            _toucher(path, chain, rng.choice([1, 4, 16]))
        kids.append(pid)
    deadline = time.monotonic() + 1.0
    ch = srv._addr
    while time.monotonic() < deadline:
        if rng.random() < 0.3:
            scribble(rng, ch, PAGE, rng.choice([1, 4]))        # header and rings
        try:
            req = srv.take(timeout=0.05)
        except OSError:
            break
        if req is None:
            continue
        slot = req.slot
        k = rng.random()
        try:
            if k < 0.25:
                req.supply(bytes(PAGE))
            elif k < 0.5:
                if slot is not None:
                    scribble(rng, int(ffi.cast("uintptr_t", lib.fayt_pager_slot(srv._ch, slot))),
                             ffi.sizeof("struct fayt_page_request"))
                lib.fayt_pager_answer(srv._ch, slot if slot is not None else 0,
                                      rng.choice([0, 1, 2, 3, 4, 5, 0xffffffff]),
                                      rng.choice([0, -1, 5, 100000]),
                                      rng.choice([0, PAGE, 3, 1 << 31, 0xffffffff]), srv._efd)
            elif k < 0.7:
                req.fail(rng.choice([errno.EIO, 0, 200000]))
            elif k < 0.85:
                req.forward()
            # else: never answered
        except (OSError, ValueError, TypeError, AttributeError):
            pass
    for pid in kids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)


SCRIBBLE_ROLES = ["share", "context", "stacks", "sender", "sender", "target", "target",
                  "chain"]


def scribbler(path, board, slot, wseed, uid_index, out):
    rng = random.Random(wseed)
    roles = collections.Counter()
    deaths = collections.Counter()
    find = Findings("scribbler/%d uid %d" % (slot, os.getuid()), wseed)
    n = 0
    while not board.stop:
        role = rng.choice(SCRIBBLE_ROLES)
        eseed = rng.randrange(1 << 62)
        pid = os.fork()
        if pid == 0:
            try:
                episode(path, random.Random(eseed), board, role, uid_index)
            except BaseException:
                traceback.print_exc()
                os._exit(3)
            os._exit(0)
        deadline = time.monotonic() + 20
        status = None
        while time.monotonic() < deadline:
            p, status = os.waitpid(pid, os.WNOHANG)
            if p:
                break
            time.sleep(0.005)
        else:
            os.kill(pid, signal.SIGUSR1)    # faulthandler (inherited): its stack on stderr
            time.sleep(0.5)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            find.add("episode hung", role=role, episode_seed=eseed)
            status = None
        roles[role] += 1
        if status is not None:
            if os.WIFSIGNALED(status):
                deaths[signal.Signals(os.WTERMSIG(status)).name] += 1
            else:
                deaths["exit %d" % os.WEXITSTATUS(status)] += 1
        n += 1
        board.add(slot)
    out.update(kind="scribbler", uid=os.getuid(), episodes=n, roles=dict(roles),
               deaths=dict(deaths), findings=find.items)


# -- the honest pair -------------------------------------------------------------

def _honest_value(payload):
    return sum(payload) * 7 + len(payload)


def honest_target(path, board, slot, out):
    """Installs a handler and serves it; its own share-point round trips."""
    find = Findings("honest-target", 0)
    conn = lp.Connection(path)
    lp.install_handler(1, lambda p, i, s: _honest_value(bytes(p)), connection=conn)
    board.honest_target = conn.context_id
    rng = random.Random(1)
    n = 0
    rt = lp.notification.runtime(conn)
    while board.stop < 2:
        try:
            lp.notification_wait(timeout=0.01, connection=conn)
        except OSError as e:
            find.add("notification_wait: %r" % e)
        n += checked_round(find, rng, conn, "ht")
        board.add(slot)
    while True:         # serve the final check's notifications till told
        try:
            lp.notification_wait(timeout=0.01, connection=conn)
        except OSError:
            pass
        if board.stop >= 3:
            break
    out.update(kind="honest-target", rounds=n, dropped_rings=rt.dropped,
               unhandled=rt.unhandled, findings=find.items)
    conn.close()


def checked_round(find, rng, conn, tag):
    """check_share_round, what went wrong a finding; 1 if it passed."""
    try:
        check_share_round(rng, conn, tag)
        return 1
    except AssertionError as e:
        find.add("share round trip: %s" % e)
    except OSError as e:
        find.add("share round trip raised %r" % e)
    return 0


def check_share_round(rng, conn, tag):
    name = "honest-%s-%s" % (tag, uuid.uuid4().hex[:12])
    size = rng.choice([PAGE, 3 * PAGE])
    sp = lp.share_create(name, size, connection=conn)
    other = lp.Connection(conn.path)
    try:
        at = lp.share_attach(name, connection=other)
        data = bytes(rng.randrange(256) for _ in range(64))
        off = rng.randrange(0, sp.length - 256) & ~7
        sp.write(off, data)
        got = at.read(off, len(data))
        assert got == data, "%s: read %r after writing %r" % (name, got[:16], data[:16])
        at.write(off + 100, b"back")
        assert sp.read(off + 100, 4) == b"back", "%s: the attacher's write not seen" % name
        sp.write(off + 128, bytes(8))
        at.add(off + 128, 5)
        sp.add(off + 128, 2)
        got = int.from_bytes(at.read(off + 128, 8), "little")
        assert got == 7, "%s: 0 + 5 + 2 read as %d" % (name, got)
        sp.lock(timeout=5)
        sp.unlock()
        with at:
            pass
        at.unmap()
    finally:
        other.close()
    sp.destroy()


def honest_sender(path, board, slot, out):
    find = Findings("honest-sender", 0)
    rng = random.Random(2)
    conn = lp.Connection(path)
    deadline = time.monotonic() + 30
    while not board.honest_target and time.monotonic() < deadline:
        time.sleep(0.01)
    target = board.honest_target
    n = notes = 0
    while board.stop < 2:
        n += checked_round(find, rng, conn, "hs")
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 49)))
        try:
            got = lp.notify(target, 1, payload, wait_return=True, timeout=HONEST_WAIT,
                            connection=conn)
            if got != _honest_value(payload):
                find.add("notify returned %r, not %r" % (got, _honest_value(payload)))
            notes += 1
        except OSError as e:
            find.add("notify raised %r" % e)
        board.add(slot)
    out.update(kind="honest-sender", rounds=n, notifications=notes, findings=find.items)
    conn.close()


# -- processes -------------------------------------------------------------------

def as_uid(uid):
    if os.getuid() == uid:
        return
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def _preload():
    """Import now what a worker imports lazily later: once it runs as
    another uid it may not read the interpreter's library (a pyenv Python
    under /root), and Python 3.12+ imports _sha2 on the first str seed and
    tokenize on the first traceback."""
    random.Random("preload")
    import linecache
    import tokenize  # noqa: F401  (linecache's, for tracebacks)
    linecache.getline(__file__, 1)


def spawn(fn, uid, *args):
    """fn(*args, out) in a forked child of uid; (pid, read end of its report)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1                # until the report is written
        out = {}
        try:
            os.close(r)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            faulthandler.register(signal.SIGUSR1)   # kill -USR1: where it is
            _preload()
            as_uid(uid)
            fn(*args, out)
            code = 0
        except BaseException:
            out["crashed"] = traceback.format_exc()
        try:
            data = json.dumps(out, default=str).encode()
            while data:
                data = data[os.write(w, data):]
        except BaseException:
            traceback.print_exc()
            code = 2
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def collect(pid, r, timeout):
    """The child's report once it exits (killed after timeout)."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([r], [], [], max(0, min(left, 1)))
        if ready:
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            data += chunk
        elif left <= 0:
            os.kill(pid, signal.SIGUSR1)    # faulthandler: its stacks on stderr
            time.sleep(0.5)
            os.kill(pid, signal.SIGKILL)
            break
    os.close(r)
    _, status = os.waitpid(pid, 0)
    try:
        rep = json.loads(data) if data else {}
    except ValueError:
        rep = {}
    if not data:
        rep["crashed"] = "no report (wait status %d)" % status
    return rep


# -- faytd's state ------------------------------------------------------------------

def faytd_pid(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.connect(path)
        return struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
    finally:
        s.close()


def state(path, pid, state_dir):
    """What must come back to baseline, from outside and through the calls."""
    from faytd import launch
    conn = lp.Connection(path)
    try:
        ctxs = conn.list_contexts()
        shares = conn.list_sharepoints()
        st = conn.stats()
        mine = conn.context_id
    finally:
        conn.close()
    kinds = collections.Counter()
    fds = launch.lasting_fds(pid, kinds)
    shm = sorted(n for n in os.listdir("/dev/shm") if n.startswith("fayt"))
    objects = launch.fayt_objects(dirs={state_dir}) if state_dir else []
    return {"faytd_fds": fds,
            "keeper_objects": len(objects),
            "dev_shm_fayt": len(shm),
            "contexts": len([c for c in ctxs["contexts"] if c["id"] != mine]),
            "sharepoints": len(shares),
            "free_frames": ctxs["free_frames"],
            "rings": st["limits"].get("rings"),
            "stacks": st["limits"].get("stacks"),
            "details": {"faytd_fds": dict(kinds), "keeper_objects": objects}}


def same(a, b):
    """States equal in all but their details."""
    return b is not None and all(a[k] == b[k] for k in a if k != "details")


def settle(path, pid, state_dir, base, timeout):
    """Poll state() until it equals base or timeout passes; the last one."""
    deadline = time.monotonic() + timeout
    while True:
        now = state(path, pid, state_dir)
        if same(now, base) or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def final_check(path):
    """faytd serves: HELLO, a create with a round trip, a notification."""
    problems = []
    try:
        conn = lp.Connection(path)
    except OSError as e:
        return ["HELLO failed: %r" % e]
    try:
        check_share_round(random.Random(3), conn, "final")
    except (OSError, AssertionError) as e:
        problems.append("final share round trip: %r" % e)
    conn.close()
    return problems


# -- main -------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1000000,
                    help="mutated requests to send in all (default 1,000,000)")
    ap.add_argument("--seed", type=int, default=None, help="the run's seed (default: random)")
    ap.add_argument("--uids", default=None,
                    help="comma-separated uids (default: 0,65534 as root, else your own)")
    ap.add_argument("--procs", type=int, default=2, help="request fuzzers per uid (default 2)")
    ap.add_argument("--no-scribble", action="store_true", help="requests only")
    ap.add_argument("--socket", help="fuzz this running faytd instead of starting one")
    ap.add_argument("--state-dir", help="with --socket: its state directory (keeper's objects)")
    ap.add_argument("--settle", type=float, default=60,
                    help="seconds the end waits for faytd's state to return to baseline")
    ap.add_argument("--json", help="also write the report to this file")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    if args.uids:
        uids = [int(u) for u in args.uids.split(",")]
    else:
        uids = [0, NOBODY] if os.getuid() == 0 else [os.getuid()]
    if os.getuid() != 0 and set(uids) != {os.getuid()}:
        ap.error("--uids other than your own need root")
    os.environ.pop("FAYT_SOCKET", None)
    tmp = None
    d = None
    if args.socket:
        path, state_dir = args.socket, args.state_dir
    else:
        tmp = tempfile.mkdtemp(prefix="fayt-fuzz-")
        os.chmod(tmp, 0o755)
        from faytd.launch import Faytd
        d = Faytd(os.path.join(tmp, "faytd"), config=FUZZ_CONFIG, ram="1GiB")
        os.chmod(d.dir, 0o755)
        path, state_dir = d.socket, d.dir
    pid = faytd_pid(path)
    print("fuzz: seed %d, faytd %d at %s, uids %s, %d request fuzzers per uid"
          % (seed, pid, path, ",".join(map(str, uids)), args.procs), file=sys.stderr)
    report = {"seed": seed, "requests_asked": args.requests, "uids": uids,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python -m bench.fuzz " + " ".join(argv if argv is not None
                                                             else sys.argv[1:])}
    findings = []
    try:
        base = settle(path, pid, state_dir, None, 0)
        report["baseline"] = base
        board = Board()
        kids = []
        slot = 0
        for ui, uid in enumerate(uids):
            for i in range(args.procs):
                kids.append(("requests", slot) + spawn(request_fuzzer, uid, path, board, slot,
                                                       "%d/%d" % (seed, slot), 0))
                slot += 1
        honest_uid = 0 if os.getuid() == 0 else os.getuid()
        t_slot = slot
        kids.append(("honest", slot) + spawn(honest_target, honest_uid, path, board, slot))
        slot += 1
        kids.append(("honest", slot) + spawn(honest_sender, honest_uid, path, board, slot))
        slot += 1
        req_slots = range(0, len(uids) * args.procs)
        if not args.no_scribble:
            for ui, uid in enumerate(uids):
                kids.append(("scribbler", slot) + spawn(scribbler, uid, path, board, slot,
                                                        "%d/s%d" % (seed, ui), ui))
                slot += 1
        t0 = time.monotonic()
        last = t0
        while True:
            sent = sum(board.count(s) for s in req_slots)
            if sent >= args.requests:
                break
            if all(os.waitid(os.P_PID, kpid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                   for kind, s, kpid, r in kids if kind == "requests"):
                findings.append({"what": "every request fuzzer ended before the count"})
                break
            if d is not None and d.proc.poll() is not None:
                findings.append({"what": "faytd exited with %s during the run"
                                 % d.proc.returncode})
                break
            now = time.monotonic()
            if now - last >= 10:
                last = now
                print("fuzz: %d requests, %.0f/s, %d scribble episodes, honest rounds %d/%d"
                      % (sent, sent / (now - t0),
                         sum(board.count(s) for s in range(t_slot + 2, slot)),
                         board.count(t_slot), board.count(t_slot + 1)), file=sys.stderr)
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        board.stop = 1
        reports = []
        for kind, s, kpid, r in kids:
            if kind != "honest":
                reports.append(collect(kpid, r, 60))
        # The honest pair makes a last checked round with nothing else running.
        board.stop = 2
        honest = [(kpid, r) for kind, s, kpid, r in kids if kind == "honest"]
        sender_rep = collect(honest[1][0], honest[1][1], 60)
        board.stop = 3
        target_rep = collect(honest[0][0], honest[0][1], 60)
        reports += [target_rep, sender_rep]
        sent = sum(board.count(s) for s in req_slots)
        report.update(requests=sent, seconds=round(elapsed, 1),
                      requests_per_s=round(sent / elapsed) if elapsed else None)
        for rep in reports:
            findings.extend(rep.get("findings", []))
            if "crashed" in rep:
                findings.append({"what": "worker crashed", "report": rep["crashed"]})
        report["workers"] = reports
        alive = d is None or d.proc.poll() is None
        if not alive:
            findings.append({"what": "faytd is gone (exit %s)" % d.proc.returncode})
        else:
            findings.extend({"what": p} for p in final_check(path))
            end = settle(path, pid, state_dir, base, args.settle)
            report["end"] = end
            for k in base:
                if k != "details" and base[k] != end[k]:
                    findings.append({"what": "%s: %s at the end, %s at the baseline"
                                     % (k, end[k], base[k]),
                                     "details": [base["details"].get(k), end["details"].get(k)]})
    finally:
        if d is not None:
            log = d.stop()
            if "Traceback" in log:
                i = log.index("Traceback")
                findings.append({"what": "faytd logged a Traceback",
                                 "log": log[max(0, i - 300):i + 3000]})
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    report["findings"] = findings
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    return 1 if findings else 0


def print_report(rep):
    out = sys.stdout
    print("fuzz: seed %s, uids %s" % (rep["seed"], rep["uids"]), file=out)
    if "requests" in rep:
        print("requests: %d in %.1f s (%s/s)" % (rep["requests"], rep["seconds"],
                                                 rep["requests_per_s"]), file=out)
    for w in rep.get("workers", []):
        if w.get("kind") == "requests":
            st = w["stats"]
            print("  requests uid %d: %d sent, %d connections, %d disconnected"
                  % (w["uid"], w["sent"], st.get("connections", 0),
                     st.get("disconnected", 0)), file=out)
        elif w.get("kind") == "scribbler":
            print("  scribbler uid %d: %d episodes %s, ended by %s"
                  % (w["uid"], w["episodes"], w["roles"], w["deaths"]), file=out)
        elif w.get("kind", "").startswith("honest"):
            print("  %s: %s" % (w["kind"], {k: v for k, v in w.items()
                                            if k not in ("kind", "findings")}), file=out)
    if "baseline" in rep:
        print("baseline: %s" % rep["baseline"], file=out)
    if "end" in rep:
        print("end:      %s" % rep["end"], file=out)
    if rep["findings"]:
        print("FINDINGS: %d" % len(rep["findings"]), file=out)
        for f in rep["findings"]:
            print("  %s" % json.dumps(f, default=str)[:3000], file=out)
    else:
        print("no findings; faytd serves and its state is back at baseline", file=out)


if __name__ == "__main__":
    sys.exit(main())
