"""The ABI: the headers in libportal/include/fayt are the specification's
structs byte for byte, and cffi (which the Python side reads every layout
from) agrees with gcc about every field of every struct they declare.

The C side is a small program compiled with gcc against the real headers;
it prints sizeof and offsetof of each field named below.  The list of fields
is written here by hand, from the headers, and is also checked against the
fields cffi knows, so that a field added on one side only fails the test.
"""
import os
import re
import subprocess

import pytest

from libportal._abi import ffi, lib

INCLUDE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "libportal", "include")
HEADERS = ["portal.h", "sharepoint.h", "notification.h", "context.h", "syscall.h", "ring.h",
           "pager.h", "stream.h"]

# struct -> every field, nested ones as dotted paths; "[]" marks a flexible
# array member (it has an offset but no sizeof).
STRUCTS = {
    "struct portal_req": [
        "type", "prot", "length",
        "share", "share.identifier", "share.type", "share.create",
        "sp_req_chain", "sp_req_chain.name", "sp_req_chain.message",
        "morphology", "morphology.addr", "morphology.length", "morphology.paddr[]",
    ],
    "struct fayt_sharepoint_meta": [
        "lock", "prot", "length",
        "morphology", "morphology.length", "morphology.paddr[]",
    ],
    "struct NotificationAction": ["handler"],
    "struct fayt_held_lock": ["sp_id", "state"],
    "struct fayt_context_page": ["magic", "version", "pid", "context_id", "held", "actions",
                                 "notify", "notify.rings_generation", "notify.depth",
                                 "notify.provider", "notify.nstacks", "notify.delivered",
                                 "notify.starved", "rings", "stacks", "saved",
                                 "inject", "inject.seq", "inject.kinds", "inject.rule",
                                 "injected", "injected.seq", "injected.reserved",
                                 "injected.events", "injected.fired", "waits",
                                 "waits.blocks", "waits.wakes", "trace", "trace.on",
                                 "trace.head", "reserved"],
    "struct fayt_inject_rule": ["arg", "after", "count", "ppm", "seed"],
    "struct fayt_inject_plan": ["seq", "kinds", "rule"],
    "struct fayt_inject_state": ["seq", "reserved", "events", "fired"],
    "struct fayt_wait_record": ["blocks", "wakes"],
    "struct fayt_trace_state": ["on", "head"],
    "struct fayt_trace_record": ["seq", "kind", "slot", "tid", "id", "ts", "pos", "aux",
                                 "value"],
    "struct fayt_notify_state": ["rings_generation", "depth", "provider", "nstacks",
                                 "delivered", "starved"],
    "struct fayt_ring_record": ["ring_id", "sender"],
    "struct fayt_notification_stack": ["base", "size", "state", "handle"],
    "struct fayt_saved_state": ["index", "sender", "stack", "ring_id", "pos",
                                "interrupted_index"],
    "struct fayt_ring_header": ["magic", "size", "sender", "target", "target_pid", "state",
                                "head", "tail", "space", "space_waiters", "target_waiting",
                                "rung", "armed", "reserved", "posted"],
    "struct fayt_ring_entry": ["seq", "index", "flags", "sender", "length", "done", "status",
                               "result", "payload"],
    "struct fayt_notification_frame": ["index", "sender", "flags", "length", "ring_id", "pos",
                                       "depth", "reserved", "payload"],
    "struct fayt_event_payload": ["event", "context_id", "pid", "sp_id", "identifier"],
    "struct fayt_notify_hint": ["posted", "reserved"],
    "struct fayt_notify_install": ["index", "reserved", "cookie"],
    "struct fayt_notify_open": ["target", "reserved"],
    "struct fayt_ring_reply": ["ring_id", "sender", "target", "target_pid", "map_length"],
    "struct fayt_stack_req": ["size", "reserved"],
    "struct fayt_stack_reply": ["handle", "size", "record"],
    "struct fayt_notify_subscribe": ["event", "index", "arg", "reserved"],
    "struct fayt_sched_subscribe": ["index", "flags"],
    "struct fayt_sched_event": ["event", "context_id", "pid", "uid", "blocks", "wakes",
                                "waiting", "reserved", "seen_ns"],
    "struct fayt_req_hdr": ["magic", "op", "flags", "seq", "tid"],
    "struct fayt_rep_hdr": ["magic", "op", "nfds", "seq", "err"],
    "struct fayt_hello_req": ["wire_abi", "reserved"],
    "struct fayt_hello_reply": ["context_id", "category", "rights", "wire_abi"],
    "struct fayt_handle_req": ["handle"],
    "struct fayt_portal_reply": ["handle", "map_length", "data_offset", "sp_id", "nframes",
                                 "prot", "flags"],
    "struct fayt_pager_header": ["magic", "nslots", "run_max", "slot_stride", "state",
                                 "chain_id", "position", "server_waiting", "req_head",
                                 "req_tail", "ans_head", "ans_tail", "rung", "reserved",
                                 "req_ring", "ans_ring"],
    "struct fayt_page_request": ["id", "offset", "length", "run_max", "access", "flags", "hop",
                                 "chain_id", "region_id", "client_pid", "region_length",
                                 "verdict", "error", "answer_length", "message_length",
                                 "backing", "chain", "message"],
    "struct fayt_uffd_fault": ["address", "flags", "tid"],
    "struct fayt_chain_join": ["slots", "run_max", "flags", "timeout_ms", "name"],
    "struct fayt_chain_join_reply": ["chain_id", "position", "slots", "run_max", "map_length",
                                     "flags", "timeout_ms"],
    "struct fayt_chain_leave": ["chain_id", "reserved"],
    "struct fayt_chain_back": ["chain_id", "message_length", "handle", "message"],
    "struct fayt_chain_back_reply": ["backing", "reserved"],
    "struct fayt_direct_run": ["fd", "pages", "at", "offset"],
    "struct fayt_grant_req": ["handle", "kind", "to", "prot", "flags"],
    "struct fayt_cow_paddr_req": ["handle", "base", "npages", "reserved"],
    "struct fayt_listen_req": ["flags", "backlog"],
    "struct fayt_listen_reply": ["listener"],
    "struct fayt_connect_req": ["ring_bytes", "reserved"],
    "struct fayt_chan_reply": ["channel", "ring_bytes", "map_length", "peer_context", "peer_pid",
                               "peer_uid", "peer_category", "flags", "reserved"],
    "struct fayt_stream_end": ["magic", "reserved0", "ring_bytes", "pad0", "tx_head", "pad1",
                               "rx_tail", "pad2", "state", "rx_asleep", "tx_asleep",
                               "reserved1", "sent", "received"],
}

