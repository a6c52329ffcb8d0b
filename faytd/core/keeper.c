/* keeper.c: faytd's backing objects: sealed memfds held by a keeper
 * process, and the pool that makes them ahead of need (core.h).
 *
 * Every portal gets a shared-memory object of its own (an fd grants all of
 * its object, so objects are never shared between portals).  An object is
 * a memfd, mode 0600 (a memfd is made 0777: any uid could reopen a
 * read-only descriptor of it read-write through /proc/<pid>/fd), sealed
 * F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL when it is taken, at its final
 * size: no holder of any descriptor can change its size (no SIGBUS in
 * another process that maps it) nor add a seal (F_SEAL_FUTURE_WRITE would
 * deny others' writable mappings).
 *
 * A memfd has no name for a restarted faytd to find, and faytd must not
 * hold one descriptor per share-point (RLIMIT_NOFILE).  So every object is
 * held by the keeper: a small process forked by faytd at its start (its
 * comm is "fayt-keeper"), in a session of its own, that survives faytd's
 * SIGKILL.  It does nothing but hold descriptors: faytd sends it new
 * objects (SCM_RIGHTS) and learns their descriptor numbers there; an
 * object's name is then /proc/<keeper pid>/fd/<n>, which faytd (same uid;
 * no other uid may open another's /proc/<pid>/fd) opens where it needs a
 * descriptor, and which the journal records.  A release tells the keeper
 * to close <n>.  The keeper listens on <state dir>/faytd.keeper (0600): a
 * restarted faytd connects there and takes it over.  It raises its
 * RLIMIT_NOFILE as far as it may; that limit bounds the live objects.  A
 * clean stop of faytd tells it to exit ('Q').
 *
 * The pool: a thread of faytd (plain C, no GIL) makes objects ahead of
 * need and hands them to the keeper in batches, and sends the keeper the
 * releases in batches, so that none of it lies on a reply's path.  It
 * sleeps when there is nothing to do: for 2 ms at a time while work keeps
 * coming (the loop wakes it only when the pool runs below half or many
 * releases wait), for ever once it has been idle 100 ms.  A new object is
 * all zeros, as a scrubbed frame is.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "fayt/common/deadline.h"
#include "fayt/common/scm.h"
#include "internal.h"

#define QUEUE_WAKE 16               /* releases waiting that wake the thread */
#define BUSY_NAP_NS 2000000         /* its nap while work keeps coming */
#define IDLE_AFTER_NS 100000000     /* idle this long: sleep until woken */
#define BATCH KEEPER_BATCH
#define CLOSE_BATCH 1024            /* releases in one message */
#define SEALS (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)

/* -- the keeper's protocol (SOCK_SEQPACKET) ------------------------------
 * keeper -> faytd, on every connection: struct hello.
 * 'A' u32 n + n descriptors: reply int32[n], each the descriptor's number
 *     in the keeper, or -errno (EMFILE: at its RLIMIT_NOFILE).
 * 'C' int32[]: close these (no reply).
 * 'Q': unlink the socket and exit (no reply). */
struct hello {
    uint32_t magic;
    int32_t pid;
    uint64_t nofile;
};
#define HELLO_MAGIC 0x4b594146u     /* "FAYK" */

#define ORPHAN_CHECK_MS 2000   /* a keeper without faytd looks at its socket this often */

/* -- the keeper process --------------------------------------------------- */
/* The keeper's own settings: its socket as bound.  Set before the fork, read
 * by the keeper process alone (the one file-level state of the core). */
static dev_t kdev;
static ino_t kino;
static char kpath[sizeof(((struct sockaddr_un *)0)->sun_path)];

static void keeper_hello(int c)
{
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    struct hello h = {HELLO_MAGIC, getpid(), rl.rlim_cur};
    send(c, &h, sizeof h, MSG_NOSIGNAL);
}

