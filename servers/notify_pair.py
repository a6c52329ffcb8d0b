"""A reference server pair that talks through notifications.

    python -m servers.notify_pair serve            # prints its context id, serves
    python -m servers.notify_pair client <id>      # talks to it, then exits

The server (a `core` server: only core may install handlers) defines its
notification set, as the specification leaves each server to do:

    slot 0  ADD     payload: two little-endian int64; returns their sum
                    (the client sends it with the return flag)
    slot 1  LOG     payload: up to 48 bytes of UTF-8 text; deferred, no return
    slot 2  FAIL    the handler raises: the client gets HandlerFailed
    slot 9  faytd's PEER_DIED notice (sender 0): a client went away

It sleeps in notification_wait(), which is a dispatch point, and stops on
SIGTERM or after `--idle` seconds without a notification.  The client uses
the public API only: notification_channel(), Channel.call() / send(),
notify(); it checks every answer and exits 0 if all were right.
Delivery never passes through faytd once the ring exists.
"""
import argparse
import signal
import struct
import sys
import time

import libportal as lp

ADD, LOG, FAIL, PEER_DIED_SLOT = 0, 1, 2, 9
_PAIR = struct.Struct("<qq")


def say(role, fmt, *args):
    sys.stdout.write("[%s] %s\n" % (role, fmt % args if args else fmt))
    sys.stdout.flush()


def serve(idle):
    stats = {"add": 0, "log": 0, "last": time.monotonic()}
    stopping = []

    def on_add(payload, index, sender):
        a, b = _PAIR.unpack(payload)
        stats["add"] += 1
        return a + b

    def on_log(payload, index, sender):
        stats["log"] += 1
        say("server", "log from context %d: %s", sender, bytes(payload).decode("utf-8", "replace"))

    def on_fail(payload, index, sender):
        raise ValueError("FAIL asked for by context %d" % sender)

    def on_peer_died(payload, index, sender):
        e = lp.decode_event(payload)
        say("server", "faytd says context %d (pid %d) died", e["context_id"], e["pid"])

    lp.install_handler(ADD, on_add)
    lp.install_handler(LOG, on_log)
    lp.install_handler(FAIL, on_fail)
    lp.install_handler(PEER_DIED_SLOT, on_peer_died)
    lp.subscribe(lp.PEER_DIED, PEER_DIED_SLOT)
    signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
    say("server", "context %d serving notifications (slots 0 ADD, 1 LOG, 2 FAIL)",
        lp.connection().context_id)
    while not stopping:
        if lp.notification_wait(0.2):
            stats["last"] = time.monotonic()
        elif idle and time.monotonic() - stats["last"] > idle:
            break
    say("server", "stopping: %d ADD, %d LOG handled", stats["add"], stats["log"])
    return 0


def client(target, n):
    ch = lp.notification_channel(target)
    ok = True
    t = time.perf_counter()
    for i in range(n):
        got = ch.call(ADD, _PAIR.pack(i, 1000), timeout=10)
        ok &= got == i + 1000
    rtt = (time.perf_counter() - t) / n * 1e6
    say("client", "%d ADD calls with the return flag: %s (%.1f us each)",
        n, "all right" if ok else "WRONG", rtt)
    ch.send(LOG, b"hello through the ring")                 # deferred
    lp.notify(target, LOG, b"and one immediate", immediate=True)
    try:
        ch.call(FAIL, timeout=10)
        say("client", "FAIL returned: WRONG")
        ok = False
    except lp.HandlerFailed as e:
        say("client", "FAIL: HandlerFailed (%s); the server keeps running", e.strerror)
    ok &= ch.call(ADD, _PAIR.pack(2, 2), timeout=10) == 4
    say("client", "done: %s", "ok" if ok else "FAILED")
    return 0 if ok else 1


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m %s.notify_pair" % (__package__ or "servers"),
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="role", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--idle", type=float, default=0, help="stop after this many idle seconds")
    c = sub.add_parser("client")
    c.add_argument("target", type=int, help="the server's context id")
    c.add_argument("-n", type=int, default=1000)
    args = ap.parse_args(argv)
    if args.role == "serve":
        return serve(args.idle)
    return client(args.target, args.n)


if __name__ == "__main__":
    sys.exit(main())
