"""A key-value server over connected channels, and its client.

    python -m servers.kv serve [--name kv] [--idle S]   # listens on the name, serves
    python -m servers.kv client [--name kv] [-n N]      # a scripted session, then exits

The server listens on a name (lp.listen: clients find it by that name, not
by a pid, and a restarted server is found again under it) and serves every
connected client at once in one asyncio loop: each channel's readiness
descriptor (End.recv_async) wakes its task, and the listener's
(Listener.accept_async) the accepting one.  It stops on SIGTERM or after
--idle seconds with no client connected.

Messages (docs/channels.md), one request and one reply each, little-endian:

    request  op:u8  key_len:u16  key  value       (value: PUT only)
    reply    status:u8  body

    op 1 GET   body: the value
    op 2 PUT   body: empty (the key's old value is replaced)
    op 3 DEL   body: empty
    op 4 LIST  key: a prefix; body: count:u32, then key_len:u16 key per key
               (sorted; at most what fits in one reply)

    status 0 OK, 1 NOT_FOUND, 2 BAD_REQUEST (body: why, UTF-8)

Keys are 1 to 255 bytes, values up to what a message holds less the
header.  A malformed request is answered BAD_REQUEST and the connection
stays up; a client that goes away (close, death) only ends its own task.
Everything a client sends is input: lengths are checked against the bytes
that came.
"""
import argparse
import asyncio
import errno
import signal
import struct
import sys
import time

import libportal as lp

GET, PUT, DEL, LIST = 1, 2, 3, 4
OK, NOT_FOUND, BAD_REQUEST = 0, 1, 2
KEY_MAX = 255
_HEAD = struct.Struct("<BH")
_COUNT = struct.Struct("<I")
_KLEN = struct.Struct("<H")


class KVError(OSError):
    """A reply other than OK or NOT_FOUND: BAD_REQUEST, or a malformed reply."""


def say(role, fmt, *args):
    sys.stdout.write("[%s] %s\n" % (role, fmt % args if args else fmt))
    sys.stdout.flush()


# -- the server ---------------------------------------------------------------

class Store:
    """The table, and what a request does to it: answer(request) -> reply."""

    def __init__(self):
        self.data = {}
        self.requests = 0

    def answer(self, req, max_reply):
        self.requests += 1
        if len(req) < _HEAD.size:
            return self._bad("a request has at least %d bytes, this one %d"
                             % (_HEAD.size, len(req)))
        op, klen = _HEAD.unpack_from(req)
        key = bytes(req[_HEAD.size:_HEAD.size + klen])
        if len(key) != klen:
            return self._bad("key_len %d, but %d bytes follow" % (klen, len(key)))
        value = bytes(req[_HEAD.size + klen:])
        if op == LIST:
            return self._list(key, max_reply)
        if not 1 <= klen <= KEY_MAX:
            return self._bad("a key has 1 to %d bytes, not %d" % (KEY_MAX, klen))
        if op == GET:
            got = self.data.get(key)
            return bytes([NOT_FOUND]) if got is None else bytes([OK]) + got
        if op == PUT:
            self.data[key] = value
            return bytes([OK])
        if op == DEL:
            return bytes([OK if self.data.pop(key, None) is not None else NOT_FOUND])
        return self._bad("op %d is not GET (1), PUT (2), DEL (3) or LIST (4)" % op)

    def _list(self, prefix, max_reply):
        out, n, room = [], 0, max_reply - 1 - _COUNT.size
        for k in sorted(k for k in self.data if k.startswith(prefix)):
            if _KLEN.size + len(k) > room:
                break
            out.append(_KLEN.pack(len(k)) + k)
            room -= _KLEN.size + len(k)
            n += 1
        return bytes([OK]) + _COUNT.pack(n) + b"".join(out)

    @staticmethod
    def _bad(why):
        return bytes([BAD_REQUEST]) + why.encode()


class Server:
    """Listens on `name` and serves clients until stop() (or --idle)."""

    def __init__(self, name, idle=0.0, backlog=64):
        self.name, self.idle, self.backlog = name, idle, backlog
        self.store = Store()
        self.clients = set()
        self.served = 0
        self._stop = None

    async def _client(self, end):
        self.served += 1
        who = "pid %d (uid %d)" % (end.peer.pid, end.peer.uid)
        try:
            while True:
                req = await end.recv_async()
                if not req:
                    break                       # it closed (or shut its writing)
                await end.send_async(self.store.answer(req, end.max_message))
        except (lp.ChannelReset, lp.ChannelClosed):
            say("kv", "client %s went away without closing", who)
        except lp.ProtocolError as e:
            say("kv", "client %s broke the channel protocol: %s", who, e)
        finally:
            end.close()

    async def serve(self):
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        lst = lp.listen(self.name, backlog=self.backlog)
        say("kv", "listening on %r (context %d)", self.name, lp.connection().context_id)
        tasks = set()

        async def accepting():
            while True:
                end = await lst.accept_async()
                t = asyncio.ensure_future(self._client(end))
                tasks.add(t)
                t.add_done_callback(tasks.discard)

        acc = asyncio.ensure_future(accepting())
        last = time.monotonic()
        try:
            while not self._stop.is_set():
                try:
                    await asyncio.wait_for(self._stop.wait(), 0.2)
                except asyncio.TimeoutError:
                    pass
                if tasks:
                    last = time.monotonic()
                elif self.idle and time.monotonic() - last > self.idle:
                    break
        finally:
            acc.cancel()
            for t in list(tasks):
                t.cancel()
            await asyncio.gather(acc, *tasks, return_exceptions=True)
            lst.close()
            loop.remove_signal_handler(signal.SIGTERM)
        say("kv", "stopping: %d clients served, %d requests, %d keys", self.served,
            self.store.requests, len(self.store.data))