static void keeper_raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl))
        return;
    int fd = open("/proc/sys/fs/nr_open", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        char b[32] = {0};
        if (read(fd, b, sizeof b - 1) > 0) {
            struct rlimit up = {strtoull(b, NULL, 10), strtoull(b, NULL, 10)};
            if (up.rlim_max > rl.rlim_max && setrlimit(RLIMIT_NOFILE, &up) == 0) {
                close(fd);
                return;             /* root (CAP_SYS_RESOURCE): up to nr_open */
            }
        }
        close(fd);
    }
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
}

/* The keeper's command line, as ps shows it: "fayt-keeper <socket path>"
 * written over faytd's (the forked copy of its memory), so that nothing
 * that looks for faytd by its command line takes the keeper for it. */
static void keeper_title(void)
{
    static char b[1024];
    int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    ssize_t n = read(fd, b, sizeof b - 1);
    close(fd);
    if (n <= 0)
        return;
    b[n] = 0;
    char *p = strrchr(b, ')');
    if (!p)
        return;
    /* After ")": field 3 onwards; arg_start and arg_end are fields 48, 49. */
    unsigned long long start = 0, end = 0;
    int field = 2;
    for (char *q = p + 1; *q; q++) {
        if (*q == ' ') {
            field++;
            if (field == 48)
                start = strtoull(q + 1, NULL, 10);
            else if (field == 49)
                end = strtoull(q + 1, NULL, 10);
        }
    }
    if (!start || end <= start)
        return;
    char *arg = (char *)(uintptr_t)start;
    size_t room = end - start;
    memset(arg, 0, room);
    snprintf(arg, room, "fayt-keeper %s", kpath[0] ? kpath : "");
}

/* Without a faytd, the keeper waits for a restart on its socket; if the
 * socket is gone (its state directory removed) or another was bound there
 * (a faytd that could not reach this keeper started its own), no faytd can
 * ever reach it, and it exits, so no objects are held for no one. */
static int keeper_reachable(int lfd)
{
    struct stat st;
    return lfd >= 0 && kpath[0] && stat(kpath, &st) == 0
        && st.st_dev == kdev && st.st_ino == kino;
}

static void keeper_main(int lfd, int c) __attribute__((noreturn));
static void keeper_main(int lfd, int c)
{
    static uint8_t buf[65536];
    static FAYT_SCM_BUFFER(cb, BATCH);
    for (;;) {
        struct pollfd p[2] = {{c, POLLIN, 0}, {lfd, POLLIN, 0}};
        if (c < 0 && !keeper_reachable(lfd))
            _exit(0);               /* no faytd can ever take it over: its objects go */
        int n = poll(c >= 0 ? p : p + 1, c >= 0 ? 2 : 1, c >= 0 ? -1 : ORPHAN_CHECK_MS);
        if (n < 0)
            continue;
        if (c >= 0 && p[0].revents) {
            struct iovec iov = {buf, sizeof buf};
            struct msghdr mh = {0};
            mh.msg_iov = &iov;
            mh.msg_iovlen = 1;
            mh.msg_control = cb.buf;
            mh.msg_controllen = sizeof cb.buf;
            ssize_t r = recvmsg(c, &mh, MSG_CMSG_CLOEXEC);
            if (r < 0 && (errno == EINTR || errno == EAGAIN))
                continue;
            if (r <= 0) {                   /* faytd is gone: wait for the next */
                close(c);
                c = -1;
                continue;
            }
            int got[BATCH];
            int ngot = fayt_scm_take(&mh, got, BATCH);
            if (buf[0] == 'A' && r >= 8) {
                uint32_t want;
                memcpy(&want, buf + 4, 4);
                int32_t rep[BATCH];
                if (want > BATCH)
                    want = BATCH;
                for (uint32_t i = 0; i < want; i++)
                    rep[i] = i < (uint32_t)ngot ? got[i] : -EMFILE;  /* MSG_CTRUNC: no room */
                for (int i = (int)want; i < ngot; i++)
                    close(got[i]);
                send(c, rep, want * sizeof rep[0], MSG_NOSIGNAL);
            } else if (buf[0] == 'C' && r >= 4) {
                for (ssize_t at = 4; at + 4 <= r; at += 4) {
                    int32_t fd;
                    memcpy(&fd, buf + at, 4);
                    if (fd > 2 && fd != lfd && fd != c)
                        close(fd);
                }
                for (int i = 0; i < ngot; i++)
                    close(got[i]);
            } else if (buf[0] == 'Q') {
                if (kpath[0])
                    unlink(kpath);
                _exit(0);
            } else {
                for (int i = 0; i < ngot; i++)
                    close(got[i]);
            }
            continue;
        }
        if (lfd >= 0 && (p[1].revents & POLLIN)) {
            int a = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
            if (a < 0)
                continue;
            struct ucred cr;
            socklen_t cl = sizeof cr;
            /* One faytd at a time, of this uid (the socket is 0600 besides). */
            if (c >= 0 || getsockopt(a, SOL_SOCKET, SO_PEERCRED, &cr, &cl)
                || (cr.uid != getuid() && cr.uid != 0)) {
                close(a);
                continue;
            }
            c = a;
            keeper_hello(c);
        }
    }
}