# Constants whose values are ABI as well.
CONSTANTS = [
    "FAYT_PAGE_SIZE", "FAYT_PORTAL_SHARE", "FAYT_PORTAL_DIRECT", "FAYT_PORTAL_ANON",
    "FAYT_PORTAL_COW", "FAYT_PORTAL_SPECIAL", "FAYT_PORTAL_CLASSES",
    "FAYT_PROT_NONE", "FAYT_PROT_READ", "FAYT_PROT_WRITE", "FAYT_PROT_EXEC", "FAYT_PROT_ALL",
    "FAYT_SHARE_TRIVIAL", "FAYT_SHARE_ADVANCED", "FAYT_SHARE_ATTACH", "FAYT_SHARE_CREATE",
    "FAYT_NAME_MAX", "FAYT_MESSAGE_MAX",
    "FAYT_LOCK_FREE", "FAYT_LOCK_HELD", "FAYT_LOCK_CONTENDED", "FAYT_LOCK_STATE_MASK",
    "FAYT_LOCK_OWNER_DIED", "FAYT_NOTIFICATION_SLOTS",
    "FAYT_CONTEXT_MAGIC", "FAYT_CONTEXT_VERSION", "FAYT_HELD_LOCKS_MAX",
    "FAYT_HELD_FREE", "FAYT_HELD_PENDING", "FAYT_HELD_HELD", "FAYT_HELD_WAITING",
    "FAYT_REQ_MAGIC", "FAYT_REP_MAGIC", "FAYT_MSG_MAX", "FAYT_REQ_NOREPLY", "FAYT_WIRE_ABI",
    "FAYT_SYS_HELLO", "FAYT_SYS_PORTAL", "FAYT_SYS_UNMAP", "FAYT_SYS_SHARE_DESTROY",
    "FAYT_SYS_LIST_SHARE", "FAYT_SYS_LIST_CONTEXTS", "FAYT_SYS_UNMAP_DESTROY",
    "FAYT_CATEGORY_CORE", "FAYT_CATEGORY_DRIVER", "FAYT_CATEGORY_SERVER",
    "FAYT_PORTAL_REPLY_CREATED", "FAYT_PORTAL_REPLY_SPLIT",
    "FAYT_SYS_NOTIFY_INSTALL", "FAYT_SYS_NOTIFY_REMOVE", "FAYT_SYS_NOTIFY_OPEN",
    "FAYT_SYS_NOTIFY_FETCH", "FAYT_SYS_NOTIFY_STACK_ALLOC", "FAYT_SYS_NOTIFY_STACK_FREE",
    "FAYT_SYS_NOTIFY_PROVIDER", "FAYT_SYS_NOTIFY_SUBSCRIBE", "FAYT_SYS_NOTIFY_CLOSE",
    "FAYT_SYS_NOTIFY_HINT", "FAYT_HINT_BYTES",
    "FAYT_NOTIFY_IMMEDIATE", "FAYT_NOTIFY_RETURN", "FAYT_NOTIFY_NOWAIT", "FAYT_NOTIFY_FLAGS",
    "FAYT_NOTIFY_PAYLOAD_MAX", "FAYT_RING_ENTRIES", "FAYT_RING_MAGIC",
    "FAYT_DOORBELL_SIGRTMIN_OFFSET", "FAYT_SENDER_KERNEL", "FAYT_RING_LIVE",
    "FAYT_RING_TARGET_DEAD", "FAYT_RING_SENDER_DEAD", "FAYT_DONE_PENDING", "FAYT_DONE_RETURNED",
    "FAYT_DONE_DEAD", "FAYT_DONE_ABANDONED", "FAYT_RING_HEADER_SIZE", "FAYT_EVENT_PEER_DIED",
    "FAYT_EVENT_SP_DESTROYED", "FAYT_RINGS_MAX", "FAYT_STACKS_MAX", "FAYT_NEST_MAX",
    "FAYT_NO_PROVIDER", "FAYT_STACK_UNUSED", "FAYT_STACK_FREE", "FAYT_STACK_IN_USE",
    "FAYT_SYS_CHAIN_JOIN", "FAYT_SYS_CHAIN_LEAVE", "FAYT_PAGER_MAGIC", "FAYT_PAGER_SLOTS_MAX",
    "FAYT_PAGER_RUN_MAX", "FAYT_PAGER_HEADER_SIZE", "FAYT_PAGER_DESC_SIZE", "FAYT_PAGER_LIVE",
    "FAYT_PAGER_CLOSED", "FAYT_ACCESS_READ", "FAYT_ACCESS_WRITE", "FAYT_PAGE_PRESENT",
    "FAYT_PAGE_CANCELLED", "FAYT_PAGE_PENDING", "FAYT_PAGE_DATA", "FAYT_PAGE_FORWARD",
    "FAYT_PAGE_FAIL", "FAYT_CHAIN_WRITE_REPORTS", "FAYT_CHAIN_FLAGS",
    "FAYT_SYS_CHAIN_BACK", "FAYT_SYS_CHAIN_UNBACK", "FAYT_SYS_STATS", "FAYT_PAGE_BACKED",
    "FAYT_PAGE_MAPPED",
    "FAYT_PORTAL_REPLY_BACKED", "FAYT_UFFD_USER_MODE", "FAYT_UFFD_WP", "FAYT_UFFD_POISON",
    "FAYT_UFFD_MINOR", "FAYT_UFFD_REGISTER_WP", "FAYT_UFFD_REGISTER_MINOR",
    "FAYT_SYS_GRANT", "FAYT_PORTAL_REPLY_DIRECT", "FAYT_DIRECT_OBJECTS_MAX",
    "FAYT_GRANT_CONTEXT", "FAYT_GRANT_CATEGORY", "FAYT_GRANT_REVOKE",
    "FAYT_PORTAL_REPLY_PRIVATE", "FAYT_COW_ON_WRITE", "FAYT_COW_SNAPSHOT", "FAYT_SYS_COW_PADDR",
    "FAYT_SYS_LISTEN", "FAYT_SYS_CONNECT", "FAYT_SYS_ACCEPT", "FAYT_SYS_CHAN_CLOSE",
    "FAYT_LISTEN_CLOSE", "FAYT_BACKLOG_DEFAULT", "FAYT_BACKLOG_MAX", "FAYT_CHAN_PIDFD",
    "FAYT_STREAM_MAGIC", "FAYT_STREAM_HEADER_SIZE", "FAYT_STREAM_RING_MIN",
    "FAYT_STREAM_RING_MAX", "FAYT_STREAM_RING_DEFAULT", "FAYT_STREAM_FRAME_HEADER",
    "FAYT_STREAM_WR_SHUT", "FAYT_STREAM_RD_SHUT", "FAYT_STREAM_RESET", "FAYT_STREAM_WAKE",
]


