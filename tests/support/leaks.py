"""What a test session must leave behind: nothing.

Taken at the start of the session (snapshot) and judged at its end, once
every faytd of the session stopped (findings):

- no faytd this session started still runs (faytd.launch knows them all);
- no object keeper of theirs runs and no object of theirs is held: a clean
  stop ends the keeper; a killed faytd's keeper waits for a restart that
  will not come now, and is ended here (faytd.launch.leftover_keepers);
- no process the session started still runs, or waits to be reaped
  (children of the test process, and of the fork server: support.procs);
- nothing new in /dev/shm named by the project ("fayt...") or by this
  session's multiprocessing (its semaphores carry the session's prefix)
  that no live object holds.

Other runs on the same machine (their own faytds, keepers, /dev/shm
entries) are not this session's to judge: each check looks only at what
this session made.
"""
import gc
import multiprocessing
import os
import signal
import time

import psutil

from faytd import launch

SEM_PREFIX = "/mp-fayt-test-%d" % os.getpid()
SHM = "/dev/shm"


def name_session_semaphores():
    """multiprocessing names its semaphores semprefix-random (in /dev/shm as
    sem.<name>): give this session's a prefix of its own, so that a leak is
    seen as ours.  Children of the fork server inherit it."""
    try:
        multiprocessing.current_process()._config["semprefix"] = SEM_PREFIX
    except (AttributeError, KeyError, TypeError):      # not CPython's multiprocessing
        pass


def _shm():
    try:
        return set(os.listdir(SHM))
    except OSError:
        return set()


def _ours(name):
    return name.startswith("fayt") or name.startswith("sem." + SEM_PREFIX[1:])


def snapshot():
    return {"shm": _shm(),
            "children": {p.pid for p in psutil.Process().children(recursive=True)}}


def _harness_pids():
    """The fork server and the resource tracker: the harness's own."""
    from multiprocessing import forkserver, resource_tracker
    pids = set()
    for obj, attr in ((getattr(forkserver, "_forkserver", None), "_forkserver_pid"),
                      (getattr(resource_tracker, "_resource_tracker", None), "_pid")):
        pid = getattr(obj, attr, None)
        if pid:
            pids.add(pid)
    return pids


def _describe(p, harness):
    try:
        if p.ppid() in harness:
            what = "a child of the fork server (support.procs)"
        else:
            what = " ".join(p.cmdline())[:120] or p.name()
        return "%d %s (%s)" % (p.pid, what, p.status())
    except psutil.Error:
        return "%d" % p.pid


def findings(start):
    """What the session left behind, as lines (empty: nothing).  Processes
    are ended, so that one run's leak does not become the next one's."""
    out = []
    gc.collect()
    for d in list(launch._running):
        if d.proc.poll() is None:
            out.append("faytd %d (%s) still runs" % (d.proc.pid, d.dir))
        d.stop(check=False)             # a killed one: reaped, forgotten
    left = launch.leftover_keepers()
    objects = launch.fayt_objects(dirs=set(launch.LAST), pooled=True)
    if left or objects:
        out.append("object keepers left running: %s, holding %s" % (left, objects))
        launch.end_keepers({os.path.dirname(p) for p in left.values()})

    harness = _harness_pids()
    me = psutil.Process()
    strays = [p for p in me.children(recursive=True)
              if p.pid not in harness and p.pid not in start["children"]]
    for p in strays:
        out.append("process left running: " + _describe(p, harness))
    for p in strays:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                p.send_signal(signal.SIGKILL)
            if p.ppid() == os.getpid():
                os.waitpid(p.pid, 0)
        except (psutil.Error, ChildProcessError):
            pass
    # (The fork server and multiprocessing's resource tracker end with this
    # process.)  A semaphore an object still holds (a failed test's traceback
    # keeps it) goes with the object: not a leak.
    live = _live_semaphores()
    deadline = time.monotonic() + 5         # another process may still be unlinking
    while True:
        new = sorted(n for n in _shm() - start["shm"] if _ours(n) and n not in live)
        if not new or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    out.extend("left in %s: %s" % (SHM, n) for n in new)
    return out


def _live_semaphores():
    """The /dev/shm names of the semaphores live objects of this process hold."""
    from multiprocessing.synchronize import SemLock
    names = set()
    for o in gc.get_objects():
        if isinstance(o, SemLock):
            name = getattr(getattr(o, "_semlock", None), "name", None)
            if name:
                names.add("sem." + name.lstrip("/"))
    return names