/* Read the keeper's hello on fd: its pid, or -errno. */
static int read_hello(struct keeper_state *ks, int fd)
{
    struct hello h;
    struct timeval tv = {5, 0};     /* the keeper is ours: this bounds a bug, not a wait */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ssize_t r;
    do {
        r = recv(fd, &h, sizeof h, 0);
    } while (r < 0 && errno == EINTR);
    if (r != (ssize_t)sizeof h || h.magic != HELLO_MAGIC)
        return r < 0 ? -errno : -EPROTO;
    ks->nofile = h.nofile;
    return h.pid;
}

int fayt_keeper_start(struct fayt_core *k, const char *path)
{
    struct keeper_state *ks = &k->priv->keeper;
    int sv[2], lfd = -1;
    if (path && *path) {
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        if (strlen(path) >= sizeof a.sun_path)
            return -ENAMETOOLONG;
        strcpy(a.sun_path, path);
        lfd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        if (lfd < 0)
            return -errno;
        unlink(path);
        mode_t old = umask(0177);
        int e = bind(lfd, (struct sockaddr *)&a, sizeof a);
        umask(old);
        if (e || listen(lfd, 4)) {
            e = errno;
            close(lfd);
            return -e;
        }
        strcpy(kpath, path);
        struct stat st;
        if (stat(path, &st) == 0) {
            kdev = st.st_dev;
            kino = st.st_ino;
        }
    } else {
        kpath[0] = 0;
    }
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv)) {
        int e = errno;
        if (lfd >= 0) {
            close(lfd);
            unlink(path);
        }
        return -e;
    }
    pid_t pid = fork();
    if (pid < 0) {
        int e = errno;
        close(sv[0]);
        close(sv[1]);
        if (lfd >= 0) {
            close(lfd);
            unlink(path);
        }
        return -e;
    }
    if (pid == 0 && fork() != 0)
        _exit(0);                   /* the keeper is no child of faytd's */
    if (pid == 0) {
        /* The keeper: only system calls from here (a fork of a threaded
         * process), never back into Python. */
        sigset_t none;
        sigemptyset(&none);
        for (int s = 1; s < NSIG; s++)
            signal(s, SIG_DFL);
        signal(SIGPIPE, SIG_IGN);
        sigprocmask(SIG_SETMASK, &none, NULL);
        setsid();
        prctl(PR_SET_NAME, "fayt-keeper");
        keeper_title();
        prctl(PR_SET_PDEATHSIG, 0);
        /* faytd opens objects as /proc/<keeper>/fd/<n>, which its uid may
         * do only while the keeper is dumpable; a faytd that changed its
         * uid without an exec (setuid() after starting as root) is not,
         * nor would its keeper be. */
        prctl(PR_SET_DUMPABLE, 1);
        int nul = open("/dev/null", O_RDWR);
        /* Its socket to 3, the listener to 4; nothing else stays open. */
        int c = fcntl(sv[1], F_DUPFD_CLOEXEC, 16);
        int l = lfd >= 0 ? fcntl(lfd, F_DUPFD_CLOEXEC, 16) : -1;
        int nn = nul >= 0 ? fcntl(nul, F_DUPFD, 16) : -1;
        if (c < 0 || (lfd >= 0 && l < 0))
            _exit(1);
        for (int i = 0; i < 3; i++)
            dup2(nn >= 0 ? nn : c, i);
        dup3(c, 3, O_CLOEXEC);
        if (l >= 0)
            dup3(l, 4, O_CLOEXEC);
        if (syscall(SYS_close_range, l >= 0 ? 5 : 4, ~0U, 0) < 0) {
            struct rlimit rl;
            getrlimit(RLIMIT_NOFILE, &rl);
            for (int fd = l >= 0 ? 5 : 4; fd < (int)rl.rlim_cur && fd < 65536; fd++)
                close(fd);
        }
        keeper_raise_nofile();
        keeper_hello(3);
        keeper_main(l >= 0 ? 4 : -1, 3);
    }
    close(sv[1]);
    if (lfd >= 0)
        close(lfd);
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
        ;
    int r = read_hello(ks, sv[0]);
    if (r < 0) {
        close(sv[0]);
        return r;
    }
    pthread_mutex_lock(&ks->mu);
    ks->fd = sv[0];
    ks->pid = r;
    pthread_mutex_unlock(&ks->mu);
    return r;
}