def _c_program():
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <stdint.h>"]
    lines += ['#include "fayt/%s"' % h for h in HEADERS]
    lines += ["int main(void) {"]
    for st, fields in STRUCTS.items():
        lines.append('    printf("sizeof %s %%zu\\n", sizeof(%s));' % (st, st))
        for f in fields:
            flex = f.endswith("[]")
            path = f[:-2] if flex else f
            lines.append('    printf("offsetof %s %s %%zu\\n", offsetof(%s, %s));'
                         % (st, path, st, path))
            if not flex:
                lines.append('    printf("fieldsize %s %s %%zu\\n", sizeof(((%s *)0)->%s));'
                             % (st, path, st, path))
            else:
                lines.append('    printf("itemsize %s %s %%zu\\n", sizeof(((%s *)0)->%s[0]));'
                             % (st, path, st, path))
    for c in CONSTANTS:
        lines.append('    printf("const %s %%lld\\n", (long long)(%s));' % (c, c))
    lines += ["    return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def gcc_layout(tmp_path_factory):
    """{(kind, struct, field): number} as gcc lays the headers out."""
    d = tmp_path_factory.mktemp("abi")
    src, exe = d / "abi.c", d / "abi"
    src.write_text(_c_program())
    cc = subprocess.run(["gcc", "-std=gnu11", "-Wall", "-Werror", "-I", INCLUDE,
                         "-o", str(exe), str(src)], capture_output=True, text=True, timeout=120)
    assert cc.returncode == 0, "gcc failed:\n" + cc.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    out = {}
    for line in run.stdout.splitlines():
        parts = line.split(" ")
        kind, value = parts[0], int(parts[-1])
        if kind == "const":
            out[("const", parts[1])] = value
        elif kind == "sizeof":
            out[("sizeof", " ".join(parts[1:3]))] = value
        else:
            out[(kind, " ".join(parts[1:3]), parts[3])] = value
    return out


def _cffi_offset(struct, path):
    return ffi.offsetof(struct, *path.split("."))


def _cffi_field_type(struct, path):
    t = ffi.typeof(struct)
    for name in path.split("."):
        t = dict(t.fields)[name].type
    return t


def _cffi_fields(ctype, prefix=""):
    """Every field cffi knows, nested structs walked, as dotted paths."""
    out = []
    for name, field in ctype.fields:
        path = prefix + name
        if field.type.kind == "array" and field.type.length is None:
            out.append(path + "[]")
        else:
            out.append(path)
        if field.type.kind == "struct":
            out.extend(_cffi_fields(field.type, path + "."))
    return out


@pytest.mark.parametrize("struct", sorted(STRUCTS))
def test_abi_field_lists_match_cffi(struct):
    assert _cffi_fields(ffi.typeof(struct)) == STRUCTS[struct]


@pytest.mark.parametrize("struct", sorted(STRUCTS))
def test_abi_gcc_and_cffi_agree(struct, gcc_layout):
    assert gcc_layout[("sizeof", struct)] == ffi.sizeof(struct), "sizeof " + struct
    for f in STRUCTS[struct]:
        flex = f.endswith("[]")
        path = f[:-2] if flex else f
        assert gcc_layout[("offsetof", struct, path)] == _cffi_offset(struct, path), \
            "offsetof(%s, %s)" % (struct, path)
        t = _cffi_field_type(struct, path)
        if flex:
            assert gcc_layout[("itemsize", struct, path)] == ffi.sizeof(t.item), \
                "sizeof %s.%s[0]" % (struct, path)
        else:
            assert gcc_layout[("fieldsize", struct, path)] == ffi.sizeof(t), \
                "sizeof %s.%s" % (struct, path)


def test_abi_constants_match_cffi(gcc_layout):
    for c in CONSTANTS:
        assert gcc_layout[("const", c)] == getattr(lib, c), c


def test_abi_sharepoint_meta_is_the_specifications_packed_layout(gcc_layout):
    T = "struct fayt_sharepoint_meta"
    want = {"lock": 0, "prot": 1, "length": 5, "morphology": 13,
            "morphology.length": 13, "morphology.paddr": 21}
    for path, off in want.items():
        assert _cffi_offset(T, path) == off, path
        assert gcc_layout[("offsetof", T, path)] == off, path
    assert ffi.sizeof(T) == 21 == gcc_layout[("sizeof", T)]
    # The data starts at the next 16-byte boundary after the whole structure,
    # paddr[] included.
    entry = _cffi_field_type(T, "morphology.paddr").item          # one paddr[] entry
    assert ffi.sizeof(entry) == 8 == gcc_layout[("itemsize", T, "morphology.paddr")]
    for n in (1, 2, 3, 4, 100):
        whole = ffi.sizeof(T) + n * ffi.sizeof(entry)
        assert lib.fayt_sp_data_offset(n) == (whole + 15) // 16 * 16


def test_abi_portal_req_is_the_specifications_packed_layout(gcc_layout):
    T = "struct portal_req"
    want = {"type": 0, "prot": 4, "length": 8,
            "share": 12, "share.identifier": 12, "share.type": 20, "share.create": 24,
            "sp_req_chain": 28, "sp_req_chain.name": 28, "sp_req_chain.message": 36,
            "morphology": 44, "morphology.addr": 44, "morphology.length": 52,
            "morphology.paddr": 60}
    for path, off in want.items():
        assert _cffi_offset(T, path) == off, path
        assert gcc_layout[("offsetof", T, path)] == off, path
    assert ffi.sizeof(T) == 60 == gcc_layout[("sizeof", T)]


def test_abi_context_page_is_one_page(gcc_layout):
    assert ffi.sizeof("struct fayt_context_page") == lib.FAYT_PAGE_SIZE
    assert gcc_layout[("sizeof", "struct fayt_context_page")] == 4096
    assert ffi.sizeof(ffi.typeof("struct fayt_context_page").fields[4][1].type) == \
        lib.FAYT_HELD_LOCKS_MAX * ffi.sizeof("struct fayt_held_lock")


def test_abi_context_page_holds_the_notification_state(gcc_layout):
    T = "struct fayt_context_page"
    for field, n in (("actions", lib.FAYT_NOTIFICATION_SLOTS), ("rings", lib.FAYT_RINGS_MAX),
                     ("stacks", lib.FAYT_STACKS_MAX), ("saved", lib.FAYT_NEST_MAX)):
        t = _cffi_field_type(T, field)
        assert t.kind == "array" and t.length == n, field
    assert ffi.sizeof(_cffi_field_type(T, "actions")) == 64 * ffi.sizeof("void *")


def test_abi_ring_layout(gcc_layout):
    assert ffi.sizeof("struct fayt_ring_header") == lib.FAYT_RING_HEADER_SIZE
    assert lib.FAYT_RING_ENTRIES & (lib.FAYT_RING_ENTRIES - 1) == 0
    for T in ("struct fayt_ring_entry", "struct fayt_notification_frame"):
        assert ffi.sizeof(_cffi_field_type(T, "payload")) == lib.FAYT_NOTIFY_PAYLOAD_MAX
    assert ffi.sizeof("struct fayt_event_payload") <= lib.FAYT_NOTIFY_PAYLOAD_MAX
    assert ffi.sizeof("struct fayt_sched_event") <= lib.FAYT_NOTIFY_PAYLOAD_MAX
    # Every futex word is a 4-byte aligned uint32 (the header and the entries
    # start page-aligned and 64-byte aligned).
    for T, f in (("struct fayt_ring_header", "space"), ("struct fayt_ring_entry", "done"),
                 ("struct fayt_ring_entry", "seq")):
        assert _cffi_offset(T, f) % 4 == 0 and gcc_layout[("offsetof", T, f)] % 4 == 0
    assert ffi.sizeof("struct fayt_ring_entry") % 8 == 0
    assert lib.fayt_ring_bytes() >= (lib.FAYT_RING_HEADER_SIZE
                                     + lib.FAYT_RING_ENTRIES * ffi.sizeof("struct fayt_ring_entry"))


def test_abi_notification_action_is_one_function_pointer(gcc_layout):
    assert ffi.sizeof("struct NotificationAction") == ffi.sizeof("void *")
    t = dict(ffi.typeof("struct NotificationAction").fields)["handler"].type
    assert t.kind == "function"   # cffi: a pointer to function
    assert ffi.getctype(t) == "void(*)(void *, int, int)"


def test_abi_flag_sets_are_distinct_bits():
    """Flags of one field, written in more than one header (the portal
    reply's: syscall.h and pager.h), never share a bit."""
    for prefix in ("FAYT_PORTAL_REPLY_", "FAYT_PAGE_", "FAYT_UFFD_REGISTER_"):
        names = [n for n in CONSTANTS if n.startswith(prefix)]
        if prefix == "FAYT_PAGE_":      # the request flags, not the verdicts or sizes
            names = ["FAYT_PAGE_PRESENT", "FAYT_PAGE_CANCELLED", "FAYT_PAGE_BACKED"]
        bits = [getattr(lib, n) for n in names]
        assert len(names) >= 2, prefix
        for n, b in zip(names, bits):
            assert b > 0 and b & (b - 1) == 0, "%s is not a single bit" % n
        assert len(set(bits)) == len(bits), dict(zip(names, bits))
    reply_flags = [n for n in dir(lib) if n.startswith("FAYT_PORTAL_REPLY_")]
    assert sorted(reply_flags) == sorted(n for n in CONSTANTS
                                         if n.startswith("FAYT_PORTAL_REPLY_")), reply_flags


def test_abi_portal_classes_are_distinct_combinable_bits():
    import libportal as lp
    classes = {"SHARE": lp.SHARE, "DIRECT": lp.DIRECT, "ANON": lp.ANON, "COW": lp.COW,
               "SPECIAL": lp.SPECIAL}
    for name, bit in classes.items():
        assert bit > 0 and bit & (bit - 1) == 0, "%s is not a single bit" % name
    assert len(set(classes.values())) == 5
    combined = 0
    for bit in classes.values():
        assert combined & bit == 0
        combined |= bit
    assert combined == lib.FAYT_PORTAL_CLASSES
    # Combinations are unambiguous: each class can be read back from any union.
    for a in classes.values():
        for b in classes.values():
            u = a | b
            assert u & a == a and u & b == b
            assert {n for n, x in classes.items() if u & x} == \
                {n for n, x in classes.items() if x in (a, b)}
    # The protection bits are Linux's, so they pass to mmap(2) unchanged.
    import mmap
    assert (lp.PROT_READ, lp.PROT_WRITE, lp.PROT_EXEC) == \
        (mmap.PROT_READ, mmap.PROT_WRITE, mmap.PROT_EXEC)


def test_abi_cffi_version_is_written_once():
    """CFFI_ABI is written in libportal/_versions.py only: _build.py compiles
    it into the module and _abi.py checks it, both reading that file."""
    from libportal import _versions
    here = os.path.dirname(INCLUDE)
    written = []
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            with open(os.path.join(here, name)) as f:
                for line in f:
                    if re.match(r"\s*(CFFI_ABI\s*=\s*\d|#\s*define\s+FAYT_CFFI_ABI)", line):
                        written.append(name)
    assert written == ["_versions.py"]
    assert lib.fayt_cffi_abi() == _versions.CFFI_ABI