# -- the client ---------------------------------------------------------------

class KVClient:
    """A connection to the server listening on `name`:
    get/put/delete/list; timeout: seconds each call (and the connect) may
    wait (None: for ever).  Use it in a with-statement, or close()."""

    def __init__(self, name: str = "kv", timeout: "float | None" = 10.0,
                 connection: "lp.Connection | None" = None) -> None:
        self.timeout = timeout
        self.end = lp.connect(name, timeout=timeout, connection=connection)

    def _ask(self, op: int, key: bytes, value: bytes = b"") -> "tuple[int, bytes]":
        if isinstance(key, str):
            key = key.encode()
        self.end.send(_HEAD.pack(op, len(key)) + key + value, timeout=self.timeout)
        rep = self.end.recv(timeout=self.timeout)
        if not rep:
            raise lp.ChannelClosed(errno.EPIPE, "kv: the server closed the channel")
        status, body = rep[0], rep[1:]
        if status == BAD_REQUEST:
            raise KVError(errno.EINVAL, "kv: bad request: %s" % body.decode("utf-8", "replace"))
        if status not in (OK, NOT_FOUND):
            raise KVError(errno.EPROTO, "kv: reply status %d is not one the server sends"
                          % status)
        return status, body

    def get(self, key: "bytes | str") -> "bytes | None":
        """The key's value, or None if it has none."""
        status, body = self._ask(GET, key)
        return body if status == OK else None

    def put(self, key: "bytes | str", value: bytes) -> None:
        """Set the key's value."""
        self._ask(PUT, key, bytes(value))

    def delete(self, key: "bytes | str") -> bool:
        """Remove the key; whether it was there."""
        return self._ask(DEL, key)[0] == OK

    def list(self, prefix: "bytes | str" = b"") -> "list[bytes]":
        """The keys that start with prefix, sorted (as many as fit one reply)."""
        body = self._ask(LIST, prefix)[1]
        if len(body) < _COUNT.size:
            raise KVError(errno.EPROTO, "kv: a LIST reply of %d bytes" % len(body))
        (n,), at, keys = _COUNT.unpack_from(body), _COUNT.size, []
        for _ in range(n):
            if at + _KLEN.size > len(body):
                raise KVError(errno.EPROTO, "kv: a LIST reply cut short")
            (k,) = _KLEN.unpack_from(body, at)
            keys.append(bytes(body[at + _KLEN.size:at + _KLEN.size + k]))
            at += _KLEN.size + k
        return keys

    def close(self) -> None:
        """Close the channel (the server's task for it ends)."""
        self.end.close()

    def __enter__(self) -> "KVClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def client(name, n):
    """A scripted session: PUT, GET and DEL n keys, LIST; 0 if all was right."""
    import os
    ok = True
    tag = "c%d" % os.getpid()
    t = time.perf_counter()
    with KVClient(name) as kv:
        for i in range(n):
            kv.put("%s/%d" % (tag, i), b"value %d" % i)
        for i in range(n):
            ok &= kv.get("%s/%d" % (tag, i)) == b"value %d" % i
        ok &= kv.get("%s/missing" % tag) is None
        ok &= kv.delete("%s/0" % tag) and not kv.delete("%s/0" % tag)
        keys = kv.list(tag + "/")
        ok &= len(keys) == n - 1
        dt = time.perf_counter() - t
    say("kv-client", "%d PUT, %d GET, 2 DEL, 1 LIST in %.1f ms (%.1f us a request); "
        "LIST %s/ gave %d keys", n, n + 1, dt * 1e3, dt / (2 * n + 4) * 1e6, tag, len(keys))
    say("kv-client", "done: %s", "ok" if ok else "MISMATCH")
    return 0 if ok else 1


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m servers.kv", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="listen on --name and serve clients")
    s.add_argument("--name", default="kv")
    s.add_argument("--idle", type=float, default=0.0,
                   help="stop after this many seconds with no client (0: never)")
    c = sub.add_parser("client", help="a scripted session against the server")
    c.add_argument("--name", default="kv")
    c.add_argument("-n", type=int, default=100)
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        asyncio.run(Server(args.name, args.idle).serve())
        return 0
    return client(args.name, args.n)


if __name__ == "__main__":
    sys.exit(main())