int fayt_keeper_connect(struct fayt_core *k, const char *path)
{
    struct keeper_state *ks = &k->priv->keeper;
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof a.sun_path)
        return -ENAMETOOLONG;
    strcpy(a.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    struct ucred cr;
    socklen_t cl = sizeof cr;
    if (connect(fd, (struct sockaddr *)&a, sizeof a)
        || getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &cl)) {
        int e = errno;
        close(fd);
        return -e;
    }
    if (cr.uid != getuid()) {           /* not ours: someone else's socket */
        close(fd);
        return -EPERM;
    }
    int r = read_hello(ks, fd);             /* a keeper busy with a live faytd closes us */
    if (r < 0) {
        close(fd);
        return r;
    }
    pthread_mutex_lock(&ks->mu);
    ks->fd = fd;
    ks->pid = r;
    pthread_mutex_unlock(&ks->mu);
    return r;
}

int fayt_keeper_pid(struct fayt_core *k)
{
    struct keeper_state *ks = &k->priv->keeper;
    return ks->pid;
}

uint64_t fayt_keeper_nofile(struct fayt_core *k)
{
    struct keeper_state *ks = &k->priv->keeper;
    return ks->nofile;
}

/* Send one 'C' message of n descriptor numbers; kmu held. */
static void keeper_close_locked(struct keeper_state *ks, const int32_t *fds, uint32_t n)
{
    int32_t msg[CLOSE_BATCH + 1];
    while (n && ks->fd >= 0) {
        uint32_t m = n < CLOSE_BATCH ? n : CLOSE_BATCH;
        msg[0] = 'C';
        memcpy(msg + 1, fds, m * sizeof *fds);
        send(ks->fd, msg, (m + 1) * sizeof *msg, MSG_NOSIGNAL);
        fds += m;
        n -= m;
    }
}

void fayt_keeper_close(struct fayt_core *k, const int32_t *fds, uint32_t n)
{
    struct keeper_state *ks = &k->priv->keeper;
    pthread_mutex_lock(&ks->mu);
    keeper_close_locked(ks, fds, n);
    pthread_mutex_unlock(&ks->mu);
}

static void keeper_end(struct keeper_state *ks, int quit)
{
    pthread_mutex_lock(&ks->mu);
    if (ks->fd >= 0) {
        if (quit)
            send(ks->fd, "Q", 1, MSG_NOSIGNAL);
        close(ks->fd);
    }
    ks->fd = -1;
    ks->pid = 0;
    pthread_mutex_unlock(&ks->mu);
}

void fayt_keeper_quit(struct fayt_core *k)
{
    keeper_end(&k->priv->keeper, 1);
}

void fayt_keeper_detach(struct fayt_core *k)
{
    keeper_end(&k->priv->keeper, 0);
}

/* Hand n fresh objects to the keeper: their numbers there (or -errno) into
 * out.  kmu held.  0, or -errno for the whole batch. */
static int keeper_add_locked(struct keeper_state *ks, const int *fds, uint32_t n, int32_t *out)
{
    if (ks->fd < 0)
        return -ENOTCONN;
    FAYT_SCM_BUFFER(cb, BATCH);
    uint32_t hdr[2] = {'A', n};
    struct iovec iov = {hdr, sizeof hdr};
    struct msghdr mh = {0};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    fayt_scm_put(&mh, cb.buf, fds, (int)n);
    ssize_t r;
    do {
        r = sendmsg(ks->fd, &mh, MSG_NOSIGNAL);
    } while (r < 0 && errno == EINTR);
    if (r < 0)
        return -errno;
    do {
        r = recv(ks->fd, out, n * sizeof *out, 0);
    } while (r < 0 && errno == EINTR);
    if (r != (ssize_t)(n * sizeof *out))
        return r < 0 ? -errno : -EPROTO;
    return 0;
}

/* -- objects and the pool --------------------------------------------------- */

/* A new one-page memfd named fayt[.kind], 0600: its fd, or -errno.  The
 * pool's have their page made (a portal's first touch is cheaper); a kind's
 * have none (a SPECIAL|SHARE region's pages must fault, to be fetched). */
static int make_memfd(const char *kind)
{
    char name[64];
    snprintf(name, sizeof name, kind ? "fayt.%.48s" : "fayt", kind);
    int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return -errno;
    if (fchmod(fd, 0600) < 0 || ftruncate(fd, 4096) < 0 || (!kind && pwrite(fd, "", 1, 0) != 1)) {
        int e = errno ? errno : EIO;
        close(fd);
        return -e;
    }
    return fd;
}

/* Up to n new objects, held by the keeper, into out: how many, or -errno
 * if none. */
static int make_objects(struct fayt_core *k, struct pooled *out, uint32_t n, const char *kind)
{
    struct keeper_state *ks = &k->priv->keeper;
    int fds[BATCH];
    int32_t nums[BATCH];
    uint32_t made = 0;
    int err = 0;
    if (n > BATCH)
        n = BATCH;
    while (made < n) {
        int fd = make_memfd(kind);
        if (fd < 0) {
            err = fd;
            break;
        }
        fds[made++] = fd;
    }
    if (!made)
        return err;
    pthread_mutex_lock(&ks->mu);
    int e = keeper_add_locked(ks, fds, made, nums);
    pthread_mutex_unlock(&ks->mu);
    if (e) {
        for (uint32_t i = 0; i < made; i++)
            close(fds[i]);
        return e;
    }
    int got = 0;
    for (uint32_t i = 0; i < made; i++) {
        if (nums[i] < 0) {
            err = nums[i];
            close(fds[i]);
            continue;
        }
        out[got].fd = fds[i];
        out[got].kept = nums[i];
        got++;
    }
    return got ? got : err;
}

static void name_of(struct fayt_core *k, int32_t kept, char *name)
{
    snprintf(name, FAYT_OBJ_NAME_MAX, "/proc/%d/fd/%d", k->priv->keeper.pid, kept);
}

static int32_t kept_of(const char *name)
{
    const char *s = strrchr(name, '/');
    return s ? (int32_t)strtol(s + 1, NULL, 10) : -1;
}

static void nap(struct pool_state *ps, int64_t ns)
{
    struct timespec d;
    fayt_deadline(ns, &d);          /* the condvar waits on CLOCK_MONOTONIC */
    pthread_cond_timedwait(&ps->cv, &ps->mu, &d);
}

static void *janitor(void *arg)
{
    struct fayt_core *k = arg;
    struct pool_state *ps = &k->priv->pool;
    int64_t last_work = fayt_now_ns();
    int failing = 0;
    int32_t batch[CLOSE_BATCH];
    pthread_mutex_lock(&ps->mu);
    while (!ps->stopping) {
        if (ps->nqueued) {
            uint32_t m = ps->nqueued < CLOSE_BATCH ? ps->nqueued : CLOSE_BATCH;
            ps->nqueued -= m;
            memcpy(batch, ps->queue + ps->nqueued, m * sizeof *batch);
            pthread_mutex_unlock(&ps->mu);
            fayt_keeper_close(k, batch, m);
            pthread_mutex_lock(&ps->mu);
            last_work = 0;
            continue;
        }
        if (ps->nready_ctx < CTX_TARGET && ps->nready >= ps->target / 2 && !failing) {
            struct pooled p[CTX_TARGET];
            uint32_t want = CTX_TARGET - ps->nready_ctx;
            pthread_mutex_unlock(&ps->mu);
            int got = make_objects(k, p, want, "ctx");
            pthread_mutex_lock(&ps->mu);
            if (got <= 0)
                failing = 1;
            for (int i = 0; i < got; i++)
                ps->ready_ctx[ps->nready_ctx++] = p[i];    /* only this thread adds */
            last_work = 0;
            continue;
        }
        if (ps->nready < ps->target && !failing) {
            struct pooled p[BATCH];
            uint32_t want = ps->target - ps->nready;
            pthread_mutex_unlock(&ps->mu);
            int got = make_objects(k, p, want, NULL);
            pthread_mutex_lock(&ps->mu);
            if (got <= 0)
                failing = 1;            /* out of files or memory: try again later */
            for (int i = 0; i < got; i++) {
                if (ps->nready < ps->target) {
                    ps->ready[ps->nready++] = p[i];
                } else {                /* never: only this thread adds */
                    close(p[i].fd);
                    fayt_keeper_close(k, &p[i].kept, 1);
                }
            }
            last_work = 0;
            continue;
        }
        int64_t now = fayt_now_ns();
        if (last_work == 0)
            last_work = now;
        ps->sleeping = 1;
        if (failing) {
            ps->deep = 0;
            nap(ps, 100000000);
            failing = 0;
        } else if (now - last_work < IDLE_AFTER_NS) {
            ps->deep = 0;
            nap(ps, BUSY_NAP_NS);
        } else {
            ps->deep = 1;
            pthread_cond_wait(&ps->cv, &ps->mu);
        }
        ps->sleeping = ps->deep = 0;
    }
    pthread_mutex_unlock(&ps->mu);
    return NULL;
}

int fayt_objpool_start(struct fayt_core *k, uint32_t want)
{
    struct pool_state *ps = &k->priv->pool;
    pthread_mutex_lock(&ps->mu);
    if (ps->running) {
        pthread_mutex_unlock(&ps->mu);
        return EALREADY;
    }
    ps->target = want;
    ps->ready = calloc(want ? want : 1, sizeof *ps->ready);
    if (!ps->ready) {
        pthread_mutex_unlock(&ps->mu);
        return ENOMEM;
    }
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(&ps->cv, &a);
    pthread_condattr_destroy(&a);
    ps->stopping = 0;
    /* The thread takes no signal: faytd's handlers run on its main thread. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int e = pthread_create(&ps->thread, NULL, janitor, k);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (e) {
        free(ps->ready);
        ps->ready = NULL;
        pthread_mutex_unlock(&ps->mu);
        return e;
    }
    ps->running = 1;
    pthread_mutex_unlock(&ps->mu);
    return 0;
}

int fayt_objpool_take(struct fayt_core *k, uint64_t length, const char *kind, char *name_out)
{
    struct pool_state *ps = &k->priv->pool;
    struct pooled p = {-1, -1};
    int ctx = kind && strcmp(kind, "ctx") == 0;
    if (!kind || ctx) {
        pthread_mutex_lock(&ps->mu);
        if (ps->running && !ctx && ps->nready)
            p = ps->ready[--ps->nready];
        else if (ps->running && ctx && ps->nready_ctx)
            p = ps->ready_ctx[--ps->nready_ctx];
        if (ps->running && ps->sleeping
            && (ps->deep || ps->nready < ps->target / 2 || ps->nready_ctx < CTX_TARGET / 2))
            pthread_cond_signal(&ps->cv);
        pthread_mutex_unlock(&ps->mu);
    }
    if (p.fd < 0) {
        int got = make_objects(k, &p, 1, kind);
        if (got < 0)
            return got;
    }
    name_of(k, p.kept, name_out);
    if ((length != 4096 && ftruncate(p.fd, (off_t)length) < 0)
        || fcntl(p.fd, F_ADD_SEALS, SEALS) < 0) {
        int e = errno;
        close(p.fd);
        fayt_keeper_close(k, &p.kept, 1);
        return -e;
    }
    return p.fd;
}

void fayt_objpool_release(struct fayt_core *k, const char *name)
{
    struct pool_state *ps = &k->priv->pool;
    int32_t num = kept_of(name);
    if (num < 0)
        return;
    pthread_mutex_lock(&ps->mu);
    if (ps->running) {
        if (ps->nqueued == ps->cap_queue) {
            uint32_t cap = ps->cap_queue ? ps->cap_queue * 2 : 256;
            void *q = realloc(ps->queue, (size_t)cap * sizeof *ps->queue);
            if (!q) {
                pthread_mutex_unlock(&ps->mu);
                fayt_keeper_close(k, &num, 1);   /* no room to queue it: now */
                return;
            }
            ps->queue = q;
            ps->cap_queue = cap;
        }
        ps->queue[ps->nqueued++] = num;
        if (ps->sleeping && (ps->deep || ps->nqueued >= QUEUE_WAKE))
            pthread_cond_signal(&ps->cv);
        pthread_mutex_unlock(&ps->mu);
        return;
    }
    pthread_mutex_unlock(&ps->mu);
    fayt_keeper_close(k, &num, 1);
}

void fayt_objpool_stop(struct fayt_core *k)
{
    struct pool_state *ps = &k->priv->pool;
    pthread_mutex_lock(&ps->mu);
    if (!ps->running) {
        pthread_mutex_unlock(&ps->mu);
        return;
    }
    ps->stopping = 1;
    pthread_cond_signal(&ps->cv);
    pthread_mutex_unlock(&ps->mu);
    pthread_join(ps->thread, NULL);
    pthread_mutex_lock(&ps->mu);
    ps->running = 0;
    for (uint32_t i = 0; i < ps->nready; i++) {
        close(ps->ready[i].fd);
        fayt_keeper_close(k, &ps->ready[i].kept, 1);
    }
    for (uint32_t i = 0; i < ps->nready_ctx; i++) {
        close(ps->ready_ctx[i].fd);
        fayt_keeper_close(k, &ps->ready_ctx[i].kept, 1);
    }
    ps->nready_ctx = 0;
    fayt_keeper_close(k, ps->queue, ps->nqueued);
    ps->nready = ps->nqueued = 0;
    free(ps->ready);
    ps->ready = NULL;
    pthread_cond_destroy(&ps->cv);
    pthread_mutex_unlock(&ps->mu);
}
